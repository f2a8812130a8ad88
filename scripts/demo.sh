#!/usr/bin/env bash
# Install everything into .venv and run the demo on built-in synthetic data.
set -euo pipefail
repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$repo_root/scripts/bootstrap.sh" "examples"
cd "$repo_root"
status=0
"$venv/bin/optdiag" demo "$@" || status=$?
case " $* " in *" -h "* | *" --help "*) exit "$status" ;; esac
if [ "$status" -eq 0 ] && [ "${VIRTUAL_ENV:-}" != "$venv" ]; then
    # The demo's closing lines name `optdiag report ...`: say where that command lives.
    echo
    echo "The optdiag command is installed in $venv/bin: run 'source $venv/bin/activate' first"
    echo "to use it directly (optdiag report, optdiag lr-find, optdiag demo --help)."
fi
exit "$status"
