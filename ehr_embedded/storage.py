"""The code table and the compact per-split sequence store, plus the export to the original per-patient .pt files.

Code table (`<dir>/`): `vocab.parquet` (token_id, code, description, description_source, train_count,
value_mean, value_std, in_lm_vocab), `embeddings.npy` float32 `[V, D]`, `meta.json` (model name, dimension, ...).
Rows `0..lm_vocab_size-1` are the next-event vocabulary ([PAD]=0, [UNK]=1, then training codes); rows after it
are codes embedded from their descriptions only (unseen in training, or rarer than `min_count`).

Sequence store (`<dir>/<split>/`), one row per label, events flattened across rows::

    token_ids.npy   int32   [E]     code-table row per event
    values.npy      float32 [E]     numeric_value (NaN = none)
    time_gaps.npy   float32 [E]     hours since the previous stored event (0 for the first and for static events)
    offsets.npy     int64   [S+1]   events of sequence i are [offsets[i], offsets[i+1])
    sequences.parquet               subject_id, prediction_time, label (int64 class id, float64 regression
                                    target from a float_value label file, or for a multi-label store a fixed-size
                                    list of K int8: 1, 0, -1 = no label for that task), n_events,
                                    n_events_before_cut, n_static (static events, stored first),
                                    hours_last_event_to_prediction

A multi-label store (`data.task_labels`) also holds `<dir>/tasks.json` (the task names in label order).

12 bytes per event instead of 4 * D + 8 for the original's per-patient tensors (D = 384 or 768); arrays are
memory-mapped, so an epoch reads only what it touches. Embeddings are gathered from the table by token id on the
fly (in the model), which is what lets a 384-d and a 768-d table share one store.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from common.errors import UserError
from common.io import fsync_dir, require_finite, write_json

PAD_TOKEN, UNK_TOKEN = "[PAD]", "[UNK]"
PAD_ID, UNK_ID = 0, 1
UNK_DESCRIPTION = "unknown clinical event"
CODE_TABLE_DIR = "code_table"
PRETRAIN_SPLIT = "pretrain"  # optional: windows over whole training-split timelines, for next-event pretraining
TASKS_FILE = "tasks.json"  # a multi-label store's task names, beside the split folders
FORMAT_VERSION = 1
ARRAYS = {"token_ids": np.int32, "values": np.float32, "time_gaps": np.float32}
US_PER_HOUR = 3_600_000_000


@contextlib.contextmanager
def atomic_dir(target: Path) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success it replaces `target` (old one removed), on error it goes."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".tmp-{target.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if target.exists():
        old = target.parent / f".old-{target.name}-{os.getpid()}"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, target)
    fsync_dir(target.parent)


# --------------------------------------------------------------------------------------------- code table


@dataclass
class CodeTable:
    """Vocabulary rows and their frozen description embeddings."""

    vocab: pd.DataFrame
    embeddings: np.ndarray  # [V, D] float32
    meta: dict

    @property
    def dim(self) -> int:
        return int(self.embeddings.shape[1])

    @property
    def lm_vocab_size(self) -> int:
        return int(self.vocab["in_lm_vocab"].sum())

    def code_to_id(self) -> dict[str, int]:
        return dict(zip(self.vocab["code"], self.vocab["token_id"].astype(int)))

    def value_stats(self) -> tuple[np.ndarray, np.ndarray]:
        """Per-row numeric-value mean and std from the training split (mean 0, std 1 where unknown)."""
        mean = self.vocab["value_mean"].to_numpy(np.float32).copy()
        std = self.vocab["value_std"].to_numpy(np.float32).copy()
        unknown = ~np.isfinite(mean) | ~np.isfinite(std) | (std <= 0)
        mean[unknown & ~np.isfinite(mean)] = 0.0
        std[unknown] = 1.0
        return mean, std

    def extend(self, codes: list[str], descriptions: list[str], sources: list[str], embeddings: np.ndarray) -> CodeTable:
        """A new table with rows appended for description-only codes (not in the next-event vocabulary)."""
        start = len(self.vocab)
        extra = pd.DataFrame({
            "token_id": np.arange(start, start + len(codes), dtype=np.int32), "code": codes,
            "description": descriptions, "description_source": sources, "train_count": np.zeros(len(codes), np.int64),
            "value_mean": np.full(len(codes), np.nan, np.float32), "value_std": np.full(len(codes), np.nan, np.float32),
            "in_lm_vocab": np.zeros(len(codes), bool)})
        vocab = pd.concat([self.vocab, extra], ignore_index=True) if len(codes) else self.vocab.copy()
        emb = np.concatenate([self.embeddings, embeddings.astype(np.float32)]) if len(codes) else self.embeddings
        return CodeTable(vocab, emb, {**self.meta, "n_extension_rows": int(len(vocab) - self.lm_vocab_size)})

    def save(self, directory: Path) -> Path:
        """Write atomically into `directory` (replaced as a whole)."""
        with atomic_dir(Path(directory)) as tmp:
            self.vocab.to_parquet(tmp / "vocab.parquet", index=False)
            np.save(tmp / "embeddings.npy", np.ascontiguousarray(self.embeddings, dtype=np.float32))
            write_json(tmp / "meta.json", {**self.meta, "embedding_dim": self.dim, "n_rows": len(self.vocab),
                                           "lm_vocab_size": self.lm_vocab_size, "format_version": FORMAT_VERSION})
        return Path(directory)

    @classmethod
    def load(cls, directory: Path, mmap: bool = False) -> CodeTable:
        directory = Path(directory)
        files = [directory / n for n in ("vocab.parquet", "embeddings.npy", "meta.json")]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise UserError(f"{directory}: not a code table (missing {missing}); run "
                            f"`python -m ehr_embedded.create_vocab_embeddings --config ...` first")
        vocab = pd.read_parquet(files[0])
        embeddings = np.load(files[1], mmap_mode="r" if mmap else None)
        meta = json.loads(files[2].read_text(encoding="utf-8"))
        if embeddings.ndim != 2 or len(embeddings) != len(vocab):
            raise UserError(f"{files[1]}: shape {embeddings.shape} does not match {len(vocab)} vocabulary rows; "
                            f"rebuild the code table")
        require_finite(embeddings, files[1], what="row", row_ids=vocab["code"].to_numpy(),
                       fix="rebuild the code table with create_vocab_embeddings (and create_embeddings)")
        return cls(vocab, embeddings, meta)


# --------------------------------------------------------------------------------------------- sequence store


def label_array(values: np.ndarray) -> pa.Array:
    """A `label` column for parquet: the values as they are (int64 class ids, float64 targets), or for multi-label
    (`[N, K]`) a fixed-size list of K int8 per row (1, 0, -1 = that task has no label at this time)."""
    values = np.asarray(values)
    if values.ndim == 2:
        return pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1).astype(np.int8), pa.int8()),
                                                 values.shape[1])
    return pa.array(values)


def write_split(directory: Path, sequences: pd.DataFrame, token_ids: list[np.ndarray], values: list[np.ndarray],
                time_gaps: list[np.ndarray]) -> None:
    """Write one split's store into `directory` (which the caller makes atomic)."""
    directory.mkdir(parents=True, exist_ok=True)
    lengths = np.array([len(t) for t in token_ids], dtype=np.int64)
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    for name, parts in (("token_ids", token_ids), ("values", values), ("time_gaps", time_gaps)):
        flat = np.concatenate(parts).astype(ARRAYS[name]) if parts else np.zeros(0, ARRAYS[name])
        np.save(directory / f"{name}.npy", flat)
    np.save(directory / "offsets.npy", offsets)
    sequences = sequences.reset_index(drop=True).copy()
    sequences["n_events"] = lengths
    sequences.to_parquet(directory / "sequences.parquet", index=False)


