"""Retrieval evaluation on a query / gallery protocol that leaves out the query's own panorama.

Every image of a split is a query; its gallery is every other image of the split **except those of the same
panorama (StreetViewID)**, the query itself included: a view from the same panorama is nearly the same photograph, and
finding it says nothing about recognising the building from elsewhere. A query whose identity has no image left in its
gallery is skipped (counted as `lone_queries`).

- recall@k: share of queries with at least one image of their identity among their k nearest gallery images.
- precision_at_1 and mean_average_precision_at_r: pytorch-metric-learning's `AccuracyCalculator`, fed the same masked
  neighbour lists through `knn_func`, with labels (identity, panorama) and a `label_comparison_fn` under which a
  gallery image is relevant when it has the query's identity and another panorama, so R counts exactly the
  relevant images of each query's own gallery.

Cosine similarity on L2-normalised vectors; ties broken by gallery order (stable sort).

    scores = retrieval_metrics(embeddings, identity, panorama)    # {"recall@1": ..., "map@r": ..., ...}
"""

from __future__ import annotations

import numpy as np
import torch
from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator
from torch.nn import functional as F

RECALL_KS = (1, 5, 10)
METRIC_NAMES = ("recall@1", "recall@5", "recall@10", "precision@1", "map@r")


def masked_neighbors(embeddings: torch.Tensor, panorama: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """(similarities [N, N], order [N, N]): each query's gallery, nearest first. Same-panorama images (the query
    included) get similarity -inf and sort last; callers drop them with `torch.isfinite`."""
    unit = F.normalize(embeddings.float(), dim=-1)
    sims = unit @ unit.T
    pano = torch.as_tensor(panorama)
    sims = sims.masked_fill(pano[:, None] == pano[None, :], float("-inf"))
    order = torch.argsort(-sims, dim=1, stable=True)
    return torch.gather(sims, 1, order), order


def _same_building_other_panorama(query: torch.Tensor, gallery: torch.Tensor) -> torch.Tensor:
    """label_comparison_fn on (identity, panorama) labels: relevant = same identity, different panorama."""
    return (query[..., 0] == gallery[..., 0]) & (query[..., 1] != gallery[..., 1])


class _PrecomputedKNN:
    """knn_func for AccuracyCalculator returning the masked neighbour lists computed once."""

    def __init__(self, sims: torch.Tensor, order: torch.Tensor) -> None:
        self.sims, self.order = sims, order

    def __call__(self, query, k, reference, ref_includes_query):  # noqa: ARG002 - AccuracyCalculator's signature
        return self.sims[:, :k], self.order[:, :k]


def retrieval_metrics(embeddings: torch.Tensor, identity: np.ndarray, panorama: np.ndarray,
                      ks: tuple[int, ...] = RECALL_KS) -> dict[str, float]:
    """recall@k, precision@1 and mAP@R of `embeddings` [N, D] on the panorama-excluding protocol (module docstring).

    Also returns `queries` (evaluated) and `lone_queries` (skipped: nothing of their identity in their gallery).
    """
    identity = np.asarray(identity, np.int64)
    panorama = np.asarray(panorama, np.int64)
    sims, order = masked_neighbors(embeddings, panorama)
    valid = torch.isfinite(sims)  # gallery positions (same-panorama images sit at the end as -inf)
    ident = torch.as_tensor(identity)
    pano = torch.as_tensor(panorama)
    relevant = (ident[order] == ident[:, None]) & (pano[order] != pano[:, None]) & valid
    has_positive = relevant.any(dim=1)
    n_queries = int(has_positive.sum())
    out: dict[str, float] = {"queries": n_queries, "lone_queries": int(len(identity) - n_queries)}
    if n_queries == 0:
        return {**out, **{name: float("nan") for name in METRIC_NAMES}}
    for k in ks:
        out[f"recall@{k}"] = float(relevant[has_positive, :k].any(dim=1).float().mean())
    labels = torch.stack([ident, pano], dim=1)
    calculator = AccuracyCalculator(include=("precision_at_1", "mean_average_precision_at_r"), k="max_bin_count",
                                    knn_func=_PrecomputedKNN(sims, order),
                                    label_comparison_fn=_same_building_other_panorama, device=torch.device("cpu"))
    scores = calculator.get_accuracy(embeddings.float(), labels, embeddings.float(), labels,
                                     ref_includes_query=False)
    out["precision@1"] = float(scores["precision_at_1"])
    out["map@r"] = float(scores["mean_average_precision_at_r"])
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
