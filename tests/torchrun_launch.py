"""Launch a package stage under `torchrun` (two CPU processes, gloo) from a test, as a user would."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (for the rendezvous, so parallel runs never share one)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_env() -> dict[str, str]:
    """The test's environment plus the repository on the path, hubs offline and one thread per process."""
    return {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def torchrun(module: str, argv: list[str], nproc: int = 2, timeout: int = 300) -> subprocess.CompletedProcess:
    """`python -m torch.distributed.run --nproc_per_node=<nproc> -m <module> <argv>` from the repository root; fails
    the test with the end of its stderr unless it exits 0."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={free_port()}",
           "-m", module, *argv]
    done = subprocess.run(cmd, cwd=REPO, env=launch_env(), capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-4000:]
    return done
