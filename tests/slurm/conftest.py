"""A real single-node Slurm cluster (scripts/slurm/cluster.sh) for the slurm-marked tests, and a job folder.

The cluster starts once per session and stops at the end if this session started it. Where it cannot start (not
root and no Slurm installed, no apt-get), the tests skip with the reason, unless REQUIRE_SLURM=1 (CI) makes that a
failure. Jobs run the repository's own sbatch scripts from a submit folder that links configs and scripts, so
everything they write (runs/, data/) stays in a temporary folder. The folder has no .venv, as on a cluster whose
environment is a module, a conda env or a venv elsewhere: the jobs find Python by scripts/_python.sh's rule, through
PYTHON (set below) or, where a test drops it, the VIRTUAL_ENV it passes.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CLUSTER = REPO / "scripts" / "slurm" / "cluster.sh"
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "PREEMPTED", "BOOT_FAIL",
            "DEADLINE"}


def parse_job_lines(text: str) -> list[dict[str, str]]:
    """`scontrol show job -o` output -> one dict per job (array tasks each get a line)."""
    jobs = []
    for line in text.splitlines():
        fields = {}
        for token in line.split():
            key, sep, value = token.partition("=")
            if sep:
                fields[key] = value
        if "JobId" in fields:
            jobs.append(fields)
    return jobs


@dataclass
class Slurm:
    """The running cluster: `env` for sbatch/scontrol, `submit` and `wait` helpers."""

    env: dict[str, str]
    started_here: bool
    log_dir: Path
    submitted: list[str] = field(default_factory=list)

    def run(self, *cmd: str, cwd: Path | None = None, timeout: float = 60, env: dict[str, str] | None = None) -> str:
        done = subprocess.run(cmd, cwd=cwd, env=self.env if env is None else env, capture_output=True, text=True,
                              timeout=timeout)
        assert done.returncode == 0, f"{' '.join(cmd)} -> {done.returncode}: {done.stderr[-2000:]}"
        return done.stdout

    def submit(self, script: Path | str, *args: str, cwd: Path, options: tuple[str, ...] = (),
               env: dict[str, str] | None = None) -> str:
        """sbatch SCRIPT ARGS from cwd; the job gets sbatch's environment: `env` when given, else `self.env`."""
        out = self.run("sbatch", "--parsable", *options, str(script), *args, cwd=cwd, env=env)
        job = out.strip().split(";")[0]
        self.submitted.append(job)
        return job

    def jobs(self, job: str) -> list[dict[str, str]]:
        done = subprocess.run(["scontrol", "show", "job", "-o", job], env=self.env, capture_output=True, text=True)
        return parse_job_lines(done.stdout) if done.returncode == 0 else []

    def wait(self, jobs: list[str], timeout: float = 600, what: str = "") -> dict[str, list[dict[str, str]]]:
        """Poll until every job (every task of an array) is in a terminal state; {job: [records]}."""
        deadline = time.monotonic() + timeout
        while True:
            records = {job: self.jobs(job) for job in jobs}
            if all(recs and all(r["JobState"] in TERMINAL for r in recs) for recs in records.values()):
                return records
            if time.monotonic() > deadline:
                states = {j: [r.get("JobState") for r in recs] for j, recs in records.items()}
                pytest.fail(f"{what or 'jobs'} not finished after {timeout:.0f} s: {states}\n{self.tail_logs()}")
            time.sleep(1)

    def tail_logs(self) -> str:
        tails = []
        for name in ("slurmctld.log", "slurmd.log"):
            path = self.log_dir / name
            if path.is_file():
                tails.append(f"--- {path} (tail)\n" + "\n".join(path.read_text(errors="replace").splitlines()[-15:]))
        return "\n".join(tails)


def _cluster(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(CLUSTER), *args], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="session")
def slurm() -> Slurm:
    was_up = _cluster("status").returncode == 0
    start = None if was_up else _cluster("start")
    if start is not None and start.returncode != 0:
        reason = f"Slurm could not start here: {(start.stderr.strip().splitlines() or ['(no message)'])[-1]}"
        if os.environ.get("REQUIRE_SLURM") == "1":
            pytest.fail(f"REQUIRE_SLURM=1 but {reason}")
        pytest.skip(reason)
    conf = _cluster("env").stdout.strip().removeprefix("export SLURM_CONF=")
    env = {**os.environ, "SLURM_CONF": conf, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           # The package scripts ask for GPUs and cluster-sized memory; this test node has neither. sbatch reads
           # these before the scripts' #SBATCH lines, as a user's site defaults would.
           "SBATCH_GPUS": "0", "SBATCH_GPUS_PER_NODE": "0", "SBATCH_MEM_PER_NODE": "1500M"}
    cluster = Slurm(env=env, started_here=not was_up, log_dir=Path(conf).parent / "log")
    yield cluster
    if cluster.submitted:
        subprocess.run(["scancel", *cluster.submitted], env=env, capture_output=True)
    if cluster.started_here:
        _cluster("stop")


@pytest.fixture(scope="module")
def submit_dir(tmp_path_factory) -> Path:
    """A folder to submit from: links to configs and scripts, no .venv; jobs write runs/ and data/ here."""
    root = tmp_path_factory.mktemp("slurm_submit")
    for name in ("configs", "scripts"):
        (root / name).symlink_to(REPO / name)
    return root


def assert_completed(records: dict[str, list[dict[str, str]]], submit_dir: Path) -> None:
    """Every job and array task COMPLETED with exit 0:0; on failure show the job's output file."""
    for job, recs in records.items():
        for r in recs:
            if r["JobState"] != "COMPLETED" or r["ExitCode"] != "0:0":
                out = Path(r.get("StdOut", ""))
                out = out if out.is_absolute() else submit_dir / out
                text = out.read_text(errors="replace")[-3000:] if out.is_file() else f"(no output at {out})"
                pytest.fail(f"job {job} ({r.get('JobName')}) {r['JobState']} exit {r['ExitCode']}:\n{text}")
