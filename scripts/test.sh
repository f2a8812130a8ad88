#!/usr/bin/env bash
# Install everything (with the test extras) into .venv and run the whole test suite.
set -euo pipefail
repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$repo_root/scripts/bootstrap.sh" "test"
cd "$repo_root"
exec "$venv/bin/python" -m pytest "$@"
