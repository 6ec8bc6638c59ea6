"""Run under `torchrun --nproc_per_node=2`: exercises common.distributed and writes what each rank saw.

    torchrun --standalone --nproc_per_node=2 tests/common/ddp_check.py OUT_DIR
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from common.checkpoint import CheckpointManager, unwrap_model  # noqa: E402
from common.distributed import (  # noqa: E402
    all_reduce_mean,
    all_reduce_sum,
    barrier,
    cleanup_distributed,
    distributed_sampler,
    get_rank,
    get_world_size,
    is_main_process,
    rank0_only,
    setup_distributed,
    wrap_ddp,
)


@rank0_only
def write_marker(out: Path) -> str:
    (out / "rank0_marker.txt").write_text("written once\n")
    return "wrote"


def main() -> int:
    out = Path(sys.argv[1])
    info = setup_distributed()
    torch.manual_seed(100 + info.rank)  # different init per rank: DDP must broadcast rank 0's weights
    dataset = torch.utils.data.TensorDataset(torch.arange(10, dtype=torch.float32).unsqueeze(1))
    sampler = distributed_sampler(dataset, shuffle=True, seed=3)
    sampler.set_epoch(1)
    model = wrap_ddp(torch.nn.Linear(1, 1), info)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for (x,) in torch.utils.data.DataLoader(dataset, batch_size=2, sampler=sampler):
        loss = (model(x) - 2 * x).pow(2).mean() * (info.rank + 1)  # rank-dependent loss: grads must be averaged
        opt.zero_grad()
        loss.backward()
        opt.step()
    manager = CheckpointManager(out / "checkpoints")
    manager.save(model, {"epoch": 0}, epoch=0)
    barrier()
    result = {
        "rank": get_rank(),
        "world_size": get_world_size(),
        "is_main": is_main_process(),
        "indices": list(iter(sampler)),
        "sum": all_reduce_sum(float(info.rank + 1)),
        "mean_tensor": all_reduce_mean(torch.tensor([float(info.rank), 10.0])).tolist(),
        "weights": [p.detach().flatten().tolist() for p in unwrap_model(model).parameters()],
        "marker": write_marker(out),
        "checkpoint_writer": manager.is_writer,
    }
    (out / f"rank{info.rank}.json").write_text(json.dumps(result))
    cleanup_distributed()
    (out / f"rank{info.rank}.done").write_text("left the process group\n")
    return 0


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    # Leave without the interpreter's teardown: with the group already destroyed, gloo's background threads can still
    # abort the exit of a finished rank ("terminate called without an active exception", SIGABRT), seen once in a
    # fresh-clone CI run after both ranks had written their results. Nothing is left to flush or close here.
    os._exit(code)
