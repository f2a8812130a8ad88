"""Running a ``ddp_spawn`` scenario in a subprocess, with a timeout that catches hangs.

A DDP test fails in two ways: an assertion about what the ranks recorded, or a hang because the
ranks took different decisions and one waits in a collective forever. The subprocess (its own
session, so that the spawned ranks die with it) turns the second into a clear failure.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


def run_scenario(module: str, out_dir: Path, timeout: float, hang: str) -> str:
    """Run ``module.run_ddp_scenario(out_dir)`` in a fresh interpreter and return its output;
    fail with ``hang`` if it does not finish within ``timeout`` seconds, or with its output if
    it fails."""
    code = f"import sys\nfrom {module} import run_ddp_scenario\nrun_ddp_scenario(sys.argv[1])\n"
    process = subprocess.Popen(
        [sys.executable, "-c", code, str(out_dir)],
        cwd=REPO_ROOT,
        env={**_clean_environment(), "PYTHONPATH": str(REPO_ROOT)},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        pytest.fail(f"the ddp_spawn run hung ({hang})")
    text = output.decode(errors="replace")
    assert process.returncode == 0, text[-4000:]
    return text


# What Lightning leaves in os.environ for the processes it spawns: inherited from earlier tests
# in this process, it would re-seed the ranks (PL_GLOBAL_SEED) or pin a port still in use.
_LIGHTNING_LEFTOVERS = ("PL_GLOBAL_SEED", "PL_SEED_WORKERS", "MASTER_PORT", "MASTER_ADDR")


def _clean_environment() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in _LIGHTNING_LEFTOVERS}
