"""torchrun DDP of the head training: one global P x K batch per step, split between ranks, with in-batch mining
over the whole batch.

    loss, value, n_triplets = global_batch_loss(train_head, objective, x, y, info)   # loss.backward() on every rank
    band = main_rank_value(bandit.select())                                          # rank 0 decides for all

Triplet mining needs every embedding of the batch, so a rank cannot take a loss of its rows alone: each rank embeds
its contiguous part of the batch, the parts are all-gathered (detached) and put back in batch order with this rank's
own part still attached to the graph, and every rank takes the whole batch's loss. The gradient a rank gets is the
loss's gradient through its own rows; the sum over ranks is the full gradient, so each rank backpropagates
world_size x the loss and DDP's average is exactly the one-process gradient (up to float summation order).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from common.distributed import DistInfo


def rank_bounds(n_rows: int, rank: int, world_size: int) -> tuple[int, int]:
    """[start, stop) of `rank`'s contiguous part of a batch of `n_rows` (sizes differ by at most one)."""
    base, extra = divmod(n_rows, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (rank < extra)


def global_batch_loss(head: torch.nn.Module, objective, x: torch.Tensor, y: torch.Tensor, info: DistInfo
                      ) -> tuple[torch.Tensor, float, int]:
    """(tensor to backpropagate, the batch's loss, mined triplets) of the global batch x [B, D], y [B].
    One process: the objective on head(x), unchanged."""
    if info.world_size == 1:
        loss, n_triplets = objective(head(x), y)
        return loss, loss.item(), n_triplets
    bounds = [rank_bounds(len(x), r, info.world_size) for r in range(info.world_size)]
    start, stop = bounds[info.rank]
    mine = head(x[start:stop])
    width = max(b - a for a, b in bounds)
    padded = mine.new_zeros(width, mine.shape[1])  # all_gather wants equal shapes
    padded[:len(mine)] = mine.detach()
    gathered = [torch.empty_like(padded) for _ in range(info.world_size)]
    dist.all_gather(gathered, padded)
    full = torch.cat([mine if r == info.rank else gathered[r][:b - a] for r, (a, b) in enumerate(bounds)])
    loss, n_triplets = objective(full, y)
    return loss * info.world_size, loss.item(), n_triplets
