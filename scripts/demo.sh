#!/usr/bin/env bash
# Install everything into .venv and run the demo on built-in synthetic data.
set -euo pipefail
repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$repo_root/scripts/bootstrap.sh" ""
cd "$repo_root"
exec "$venv/bin/optdiag" demo "$@"
