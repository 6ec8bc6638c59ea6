"""CPU thread counts from the CPUs this process may use, not the node's cores.

torch sizes its intra-op pool from the cores it sees. A Slurm job or a container often may use fewer (an affinity
mask, `SLURM_CPUS_PER_TASK`, a cgroup CPU quota); more threads than that make every parallel op wait at its
barrier for a thread that is not running, which costs most where a model runs many small ops per step.

    from common.threads import set_torch_threads
    set_torch_threads(cfg.run.num_threads)     # 0: $OMP_NUM_THREADS if set, else available_cpus()
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

log = logging.getLogger(__name__)
CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")


def cgroup_cpu_limit(path: Path = CGROUP_CPU_MAX) -> int | None:
    """CPUs allowed by a cgroup v2 quota (`cpu.max` holds 'QUOTA PERIOD' or 'max PERIOD'), rounded up; None
    when there is no quota or no file."""
    try:
        quota, period = path.read_text().split()[:2]
    except (OSError, ValueError):
        return None
    if quota == "max":
        return None
    try:
        return max(1, math.ceil(int(quota) / int(period)))
    except (ValueError, ZeroDivisionError):
        return None


def available_cpus() -> int:
    """CPUs this process may use: the smallest of its affinity mask (`os.sched_getaffinity`, else `os.cpu_count`),
    `SLURM_CPUS_PER_TASK` when set and a cgroup v2 CPU quota when one is set; at least 1."""
    try:
        counts = [len(os.sched_getaffinity(0))]
    except AttributeError:  # not on Linux
        counts = [os.cpu_count() or 1]
    slurm = os.environ.get("SLURM_CPUS_PER_TASK", "").strip()
    if slurm.isdigit() and int(slurm) > 0:
        counts.append(int(slurm))
    quota = cgroup_cpu_limit()
    if quota is not None:
        counts.append(quota)
    return max(1, min(counts))


def thread_count(requested: int = 0, cap: int = 0) -> int:
    """`requested` when > 0 (a config that says otherwise wins), else OMP_NUM_THREADS when the environment sets it,
    else available_cpus(), at most `cap` when > 0."""
    if requested > 0:
        return requested
    from_env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if from_env.isdigit() and int(from_env) > 0:
        return int(from_env)
    cpus = available_cpus()
    return min(cpus, cap) if cap > 0 else cpus


def set_torch_threads(requested: int = 0, cap: int = 0) -> int:
    """Set torch's intra-op threads to `thread_count(requested, cap)` and return it."""
    import torch

    threads = thread_count(requested, cap)
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    log.debug("torch threads: %d (requested %d, %d CPUs available)", threads, requested, available_cpus())
    return threads
