"""`torchrun` DDP helpers: gloo on CPU, NCCL on GPU; rank 0 logs and writes.

    torchrun --nproc_per_node=2 -m price_fusion.train --config configs/price_fusion/train.yaml

With no torchrun environment (`WORLD_SIZE` unset or 1) every helper degrades to the single-process case.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import Dataset, DistributedSampler, Sampler

F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True)
class DistInfo:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_distributed() else int(os.environ.get("RANK", "0"))


def get_world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    return get_rank() == 0


def setup_distributed(device: str | None = None) -> DistInfo:
    """Initialise the process group from torchrun's environment variables.

    `device` None picks CUDA (one GPU per local rank, NCCL) when available, else CPU with gloo.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() if device is None else device.startswith("cuda")
    if use_cuda:
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if world_size > 1 and not is_distributed():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo", rank=rank, world_size=world_size)
    return DistInfo(rank=rank, local_rank=local_rank, world_size=world_size, device=dev)


def cleanup_distributed() -> None:
    """Leave the process group. The barrier first keeps a fast rank from tearing down gloo while a slower one
    still talks to it (seen here as `terminate called without an active exception`)."""
    if is_distributed():
        dist.barrier()
        dist.destroy_process_group()


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def wrap_ddp(model: nn.Module, info: DistInfo, **kwargs: Any) -> nn.Module:
    """DDP-wrap `model` when running with more than one process; unwrap with common.checkpoint.unwrap_model."""
    model = model.to(info.device)
    if info.world_size <= 1:
        return model
    device_ids = [info.local_rank] if info.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids, **kwargs)


class SeededSampler(Sampler[int]):
    """Single-process counterpart of DistributedSampler: a permutation drawn from `seed + epoch`.

    Deriving the order from the epoch number (not a running generator) means a resumed run sees exactly the
    order the uninterrupted run would have seen.
    """

    def __init__(self, data_source_len: int, shuffle: bool = True, seed: int = 0) -> None:
        self.length = data_source_len
        self.shuffle = shuffle
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        if not self.shuffle:
            return iter(range(self.length))
        gen = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(self.length, generator=gen).tolist())

    def __len__(self) -> int:
        return self.length


def distributed_sampler(dataset: Dataset, shuffle: bool = True, seed: int = 0, drop_last: bool = False) -> Sampler:
    """A DistributedSampler across ranks, or a SeededSampler in a single process; call `set_epoch` each epoch."""
    if get_world_size() > 1:
        return DistributedSampler(dataset, shuffle=shuffle, seed=seed, drop_last=drop_last)
    return SeededSampler(len(dataset), shuffle=shuffle, seed=seed)  # type: ignore[arg-type]


def _reduce(value: torch.Tensor | float, op: Any, average: bool) -> torch.Tensor | float:
    if not is_distributed():
        return value
    is_tensor = isinstance(value, torch.Tensor)
    tensor = value.detach().clone() if is_tensor else torch.tensor(float(value), dtype=torch.float64)
    if dist.get_backend() == "nccl":
        tensor = tensor.cuda()
    dist.all_reduce(tensor, op=op)
    if average:
        tensor = tensor / get_world_size()
    return tensor if is_tensor else float(tensor.item())


def all_reduce_sum(value: torch.Tensor | float) -> torch.Tensor | float:
    """Sum over ranks (identity in a single process)."""
    return _reduce(value, dist.ReduceOp.SUM, average=False)


def all_reduce_mean(value: torch.Tensor | float) -> torch.Tensor | float:
    """Mean over ranks (identity in a single process)."""
    return _reduce(value, dist.ReduceOp.SUM, average=True)


def rank_part(n_rows: int, info: DistInfo, weights: torch.Tensor | None = None) -> tuple[np.ndarray, float]:
    """This rank's part of a global batch of `n_rows` rows when `batch_size` means the global batch: (positions
    rank::world_size in it, this part's share of the batch's rows, or of `weights` [n_rows] when the batch loss is
    a weighted mean). Weighting the rank's mean loss by share x world_size makes DDP's gradient average the global
    batch's gradient, so 1 and N processes take the same steps. A rank left without rows (a last batch smaller than
    the world) gets row 0 with share 0: it must still join each gradient all-reduce."""
    positions = np.arange(info.rank, n_rows, info.world_size)
    if len(positions) == 0:
        return np.zeros(1, dtype=np.int64), 0.0
    if weights is None:
        return positions, len(positions) / n_rows
    total = weights.double()
    return positions, float(total[positions].sum() / total.sum())


def main_rank_value(value: Any) -> Any:
    """Rank 0's `value` (any picklable object) on every rank; `value` itself in one process. For decisions one rank
    makes and all must follow: a sampled band, validation metrics and with them early stopping and `best`."""
    if not is_distributed():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def rank0_only(fn: F) -> F:
    """Run `fn` only on the main process; other ranks get None."""
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        return fn(*args, **kwargs) if is_main_process() else None
    return wrapper  # type: ignore[return-value]
