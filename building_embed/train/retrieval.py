"""Retrieval evaluation on a query / gallery protocol that leaves out the query's own panorama.

Every image of a split is a query; its gallery is every other image of the split **except those of the same
panorama (StreetViewID)**, the query itself included: a view from the same panorama is nearly the same photograph, and
finding it says nothing about recognising the building from elsewhere. A query whose identity has no image left in its
gallery is skipped (counted as `lone_queries`).

- recall@k: share of queries with at least one image of their identity among their k nearest gallery images.
- precision@1: share of queries whose nearest gallery image is relevant (equal to recall@1 under this protocol).
- map@r: mean average precision at R (Musgrave et al., "A Metric Learning Reality Check", 2020), R = the number of
  relevant images in the query's gallery (same identity, another panorama): AP@R = (1 / R) * sum over ranks i <= R of
  precision@i for each rank i holding a relevant image. It equals pytorch-metric-learning's AccuracyCalculator
  `mean_average_precision_at_r` fed the same masked neighbour lists (tests/building_embed/test_be_bad_input.py checks it).

Cosine similarity on L2-normalised vectors; ties broken by gallery order (as a stable sort would). The N x N
similarity matrix is never built: queries go in blocks against all references, each block keeping only its top
max(k, R) neighbours (torch.topk), with the block sized so that its working memory stays under `memory_mb`
(infrastructure.eval_memory_mb in training).

    scores = retrieval_metrics(embeddings, identity, panorama)    # {"recall@1": ..., "map@r": ..., ...}
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch.nn import functional as F

RECALL_KS = (1, 5, 10)
METRIC_NAMES = ("recall@1", "recall@5", "recall@10", "precision@1", "map@r")
DEFAULT_MEMORY_MB = 512
# Working bytes per (query, reference) pair of a block: the float32 similarity and the same-panorama mask (5), and a
# margin of 3 (peak resident memory measured in tests/building_embed/test_be_bad_input.py).
BYTES_PER_PAIR = 8
# Working bytes per kept neighbour of a query: topk's values and indices, their sorted copies, labels and masks.
BYTES_PER_NEIGHBOR = 96


def relevant_counts(identity: np.ndarray, panorama: np.ndarray) -> np.ndarray:
    """R of each query [N]: images of its identity in other panoramas (its relevant gallery images)."""
    identity = np.asarray(identity, np.int64)
    _, of_identity, identity_size = np.unique(identity, return_inverse=True, return_counts=True)
    _, of_pair, pair_size = np.unique(np.stack([identity, np.asarray(panorama, np.int64)], axis=1), axis=0,
                                      return_inverse=True, return_counts=True)
    return (identity_size[of_identity.reshape(-1)] - pair_size[of_pair.reshape(-1)]).astype(np.int64)


def query_block_size(n_references: int, n_neighbors: int, memory_mb: float) -> int:
    """Queries per block so that one block's working memory stays under `memory_mb` (at least 1 query)."""
    per_query = n_references * BYTES_PER_PAIR + n_neighbors * BYTES_PER_NEIGHBOR
    return int(max(1, min(n_references, memory_mb * 2**20 // per_query)))


def top_k_stable(sims: torch.Tensor, k: int) -> torch.Tensor:
    """Gallery indices [B, k] of each row's k largest similarities, nearest first, ties in gallery order: what
    `argsort(-sims, stable=True)[:, :k]` gives, without sorting whole rows."""
    values, index = torch.topk(sims, min(k + 1, sims.shape[1]), dim=1)
    # a tie straddles the cut (the k+1-th equals the k-th): topk may have kept a later index than a stable sort
    crowded = values[:, k] == values[:, k - 1] if k < sims.shape[1] else torch.zeros(len(sims), dtype=torch.bool,
                                                                                        device=sims.device)
    values, index = values[:, :k], index[:, :k]
    index, by_position = index.sort(dim=1)
    values = values.gather(1, by_position)
    order = torch.sort(values, dim=1, descending=True, stable=True).indices
    index = index.gather(1, order)
    rows = crowded.nonzero().squeeze(1)
    chunk = max(1, len(sims) // 8)  # a whole-row sort needs ~3x a row's similarities: a few rows at a time
    for part in rows.split(chunk):  # e.g. every row when all embeddings are equal
        index[part] = torch.argsort(sims[part], dim=1, descending=True, stable=True)[:, :k]
    return index


def iter_query_blocks(unit: torch.Tensor, identity: torch.Tensor, panorama: torch.Tensor, relevant: torch.Tensor,
                      ks: tuple[int, ...], block: int) -> Iterator[tuple[slice, torch.Tensor, torch.Tensor]]:
    """Per block of queries: (rows, hits [B, len(ks)] bool, AP@R [B] float64). Only one block's [B, N]
    similarities exist at a time."""
    n = len(unit)
    for start in range(0, n, block):
        rows = slice(start, min(n, start + block))
        sims = unit[rows] @ unit.T
        sims.masked_fill_(panorama[rows, None] == panorama[None, :], float("-inf"))
        r = relevant[rows]
        k = int(min(n, max(max(ks), int(r.max()))))
        order = top_k_stable(sims, k)
        del sims
        hit = (identity[order] == identity[rows, None]) & (panorama[order] != panorama[rows, None])
        hits = torch.stack([hit[:, :kk].any(dim=1) for kk in ks], dim=1)
        rank = torch.arange(1, k + 1, device=unit.device, dtype=torch.float64)
        within_r = rank[None, :] <= r[:, None]
        precision = hit.cumsum(dim=1).double() / rank
        ap = (precision * (hit & within_r)).sum(dim=1) / r.clamp(min=1)
        yield rows, hits, ap


def retrieval_metrics(embeddings: torch.Tensor, identity: np.ndarray, panorama: np.ndarray,
                      ks: tuple[int, ...] = RECALL_KS, memory_mb: float = DEFAULT_MEMORY_MB,
                      device: torch.device | str = "cpu") -> dict[str, float]:
    """recall@k, precision@1 and mAP@R of `embeddings` [N, D] on the panorama-excluding protocol (module docstring),
    computed in query blocks whose working memory stays under `memory_mb`.

    Also returns `queries` (evaluated) and `lone_queries` (skipped: nothing of their identity in their gallery).
    """
    identity = np.asarray(identity, np.int64)
    panorama = np.asarray(panorama, np.int64)
    ks = tuple(ks)
    all_ks = ks if 1 in ks else (1, *ks)  # precision@1 needs the nearest neighbour's hit
    relevant = relevant_counts(identity, panorama)
    has_positive = relevant > 0
    n_queries = int(has_positive.sum())
    out: dict[str, float] = {"queries": n_queries, "lone_queries": int(len(identity) - n_queries)}
    if n_queries == 0:
        return {**out, **{name: float("nan") for name in METRIC_NAMES}}
    device = torch.device(device)
    unit = F.normalize(embeddings.float(), dim=-1).to(device)
    block = query_block_size(len(unit), min(len(unit), max(max(all_ks), int(relevant.max()))), memory_mb)
    hits = torch.zeros(len(all_ks), dtype=torch.float64)
    ap_sum = 0.0
    relevant_t = torch.as_tensor(relevant, device=device)
    keep = torch.as_tensor(has_positive, device=device)
    for rows, block_hits, ap in iter_query_blocks(unit, torch.as_tensor(identity, device=device),
                                                  torch.as_tensor(panorama, device=device), relevant_t, all_ks, block):
        mask = keep[rows]
        hits += block_hits[mask].sum(dim=0).double().cpu()
        ap_sum += float(ap[mask].sum())
    recall = {k: count / n_queries for k, count in zip(all_ks, hits.tolist())}
    out.update({f"recall@{k}": recall[k] for k in ks})
    out["precision@1"] = recall[1]
    out["map@r"] = ap_sum / n_queries
    return out


@torch.no_grad()
def embed(head: torch.nn.Module, embeddings: torch.Tensor, batch_size: int = 4096) -> torch.Tensor:
    """The head's unit embeddings [N, output_dim] (eval mode, on the head's device, returned on CPU)."""
    head.eval()
    device = next(head.parameters()).device
    return torch.cat([head(embeddings[i:i + batch_size].to(device)).cpu()
                      for i in range(0, len(embeddings), batch_size)])


def markdown_table(results: dict[str, dict[str, dict[str, float]]]) -> str:
    """results[split][model] -> metrics; one row per (split, model)."""
    lines = ["| split | model | queries | recall@1 | recall@5 | recall@10 | precision@1 | mAP@R |",
             "|---|---|---|---|---|---|---|---|"]
    for split, models in results.items():
        for model, m in models.items():
            lines.append(f"| {split} | {model} | {m['queries']} | " + " | ".join(f"{m[k]:.4f}" for k in METRIC_NAMES)
                         + " |")
    return "\n".join(lines) + "\n"