def concat_split_parts(directory: Path, part_dirs: list[Path], token_maps: list[np.ndarray],
                       columns: list[str], block: int = 1 << 22) -> pd.DataFrame:
    """Write one split's store from per-shard parts, in part order, streaming `block` events at a time (memory stays
    bounded whatever the split's size); the files are those `write_split` writes for the same rows. Returns the
    sequences frame.

    A part (`<part>/<split>/`) holds `token_ids.npy`, `values.npy`, `time_gaps.npy`, `lengths.npy` (events per
    sequence) and `sequences.parquet` (`columns`); negative token ids `-(1 + j)` become `token_maps[i][j]` (code-table
    rows assigned when the parts were merged). Parts without this split are skipped.
    """
    directory.mkdir(parents=True, exist_ok=True)
    present = [(Path(d), m) for d, m in zip(part_dirs, token_maps) if (Path(d) / "lengths.npy").is_file()]
    part_lengths = [np.load(d / "lengths.npy") for d, _ in present]
    lengths = np.concatenate(part_lengths) if part_lengths else np.zeros(0, np.int64)
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    for name, dtype in ARRAYS.items():
        with open(directory / f"{name}.npy", "wb") as fh:
            np.lib.format.write_array_header_1_0(fh, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)),
                                                      "fortran_order": False, "shape": (int(offsets[-1]),)})
            for (part_dir, token_map), n in zip(present, part_lengths):
                if int(n.sum()) == 0:
                    continue
                part = np.load(part_dir / f"{name}.npy", mmap_mode="r")
                for lo in range(0, len(part), block):
                    chunk = np.asarray(part[lo:lo + block]).astype(dtype)
                    if name == "token_ids" and len(token_map):
                        unknown = chunk < 0
                        chunk[unknown] = token_map[-1 - chunk[unknown].astype(np.int64)]
                    fh.write(chunk.tobytes())
            fh.flush()
            os.fsync(fh.fileno())
    np.save(directory / "offsets.npy", offsets)
    if len(lengths):
        sequences = pa.concat_tables([pq.read_table(d / "sequences.parquet") for d, _ in present]).to_pandas()
    else:  # what write_split writes for a split without rows
        sequences = pd.DataFrame([], columns=columns)
        if "prediction_time" in sequences:
            sequences["prediction_time"] = sequences["prediction_time"].astype("datetime64[us]")
    sequences = sequences[columns].reset_index(drop=True).copy()
    sequences["n_events"] = lengths
    sequences.to_parquet(directory / "sequences.parquet", index=False)
    return sequences


