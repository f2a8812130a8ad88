#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment and install everything into it.
#
# Sourced by scripts/demo.sh and scripts/test.sh. torch is installed on its own, first, so that the
# `torch>=...` range in pyproject.toml is already satisfied and pip never swaps in a multi-GB CUDA
# build. Override the torch install with OPTDIAG_TORCH_SPEC (e.g. another version or a CUDA build)
# and the interpreter with PYTHON.
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${OPTDIAG_VENV:-$repo_root/.venv}"
python="${PYTHON:-python3}"
torch_spec="${OPTDIAG_TORCH_SPEC:-torch==2.13.0}"
extras="${1:-}"

if [ ! -x "$venv/bin/python" ]; then
    echo "==> creating virtual environment in $venv"
    "$python" -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip --disable-pip-version-check --quiet)
if ! "$venv/bin/python" -c "import torch" >/dev/null 2>&1; then
    echo "==> installing $torch_spec"
    # shellcheck disable=SC2086  # the spec may carry pip options on purpose
    "${pip[@]}" install $torch_spec
fi
echo "==> installing lightning-optdiag${extras:+[$extras]}"
"${pip[@]}" install -e "$repo_root${extras:+[$extras]}"
