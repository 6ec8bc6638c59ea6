"""A 2-process torchrun (gloo) run of the distributed helpers, plus their single-process behaviour."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from common.checkpoint import is_complete
from common.distributed import SeededSampler, all_reduce_mean, distributed_sampler, get_world_size, setup_distributed


def test_torchrun_two_processes(tmp_path: Path) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1", TORCHELASTIC_ERROR_FILE=str(tmp_path / "error.json"))
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    script = Path(__file__).with_name("ddp_check.py")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(script), str(tmp_path)], env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert (r0["world_size"], r1["world_size"]) == (2, 2)
    assert (r0["is_main"], r1["is_main"]) == (True, False)
    # The sampler splits the 10 items into disjoint halves that cover everything.
    assert len(r0["indices"]) == len(r1["indices"]) == 5
    assert sorted(r0["indices"] + r1["indices"]) == list(range(10))
    # All-reduce: sum of (rank + 1) is 3 on both ranks; mean of [rank, 10] is [0.5, 10].
    assert r0["sum"] == r1["sum"] == 3.0
    assert r0["mean_tensor"] == r1["mean_tensor"] == [0.5, 10.0]
    # DDP broadcast the initial weights and averaged gradients: both ranks end with the same weights.
    assert r0["weights"] == r1["weights"]
    # Rank 0 alone writes: one marker, one checkpoint writer, a complete checkpoint.
    assert (r0["marker"], r1["marker"]) == ("wrote", None)
    assert (r0["checkpoint_writer"], r1["checkpoint_writer"]) == (True, False)
    assert is_complete(tmp_path / "checkpoints" / "latest")
    # every rank got through cleanup_distributed (barrier, then destroy_process_group)
    assert all((tmp_path / f"rank{r}.done").is_file() for r in (0, 1))


def test_single_process_fallbacks() -> None:
    info = setup_distributed()
    assert (info.rank, info.world_size, info.device.type) == (0, 1, "cpu")
    assert get_world_size() == 1
    assert all_reduce_mean(2.5) == 2.5
    sampler = distributed_sampler(list(range(20)), shuffle=True, seed=5)
    assert isinstance(sampler, SeededSampler)
    sampler.set_epoch(0)
    epoch0 = list(sampler)
    sampler.set_epoch(1)
    epoch1 = list(sampler)
    assert sorted(epoch0) == list(range(20)) and epoch0 != epoch1
    sampler.set_epoch(0)
    assert list(sampler) == epoch0  # the order depends only on seed + epoch: resume replays it
    assert torch.equal(torch.tensor(list(SeededSampler(5, shuffle=False))), torch.arange(5))