class SequenceStore:
    """One split of the compact store, memory-mapped. `store[i]` is a dict of numpy views."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        if not (self.directory / "offsets.npy").is_file():
            raise UserError(f"{self.directory}: no sequence store here; run `python -m ehr_embedded.create_embeddings"
                            f" --config ...` first (or check data.embedding_output_dir)")
        self.token_ids = np.load(self.directory / "token_ids.npy", mmap_mode="r")
        self.values = np.load(self.directory / "values.npy", mmap_mode="r")
        self.time_gaps = np.load(self.directory / "time_gaps.npy", mmap_mode="r")
        self.offsets = np.load(self.directory / "offsets.npy")
        self.sequences = pd.read_parquet(self.directory / "sequences.parquet")
        self.lengths = np.diff(self.offsets)
        label_type = pq.read_schema(self.directory / "sequences.parquet").field("label").type
        tasks_file = self.directory.parent / TASKS_FILE
        listed = pa.types.is_fixed_size_list(label_type) or pa.types.is_list(label_type)
        self.task_names: list[str] | None = None  # a multi-label split's tasks (an empty one stores no list type)
        if tasks_file.is_file() and (listed or pa.types.is_null(label_type)):
            self.task_names = list(json.loads(tasks_file.read_text(encoding="utf-8"))["tasks"])
        elif listed:
            width = label_type.list_size if pa.types.is_fixed_size_list(label_type) else (
                len(self.sequences["label"].iloc[0]) if len(self.sequences) else 0)
            self.task_names = [f"task_{k}" for k in range(width)]
        self.is_multilabel = self.task_names is not None
        # int64 class ids, float64 regression targets (float_value labels), or [S, K] int64 multi-label (-1 missing)
        self.is_regression = not self.is_multilabel and pd.api.types.is_float_dtype(self.sequences["label"])
        if self.is_multilabel:
            self.labels = (np.stack(self.sequences["label"].to_numpy()).astype(np.int64) if len(self.sequences)
                           else np.zeros((0, len(self.task_names)), np.int64))
            if self.labels.shape[1] != len(self.task_names):
                raise UserError(f"{self.directory}/sequences.parquet: labels hold {self.labels.shape[1]} tasks but "
                                f"{tasks_file} names {len(self.task_names)}; rebuild the store with create_embeddings")
        else:
            self.labels = self.sequences["label"].to_numpy(np.float64 if self.is_regression else np.int64)
        self.hours_to_prediction = self.sequences["hours_last_event_to_prediction"].to_numpy(np.float32)
        self.n_static = (self.sequences["n_static"].to_numpy(np.int64) if "n_static" in self.sequences
                         else np.zeros(len(self.lengths), np.int64))
        self._check_finite()

    def _check_finite(self) -> None:
        """UserError naming the file and the first sequence row holding inf in `values` (NaN there means "no
        value"), or NaN / inf in `time_gaps` or the hours to prediction_time. One pass over the memory-mapped
        arrays, which an epoch reads anyway."""
        fix = "rebuild this split with create_embeddings (and check the MEDS numeric_value / time columns)"
        row_ids = list(zip(self.sequences["subject_id"].to_numpy(), self.sequences["prediction_time"].astype(str)))
        for name, bad in (("values", np.isinf(self.values)), ("time_gaps", ~np.isfinite(self.time_gaps))):
            if bad.any():
                rows = np.searchsorted(self.offsets, np.flatnonzero(bad), side="right") - 1
                per_row = np.zeros(len(self), np.float32)
                per_row[rows] = np.inf
                require_finite(per_row, self.directory / f"{name}.npy", what="sequence", row_ids=row_ids, fix=fix)
        require_finite(self.hours_to_prediction, self.directory / "sequences.parquet", what="sequence",
                       row_ids=row_ids, fix=fix)

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, i: int) -> dict:
        lo, hi = int(self.offsets[i]), int(self.offsets[i + 1])
        return {"token_ids": self.token_ids[lo:hi], "values": self.values[lo:hi], "time_gaps": self.time_gaps[lo:hi],
                "hours_last_event_to_prediction": float(self.hours_to_prediction[i]),
                "label": self.labels[i].tolist() if self.is_multilabel else self.labels[i].item(),
                "n_static": int(self.n_static[i])}

    def nbytes_on_disk(self) -> int:
        return sum(f.stat().st_size for f in self.directory.iterdir() if f.is_file())


def open_split(dataset_dir: Path, split: str) -> SequenceStore:
    return SequenceStore(Path(dataset_dir) / split)


def load_dataset_table(dataset_dir: Path) -> CodeTable:
    """The code table stored with a dataset (training vocabulary plus description-only rows)."""
    return CodeTable.load(Path(dataset_dir) / CODE_TABLE_DIR)


def export_pt(store: SequenceStore, table: CodeTable, out_dir: Path, dtype: torch.dtype = torch.float32) -> int:
    """Write the original layout: `patient_<i>.pt` = {'embeddings': (N, D), 'token_ids': (N,), 'label': ()} plus
    `subject_id` and `prediction_time` (microseconds) so rows can be matched. Returns the number of files."""
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        emb = torch.from_numpy(np.asarray(table.embeddings, dtype=np.float32))
        times = store.sequences["prediction_time"].astype("datetime64[us]").astype("int64").to_numpy()
        for i in range(len(store)):
            item = store[i]
            ids = torch.from_numpy(np.asarray(item["token_ids"], dtype=np.int64))
            torch.save({"embeddings": emb[ids].to(dtype).clone(), "token_ids": ids.clone(),
                        "label": torch.tensor(item["label"]),
                        "subject_id": torch.tensor(int(store.sequences["subject_id"].iloc[i])),
                        "prediction_time": torch.tensor(int(times[i]))}, tmp / f"patient_{i}.pt")
    return len(store)
