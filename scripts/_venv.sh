# Sourced by demo.sh and test.sh: create $VENV (default .venv) and install crossrank with the
# extras given as arguments, e.g. `install_crossrank demo`.
#
# torch: constraints/cpu.txt pins its version. On Linux, plain PyPI serves that version as
# the CUDA build (several GB of nvidia-* wheels); to get the CPU build, set
#   CROSSRANK_TORCH_INDEX=https://download.pytorch.org/whl/cpu
# and pip also looks there (--extra-index-url) and prefers its 2.x.y+cpu wheel.
VENV=${CROSSRANK_VENV:-.venv}

install_crossrank() {
  local extras
  extras=$(IFS=,; echo "$*")
  [ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
  local index=()
  [ -z "${CROSSRANK_TORCH_INDEX:-}" ] || index=(--extra-index-url "$CROSSRANK_TORCH_INDEX")
  # pip's stderr minus one known, harmless line: a dependency of llama-index asks for
  # huggingface-hub's "inference" extra, which newer huggingface-hub releases no longer have.
  { "$VENV/bin/python" -m pip install -q --disable-pip-version-check "${index[@]}" \
    -c constraints/cpu.txt -e ".[$extras]" 2>&1 1>&3 |
    { grep -v "does not provide the extra 'inference'" || true; } >&2; } 3>&1
}
