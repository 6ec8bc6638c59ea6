"""Torch datasets over the compact store, padding-aware batching, and the collate that builds model inputs.

A batch (all `[B, T]`, T = longest sequence in the batch, or `max_length` with `pad_to`):

    token_ids          int64    code-table rows (0 = padding)
    value_z            float32  numeric value z-scored with the code's training mean/std, clipped to +-10; 0 if none
    has_value          float32  1 where the event has a numeric value
    hours_since_prev   float32  hours since the previous event
    hours_before_pred  float32  hours between the event and prediction_time
    padding_mask       bool     True at padding (PyTorch's key_padding_mask convention)
    labels             int64    `[B]` (float32 for a float_value regression store; float32 `[B, K]` for a
                                multi-label store: 1, 0, or -1 where that task has no label)
"""

from __future__ import annotations

import functools
from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from common.errors import UserError
from ehr_embedded.storage import PAD_ID, CodeTable, SequenceStore

VALUE_CLIP = 10.0


def kept_indices(n: int, n_static: int, max_length: int | None) -> np.ndarray:
    """Indices of a stored sequence of `n` events a model with `max_length` sees: the static events (stored first),
    then the most recent events."""
    if max_length is None or n <= max_length:
        return np.arange(n)
    static = min(n_static, max_length)
    return np.concatenate([np.arange(static), np.arange(n - (max_length - static), n)])


class EventSequenceDataset(Dataset):
    """Items of one split: numpy arrays per sequence, with values normalised by the code table's statistics."""

    def __init__(self, store: SequenceStore, table: CodeTable, max_length: int) -> None:
        self.store = store
        self.max_length = max_length
        self.value_mean, self.value_std = table.value_stats()
        if len(store) and int(store.token_ids.max(initial=0)) >= len(table.vocab):
            raise UserError(f"{store.directory}: token ids exceed the code table ({len(table.vocab)} rows); "
                             f"the store and the table come from different runs of create_embeddings")

    def __len__(self) -> int:
        return len(self.store)

    @property
    def lengths(self) -> np.ndarray:
        return np.minimum(self.store.lengths, self.max_length)

    def __getitem__(self, i: int) -> dict:
        item = self.store[i]
        gaps = np.array(item["time_gaps"], dtype=np.float32)  # a copy: memory-mapped slices are read-only
        # hours before prediction: the gap after the last event plus every later gap
        hours_before = item["hours_last_event_to_prediction"] + (gaps.sum(dtype=np.float64) - np.cumsum(gaps, dtype=np.float64))
        keep = kept_indices(len(gaps), item["n_static"], self.max_length)
        ids = np.asarray(item["token_ids"], dtype=np.int64)[keep]
        values = np.asarray(item["values"], dtype=np.float32)[keep]
        gaps, hours_before = gaps[keep], hours_before[keep].astype(np.float32)
        has_value = np.isfinite(values)
        z = (values - self.value_mean[ids]) / self.value_std[ids]
        z = np.where(has_value, np.clip(z, -VALUE_CLIP, VALUE_CLIP), 0.0).astype(np.float32)
        return {"token_ids": ids, "value_z": z, "has_value": has_value.astype(np.float32),
                "hours_since_prev": gaps, "hours_before_pred": hours_before, "label": item["label"], "index": i}


def collate(items: list[dict], pad_to: int | None = None) -> dict[str, torch.Tensor]:
    """Right-pad a list of dataset items into a batch (see the module docstring)."""
    width = max(len(it["token_ids"]) for it in items)
    if pad_to is not None:
        width = max(width, pad_to)
    batch_size = len(items)
    out = {"token_ids": torch.full((batch_size, width), PAD_ID, dtype=torch.long),
           "padding_mask": torch.ones(batch_size, width, dtype=torch.bool)}
    for key in ("value_z", "has_value", "hours_since_prev", "hours_before_pred"):
        out[key] = torch.zeros(batch_size, width, dtype=torch.float32)
    for row, it in enumerate(items):
        n = len(it["token_ids"])
        out["token_ids"][row, :n] = torch.from_numpy(it["token_ids"])
        out["padding_mask"][row, :n] = False
        for key in ("value_z", "has_value", "hours_since_prev", "hours_before_pred"):
            out[key][row, :n] = torch.from_numpy(it[key])
    # float_value store: float targets; multi-label store: [B, K] floats (1, 0, -1 = no label); else class ids
    as_float = isinstance(items[0]["label"], (float, list))
    out["labels"] = torch.tensor([it["label"] for it in items], dtype=torch.float32 if as_float else torch.long)
    out["index"] = torch.tensor([it["index"] for it in items], dtype=torch.long)
    return out


class LengthBucketBatchSampler(Sampler[list[int]]):
    """Batches of similar-length sequences, in an order drawn from `seed + epoch`.

    Each epoch: shuffle all indices, cut them into pools of `pool_batches * batch_size`, sort each pool by length,
    cut pools into batches, shuffle the batch order. Padding shrinks to about the length spread inside a pool while
    batches stay random. Deriving the order from the epoch number (never a running generator) lets a resumed
    run see exactly the batches of the uninterrupted run. With `shuffle=False`: sorted by length, fixed.
    """

    def __init__(self, lengths: np.ndarray, batch_size: int, shuffle: bool = True, seed: int = 0,
                 pool_batches: int = 50, bucket: bool = True, rank: int = 0, world_size: int = 1) -> None:
        self.lengths = np.asarray(lengths)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.pool_batches = pool_batches
        self.bucket = bucket
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def batches(self) -> list[list[int]]:
        n = len(self.lengths)
        if not self.shuffle:
            order = np.argsort(self.lengths, kind="stable") if self.bucket else np.arange(n)
            return [order[i:i + self.batch_size].tolist() for i in range(0, n, self.batch_size)]
        rng = np.random.default_rng([self.seed, self.epoch])
        order = rng.permutation(n)
        if not self.bucket:
            return [order[i:i + self.batch_size].tolist() for i in range(0, n, self.batch_size)]
        pool = self.batch_size * self.pool_batches
        batches = []
        for start in range(0, n, pool):
            chunk = order[start:start + pool]
            chunk = chunk[np.argsort(self.lengths[chunk], kind="stable")]
            batches.extend(chunk[i:i + self.batch_size].tolist() for i in range(0, len(chunk), self.batch_size))
        return [batches[i] for i in rng.permutation(len(batches))]

    def __iter__(self) -> Iterator[list[int]]:
        """This rank's batches: every rank draws the same batch list and takes every world_size-th batch; the last
        `len % world_size` batches are dropped so all ranks take the same number of steps (DDP needs that)."""
        batches = self.batches()
        if self.world_size > 1:
            usable = len(batches) - len(batches) % self.world_size
            batches = batches[self.rank:usable:self.world_size]
        return iter(batches)

    def __len__(self) -> int:
        n = (len(self.lengths) + self.batch_size - 1) // self.batch_size
        return n // self.world_size if self.world_size > 1 else n


def make_loader(dataset: EventSequenceDataset, batch_size: int, shuffle: bool, seed: int = 0, bucket: bool = True,
                pad_to: int | None = None, num_workers: int = 0, rank: int = 0,
                world_size: int = 1) -> torch.utils.data.DataLoader:
    """A DataLoader with the length-bucketing batch sampler; call `loader.batch_sampler.set_epoch(e)` each epoch.
    Under DDP pass rank / world_size: each rank gets its share of the same seeded batch list."""
    sampler = LengthBucketBatchSampler(dataset.lengths, batch_size, shuffle=shuffle, seed=seed, bucket=bucket,
                                       rank=rank, world_size=world_size)
    return torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers,
                                       collate_fn=functools.partial(collate, pad_to=pad_to))
