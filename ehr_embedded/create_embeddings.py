"""Stage 1b: per-split patient sequences cut at each label's prediction_time, stored compactly.

    python -m ehr_embedded.create_embeddings --config configs/ehr_embedded/create_embeddings.yaml
    python -m ehr_embedded.create_embeddings --config configs/ehr_embedded/create_embeddings.yaml \
        sequences.max_length=256 sequences.export_pt=true sequences.num_workers=4

One sequence per label row: the subject's static events (null time) and then its most recent events strictly
before `prediction_time`, at most `sequences.max_length` in all (optionally also within `sequences.max_history_hours`,
with the most recent event of each `sequences.context_codes` prefix kept). Nothing at or after prediction_time enters.
Codes outside the training vocabulary get code-table rows embedded from their descriptions, so a code first seen
at inference still means something. Counted skips (report.json): labels of subjects missing from the splits file,
labels whose subject has no event before prediction_time.

Streaming and vectorised: each shard is read with pyarrow (only the four MEDS columns, in record batches, only wanted
subjects kept; groups of whole subjects of at most `sequences.chunk_events` events at a time), sorted by
(subject, time) once, and every label's window is found by one vectorised binary search on the flat arrays; no Python
loop runs per subject or per label. Each finished shard becomes an atomically written part (with the fingerprint of the labels,
splits, vocabulary and settings), so a re-run after a crash skips finished shards; `sequences.num_workers` spreads
shards over processes (and `sequences.shard_world_size` / `shard_rank` over separate jobs, a final plain run
merging). The parts are then streamed into the per-split store in shard order, which makes the result
independent of the number of processes (and byte-identical to the per-subject reference loop,
`studies/ehr_embedded/create_embeddings_loop.py`, the benchmark's baseline and the tests' oracle).
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import shutil
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from common.cli import config_main
from common.errors import UserError
from common.io import write_json
from common.logs import setup_logging
from ehr_embedded import meds_io
from ehr_embedded.config import Stage1Config
from ehr_embedded.create_vocab_embeddings import build_resolver, resolve_paths
from ehr_embedded.descriptions import TextEncoder
from ehr_embedded.storage import (
    CODE_TABLE_DIR,
    FORMAT_VERSION,
    PRETRAIN_SPLIT,
    TASKS_FILE,
    UNK_ID,
    US_PER_HOUR,
    CodeTable,
    SequenceStore,
    atomic_dir,
    concat_split_parts,
    export_pt,
    label_array,
)

log = logging.getLogger(__name__)
STATIC_TIME = np.iinfo(np.int64).min


SEQUENCE_COLUMNS = ["subject_id", "prediction_time", "label", "n_events_before_cut", "n_static",
                    "hours_last_event_to_prediction"]
READ_BATCH_ROWS = 1 << 20  # parquet rows per record batch (a few tens of MB)
PART_FORMAT = 2


@dataclass
class Plan:
    """What every shard needs; built once, pickled once per worker process."""

    vocab_codes: pa.Array         # string: the code table's codes
    vocab_ids: np.ndarray         # int32: their token ids
    label_subject: np.ndarray     # int64, sorted by subject (label order kept within a subject)
    label_us: np.ndarray          # int64 prediction_time in microseconds
    label_value: np.ndarray       # the label column as read (its dtype kept)
    label_split: np.ndarray       # int8 index into meds_io.SPLITS
    wanted: np.ndarray            # sorted int64 subjects whose events are read
    train_subjects: np.ndarray    # sorted int64 subjects that get pretraining windows
    max_length: int
    embed_unseen: bool
    pretrain_windows: bool
    max_history_us: int | None
    context_codes: tuple[str, ...]
    chunk_events: int
    fingerprint: str


# --------------------------------------------------------------------------------------------- vectorised cuts


def _ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Concatenation of `arange(starts[i], starts[i] + lengths[i])` over i, without a Python loop."""
    lengths = lengths.astype(np.int64)
    before = np.cumsum(lengths) - lengths
    return np.repeat(starts.astype(np.int64) - before, lengths) + np.arange(int(lengths.sum()), dtype=np.int64)


def _first_at_or_after(times: np.ndarray, lo: np.ndarray, hi: np.ndarray, query: np.ndarray) -> np.ndarray:
    """For each query i, the first index j in [lo[i], hi[i]) with times[j] >= query[i] (hi[i] if none), where each
    [lo, hi) range of `times` is sorted: np.searchsorted(side='left') of every query at once, by vectorised bisection
    (about log2(longest range) passes over the queries, none over the events)."""
    lo, hi = lo.astype(np.int64), hi.astype(np.int64)
    while True:
        active = lo < hi
        if not active.any():
            return lo
        mid = (lo + hi) // 2
        less = active & (times[np.where(active, mid, 0)] < query)
        lo = np.where(less, mid + 1, lo)
        hi = np.where(active & ~less, mid, hi)


def _time_gaps(flat_times: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Hours since the previous kept event (0 for a sequence's first event and around static events), for every
    sequence at once: `flat_times` concatenated, `lengths` per sequence."""
    gaps = np.zeros(len(flat_times), np.float64)
    if len(flat_times) > 1:
        timed = flat_times != STATIC_TIME
        both = np.flatnonzero(timed[1:] & timed[:-1]) + 1
        gaps[both] = (flat_times[both] - flat_times[both - 1]) / US_PER_HOUR
    starts = (np.cumsum(lengths) - lengths)[lengths > 0]
    gaps[starts] = 0.0
    return gaps.astype(np.float32)


@dataclass
class ChunkEvents:
    """Wanted events of whole subjects, sorted by (subject_id, time); static events (time = STATIC_TIME) first."""

    subject_id: np.ndarray  # int64
    time_us: np.ndarray     # int64
    token_id: np.ndarray    # int32; < 0: -(1 + index of the code in the shard's unknown-code list)
    value: np.ndarray       # float32, NaN = none
    context: np.ndarray     # int8: index of the first matching sequences.context_codes prefix, -1 none


def cut_chunk(ev: ChunkEvents, plan: Plan) -> tuple[dict[str, dict], Counter, np.ndarray]:
    """Every label cut (and pretraining window) of the subjects in `ev`, vectorised.

    Returns ({split: {"rows": {column: array}, "index": event indices, "lengths": per sequence}}, counts,
    unknown-code indices in the order the per-subject loop meets them: subject by subject, windows before label cuts).
    """
    counts: Counter = Counter()
    n = len(ev.subject_id)
    L = plan.max_length
    boundaries = np.flatnonzero(ev.subject_id[1:] != ev.subject_id[:-1]) + 1
    starts = np.concatenate([[0], boundaries]).astype(np.int64)
    ends = np.concatenate([boundaries, [n]]).astype(np.int64)
    subjects = ev.subject_id[starts]
    is_static = ev.time_us == STATIC_TIME
    n_static = _first_at_or_after(ev.time_us, starts, ends, np.full(len(starts), STATIC_TIME + 1)) - starts
    out: dict[str, dict] = {}
    order_keys = []  # (subject position, kind 0 window / 1 label, flat position) of each unknown-code event

    # ---- label cuts
    lo_lab = np.searchsorted(plan.label_subject, subjects, side="left")
    hi_lab = np.searchsorted(plan.label_subject, subjects, side="right")
    lab = _ranges(lo_lab, hi_lab - lo_lab)
    if len(lab):
        p = np.repeat(np.arange(len(starts)), hi_lab - lo_lab)
        pred = plan.label_us[lab]
        lo = starts[p]
        hi = ends[p]
        n_before = _first_at_or_after(ev.time_us, lo, hi, pred) - lo
        ns = n_static[p]
        static_kept = np.minimum(ns, L)
        window_start = np.maximum(ns, n_before - (L - static_kept))
        if plan.max_history_us is not None:
            oldest = _first_at_or_after(ev.time_us, lo, hi, pred - plan.max_history_us) - lo
            window_start = np.maximum(window_start, np.minimum(oldest, n_before))
        extra = np.full((len(lab), len(plan.context_codes)), -1, np.int64)
        for c in range(len(plan.context_codes)):
            # the most recent timed event of this context prefix before prediction_time, when outside the window
            positions = np.flatnonzero((ev.context == c) & ~is_static)
            j = np.searchsorted(positions, lo + n_before, side="left") - 1
            cand = positions[np.maximum(j, 0)] if len(positions) else np.zeros(len(lab), np.int64)
            ok = (j >= 0) & (cand >= lo) & (cand < lo + window_start)
            extra[:, c] = np.where(ok, cand - lo, -1)
        if extra.shape[1]:
            extra = np.sort(extra, axis=1)  # time order; -1 (none) first
            room = L - static_kept
            n_extra = np.minimum((extra >= 0).sum(axis=1), room)
            # the most recent n_extra of them stay; the window gives up the places they take
            keep_extra = np.arange(extra.shape[1])[None, :] >= extra.shape[1] - n_extra[:, None]
            extra = np.where(keep_extra, extra, -1)
            window_start = np.maximum(window_start, n_before - (room - n_extra))
        else:
            n_extra = np.zeros(len(lab), np.int64)
        n_window = n_before - window_start
        kept = (n_window + n_extra) > 0  # static events alone are not a history
        counts["skipped_no_events_before_prediction"] += int((~kept).sum())
        lab, p, pred, lo, n_before = lab[kept], p[kept], pred[kept], lo[kept], n_before[kept]
        static_kept, window_start, n_window, extra = static_kept[kept], window_start[kept], n_window[kept], extra[kept]
        n_extra = n_extra[kept]
        # segments per label: static events, each kept context event, then the window
        seg_start = np.column_stack([lo, lo[:, None] + np.maximum(extra, 0), lo + window_start])
        seg_len = np.column_stack([static_kept, (extra >= 0).astype(np.int64), n_window])
        index = _ranges(seg_start.ravel(), seg_len.ravel())
        lengths = seg_len.sum(axis=1)
        last_extra = lo + extra.max(axis=1, initial=-1) if extra.shape[1] else lo
        last_timed = np.where(n_window > 0, lo + n_before - 1, last_extra)
        hours = (pred - ev.time_us[last_timed]) / US_PER_HOUR
        counts["sequences_written"] += len(lab)
        counts["sequences_truncated"] += int((n_before > lengths).sum())
        split_of_label = plan.label_split[lab]
        seq_of_event = np.repeat(np.arange(len(lab)), lengths)
        unknown = np.flatnonzero(ev.token_id[index] < 0)
        order_keys.append((p[seq_of_event[unknown]], np.ones(len(unknown), np.int64), unknown, index[unknown]))
        for k, split in enumerate(meds_io.SPLITS):
            mine = split_of_label == k
            if not mine.any():
                continue
            ev_mine = np.repeat(mine, lengths)
            out[split] = {"rows": {"subject_id": subjects[p[mine]], "prediction_time": pred[mine],
                                   "label": plan.label_value[lab[mine]], "n_events_before_cut": n_before[mine],
                                   "n_static": static_kept[mine], "hours_last_event_to_prediction": hours[mine]},
                          "index": index[ev_mine], "lengths": lengths[mine]}

    # ---- pretraining windows over whole training timelines
    if plan.pretrain_windows:
        train = np.flatnonzero(np.isin(subjects, plan.train_subjects))
        size = ends[train] - starts[train]
        ns_true = n_static[train]
        ns = np.minimum(ns_true, L - 1)
        step = L - ns
        n_windows = np.where(size > ns, -(-(size - ns) // step), 0)
        w = np.repeat(np.arange(len(train)), n_windows)
        k = _ranges(np.zeros(len(train), np.int64), n_windows)
        w_ns, w_step, w_lo = ns[w], step[w], starts[train][w]
        first = w_ns + k * w_step
        last = np.minimum(first + w_step, size[w])
        seg_start = np.column_stack([w_lo, w_lo + first]).ravel()
        seg_len = np.column_stack([w_ns, last - first])
        index = _ranges(seg_start, seg_len.ravel())
        lengths = seg_len.sum(axis=1)
        n_static_w = w_ns + np.clip(np.minimum(last, ns_true[w]) - first, 0, None)
        counts["pretrain_windows"] += len(w)
        seq_of_event = np.repeat(np.arange(len(w)), lengths)
        unknown = np.flatnonzero(ev.token_id[index] < 0)
        order_keys.append((train[w][seq_of_event[unknown]], np.zeros(len(unknown), np.int64), unknown,
                           index[unknown]))
        out[PRETRAIN_SPLIT] = {"rows": {
            "subject_id": subjects[train][w], "prediction_time": ev.time_us[w_lo + last - 1] + 1,
            "label": np.zeros(len(w), np.int64), "n_events_before_cut": lengths,
            "n_static": n_static_w, "hours_last_event_to_prediction": np.zeros(len(w))},
            "index": index, "lengths": lengths}

    # unknown codes in the order the per-subject loop meets them (it numbers extension rows that way)
    first_seen = np.zeros(0, np.int64)
    if order_keys:
        subj, kind, flat, idx = (np.concatenate(parts) for parts in zip(*order_keys))
        codes = -1 - ev.token_id[idx].astype(np.int64)
        codes = codes[np.lexsort((flat, kind, subj))]
        uniq, first = np.unique(codes, return_index=True)
        first_seen = uniq[np.argsort(first)]
    return out, counts, first_seen


# --------------------------------------------------------------------------------------------- reading shards


def _open_shard(path: Path) -> pq.ParquetFile:
    """The shard's parquet file after the schema checks of meds_io.read_events (same messages)."""
    try:
        shard = pq.ParquetFile(path, read_dictionary=["code"])  # codes stay dictionary-encoded, as stored
    except (OSError, pa.ArrowException) as exc:
        raise UserError(f"{path}: cannot read parquet ({exc}); re-write the shard") from exc
    schema = shard.schema_arrow
    missing = [c for c in meds_io.EVENT_COLUMNS if c not in schema.names]
    if missing:
        hint = " (rename 'value' to 'numeric_value')" if "value" in schema.names else ""
        raise UserError(f"{path}: missing MEDS column(s) {missing}{hint}; required: {list(meds_io.EVENT_COLUMNS)}")
    sid, time_, code, value = (schema.field(c).type for c in meds_io.EVENT_COLUMNS)
    for column, dtype, ok, expected in (
            ("subject_id", sid, pa.types.is_integer(sid), "int64"),
            ("time", time_, pa.types.is_timestamp(time_), "timestamp[us]"),
            ("code", code, pa.types.is_string(code) or pa.types.is_large_string(code) or pa.types.is_dictionary(code),
             "string"),
            ("numeric_value", value, pa.types.is_floating(value) or pa.types.is_integer(value)
             or pa.types.is_null(value), "float32")):
        if not ok:
            raise UserError(f"{path}: column '{column}' has type {dtype}, expected {expected}; "
                            f"cast it when writing the MEDS shard")
    return shard


def _batches(shard: pq.ParquetFile, path: Path, columns: list[str]) -> Iterator[pa.RecordBatch]:
    try:
        yield from shard.iter_batches(batch_size=READ_BATCH_ROWS, columns=columns)
    except (OSError, pa.ArrowException) as exc:
        raise UserError(f"{path}: cannot read parquet ({exc}); re-write the shard") from exc


def _subject_groups(shard: pq.ParquetFile, path: Path, plan: Plan) -> list[np.ndarray]:
    """Sets of whole subjects, each with about `chunk_events` wanted events at most (one subject larger than that
    is a group of its own), in subject order. A shard that fits is one group and is read once."""
    if shard.metadata.num_rows <= plan.chunk_events or not len(plan.wanted):
        return [plan.wanted]
    found = []
    for batch in _batches(shard, path, ["subject_id"]):
        sid = batch.column(0).cast(pa.int64()).to_numpy()
        found.append(sid[np.isin(sid, plan.wanted)])
    subjects, per_subject = np.unique(np.concatenate(found), return_counts=True)
    group = (np.cumsum(per_subject) - 1) // plan.chunk_events
    cut = np.flatnonzero(np.diff(group)) + 1
    return [g for g in np.split(subjects, cut) if len(g)]


def _read_group(shard: pq.ParquetFile, path: Path, members: np.ndarray, plan: Plan,
                unknown: dict[str, int]) -> ChunkEvents:
    """The events of `members` from one shard, validated, codes mapped to token ids, sorted by (subject, time)."""
    parts = []
    row0 = 0
    for batch in [] if not len(members) else _batches(shard, path, list(meds_io.EVENT_COLUMNS)):
        code = batch.column("code")
        if code.null_count:
            row = row0 + int(np.flatnonzero(code.is_null().to_numpy(zero_copy_only=False))[0])
            raise UserError(f"{path}: row {row} has a null 'code'; every MEDS event needs a code")
        values = batch.column("numeric_value").cast(pa.float32()).to_numpy(zero_copy_only=False)
        if np.isinf(values).any():
            row = row0 + int(np.flatnonzero(np.isinf(values))[0])
            raise UserError(f"{path}: row {row} holds NaN or inf in numeric_value; replace the infinite numeric_value "
                            f"by a finite number or null and re-write the shard")
        row0 += batch.num_rows
        sid = batch.column("subject_id").cast(pa.int64()).to_numpy()
        at = np.minimum(np.searchsorted(members, sid), len(members) - 1)
        keep = members[at] == sid
        if not keep.any():
            continue
        code = code.filter(keep)
        encoded = code if pa.types.is_dictionary(code.type) else pc.dictionary_encode(code.cast(pa.string()))
        dictionary = encoded.dictionary.cast(pa.string())
        pos = pc.fill_null(pc.index_in(dictionary, value_set=plan.vocab_codes), -1).to_numpy()
        ids = np.where(pos >= 0, plan.vocab_ids[np.maximum(pos, 0)], -1).astype(np.int32)
        for j in np.flatnonzero(pos < 0):
            ids[j] = -1 - unknown.setdefault(dictionary[int(j)].as_py(), len(unknown))
        context = np.full(len(dictionary), -1, np.int8)
        for c in reversed(range(len(plan.context_codes))):  # the first matching prefix wins
            context[pc.starts_with(dictionary, plan.context_codes[c]).to_numpy(zero_copy_only=False)] = c
        indices = encoded.indices.to_numpy()
        parts.append((sid[keep], meds_io.time_to_int64_us(batch.column("time").filter(keep).cast(pa.timestamp("us"))),
                      ids[indices], values[keep], context[indices]))
    if not parts:
        empty = np.zeros(0, np.int64)
        return ChunkEvents(empty, empty, empty.astype(np.int32), empty.astype(np.float32), empty.astype(np.int8))
    sid, times, ids, values, context = (np.concatenate(column) for column in zip(*parts))
    same = sid[1:] == sid[:-1]
    if (sid[1:] >= sid[:-1]).all() and (times[1:][same] >= times[:-1][same]).all():
        return ChunkEvents(sid, times, ids, values, context)  # already in MEDS order (the usual case)
    order = np.argsort(times, kind="stable")  # stable twice: events at the same time keep their shard order
    order = order[np.argsort(sid[order], kind="stable")]
    return ChunkEvents(sid[order], times[order], ids[order], values[order], context[order])


# --------------------------------------------------------------------------------------------- parts


def _shard_stamp(path: Path) -> dict:
    stat = Path(path).stat()
    return {"path": str(Path(path).resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def part_is_done(part_dir: Path, path: Path, plan: Plan) -> bool:
    """A finished part of this shard with this run's fingerprint (the directory is written atomically)."""
    meta_file = part_dir / "part.json"
    if not meta_file.is_file():
        return False
    meta = json.loads(meta_file.read_text(encoding="utf-8"))
    return meta.get("fingerprint") == plan.fingerprint and meta.get("shard") == _shard_stamp(path)


def _write_chunk(directory: Path, part: dict, ids: np.ndarray, ev: ChunkEvents) -> None:
    """One group's sequences of one split: token_ids (unknown codes as -(1 + reading index)), values, time_gaps,
    lengths and sequences.parquet, the layout storage.concat_split_parts reads."""
    directory.mkdir(parents=True)
    index, lengths, rows = part["index"], part["lengths"], part["rows"]
    np.save(directory / "token_ids.npy", ids.astype(np.int32))
    np.save(directory / "values.npy", ev.value[index])
    np.save(directory / "time_gaps.npy", _time_gaps(ev.time_us[index], lengths))
    np.save(directory / "lengths.npy", lengths.astype(np.int64))
    pq.write_table(pa.table({
        "subject_id": pa.array(rows["subject_id"], pa.int64()),
        "prediction_time": pa.array(rows["prediction_time"].astype("datetime64[us]")),
        "label": label_array(rows["label"]),
        "n_events_before_cut": pa.array(rows["n_events_before_cut"], pa.int64()),
        "n_static": pa.array(rows["n_static"], pa.int64()),
        "hours_last_event_to_prediction": pa.array(rows["hours_last_event_to_prediction"], pa.float64())}),
        directory / "sequences.parquet")


def build_part(path: Path, plan: Plan, part_dir: Path) -> None:
    """Cut every label of one shard and write its part atomically: `<split>/<group>/` per group of subjects (written
    as soon as the group is cut, so a shard's sequences are never all in memory), `subjects.npy` and `part.json`
    (the unknown codes in reading order and, in the order the per-subject loop meets them, their reading indices)."""
    shard = _open_shard(path)
    unknown: dict[str, int] = {}  # unknown code -> reading index
    first_seen: dict[int, None] = {}  # reading indices in the order the per-subject loop meets them
    counts: Counter = Counter()
    subjects = []
    with atomic_dir(part_dir) as tmp:
        for group, members in enumerate(_subject_groups(shard, path, plan)):
            ev = _read_group(shard, path, members, plan, unknown)
            if not len(ev.subject_id):
                continue
            subjects.append(np.unique(ev.subject_id))
            out, chunk_counts, seen = cut_chunk(ev, plan)
            counts.update(chunk_counts)
            first_seen.update(dict.fromkeys(seen.tolist()))
            for split, part in out.items():
                ids = ev.token_id[part["index"]]
                if not plan.embed_unseen:
                    counts["events_mapped_to_unk"] += int((ids < 0).sum())
                    ids = np.where(ids < 0, UNK_ID, ids)
                _write_chunk(tmp / split / f"{group:05d}", part, ids, ev)
            del ev, out
        np.save(tmp / "subjects.npy", np.concatenate(subjects) if subjects else np.zeros(0, np.int64))
        write_json(tmp / "part.json", {"format": PART_FORMAT, "fingerprint": plan.fingerprint,
                                       "shard": _shard_stamp(path), "unknown_codes": list(unknown),
                                       "first_seen": list(first_seen) if plan.embed_unseen else [],
                                       "counts": dict(counts)})


def process_shard(index: int, path: Path, plan: Plan, parts_dir: Path) -> bool:
    """Build shard `index`'s part unless a finished one with the same fingerprint exists; True when built."""
    part_dir = parts_dir / f"shard_{index:05d}"
    if part_is_done(part_dir, path, plan):
        log.info("%s: finished part found, skipped", path)
        return False
    started = time.time()
    build_part(path, plan, part_dir)
    log.info("%s: part written in %.1f s", path, time.time() - started)
    return True


_WORKER_PLAN: Plan | None = None


def _init_worker(plan: Plan) -> None:
    global _WORKER_PLAN
    _WORKER_PLAN = plan


def _process_in_worker(index: int, path: Path, parts_dir: Path) -> bool:
    return process_shard(index, path, _WORKER_PLAN, parts_dir)


# --------------------------------------------------------------------------------------------- plan and merge


def _fingerprint(*arrays: np.ndarray, settings: dict) -> str:
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode())
    for array in arrays:
        digest.update(str(array.dtype).encode())
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


def read_plan_labels(cfg: Stage1Config) -> tuple[pd.DataFrame, list[str] | None, int, int]:
    """(label rows, the task names of a multi-label build or None, rows read, repeated rows collapsed): one task from
    data.labels_filepath (column `label`), or data.task_labels merged into one int8 column per task
    (meds_io.read_task_labels)."""
    if cfg.data.task_labels:
        labels, tasks, n_duplicates = meds_io.read_task_labels(cfg.data.task_labels)
        n_labels = len(labels) + n_duplicates
    else:
        labels, tasks = meds_io.read_labels(cfg.data.labels_filepath, cfg.sequences.label_column), None
        n_labels = len(labels)
        labels, n_duplicates = meds_io.collapse_duplicate_labels(labels, cfg.data.labels_filepath)
    if n_duplicates:
        log.warning("%d repeated (subject_id, prediction_time) label rows with the same label: collapsed", n_duplicates)
    return labels, tasks, n_labels, n_duplicates


def keep_known_subjects(labels: pd.DataFrame, split_subjects, n_labels: int, n_duplicates: int,
                        splits_path: Path | None) -> tuple[pd.DataFrame, Counter]:
    """(the label rows whose subject has a split, the label counts of report.json), warning about the others."""
    known = labels["subject_id"].isin(split_subjects)
    counts: Counter = Counter(labels_total=n_labels, labels_duplicate_collapsed=n_duplicates,
                              labels_unknown_subject=int((~known).sum()))
    if counts["labels_unknown_subject"]:
        unknown = sorted(set(labels.loc[~known, "subject_id"]))[:5]
        log.warning("%d labels name subjects absent from %s (e.g. %s): skipped", counts["labels_unknown_subject"],
                    splits_path, unknown)
    return labels[known], counts


def labels_source(cfg: Stage1Config) -> str:
    """The label file(s) for messages and the report."""
    if cfg.data.task_labels:
        return ", ".join(f"{task}={path}" for task, path in cfg.data.task_labels.items())
    return str(cfg.data.labels_filepath)


def make_plan(cfg: Stage1Config, vocab_table: CodeTable) -> tuple[Plan, pd.DataFrame, Counter]:
    """(the plan, the labels kept (for the no-event count), the label counts), with the checks and warnings of the
    label and splits files."""
    labels, tasks, n_labels, n_duplicates = read_plan_labels(cfg)
    if cfg.sequences.all_to_split:
        splits = pd.DataFrame({"subject_id": labels["subject_id"].unique(), "split": cfg.sequences.all_to_split})
        splits_path = None
    else:
        splits_path, _ = resolve_paths(cfg)
        splits = meds_io.read_splits(splits_path)
    split_index = pd.Series(pd.Categorical(splits["split"], categories=list(meds_io.SPLITS)).codes.astype(np.int8),
                            index=splits["subject_id"].to_numpy())
    labels, counts = keep_known_subjects(labels, split_index.index, n_labels, n_duplicates, splits_path)
    order = np.argsort(labels["subject_id"].to_numpy(), kind="stable")  # label order kept within a subject
    labels = labels.iloc[order].reset_index(drop=True)
    label_subject = labels["subject_id"].to_numpy(np.int64)
    label_us = labels["prediction_time"].to_numpy("datetime64[us]").astype(np.int64)
    label_value = labels[tasks].to_numpy(np.int8) if tasks else labels["label"].to_numpy()  # [N, K] multi-label
    label_split = split_index.loc[label_subject].to_numpy(np.int8) if len(labels) else np.zeros(0, np.int8)
    seq = cfg.sequences
    train_subjects = np.unique(splits.loc[splits["split"] == meds_io.SPLITS[0], "subject_id"].to_numpy(np.int64)) \
        if seq.pretrain_windows else np.zeros(0, np.int64)
    wanted = np.union1d(np.unique(label_subject), train_subjects).astype(np.int64)
    vocab_codes = pa.array(vocab_table.vocab["code"].astype(str).tolist(), pa.string())
    vocab_ids = vocab_table.vocab["token_id"].to_numpy(np.int32)
    max_history_us = None if seq.max_history_hours is None else int(round(seq.max_history_hours * US_PER_HOUR))
    settings = {"part_format": PART_FORMAT, "max_length": seq.max_length, "embed_unseen": seq.embed_unseen_codes,
                "pretrain_windows": seq.pretrain_windows, "max_history_us": max_history_us,
                "context_codes": list(seq.context_codes), "vocab_codes": vocab_table.vocab["code"].tolist(),
                "tasks": tasks}
    fingerprint = _fingerprint(label_subject, label_us, label_value, label_split, vocab_ids, train_subjects,
                               settings=settings)
    plan = Plan(vocab_codes, vocab_ids, label_subject, label_us, label_value, label_split, wanted, train_subjects,
                seq.max_length, seq.embed_unseen_codes, seq.pretrain_windows, max_history_us, tuple(seq.context_codes),
                seq.chunk_events, fingerprint)
    return plan, labels, counts


def _parts_dir(cfg: Stage1Config) -> Path:
    if cfg.sequences.parts_dir is not None:
        return Path(cfg.sequences.parts_dir)
    out = Path(cfg.data.embedding_output_dir)
    return out.parent / f"{out.name}.parts"


def _run_shards(paths: list[Path], plan: Plan, parts_dir: Path, num_workers: int, rank: int = 0,
                world_size: int = 1) -> int:
    """Build every missing part of the shards i with i % world_size == rank (in this process or `num_workers`
    spawned ones); returns how many were built."""
    parts_dir.mkdir(parents=True, exist_ok=True)
    jobs = [(i, p, parts_dir) for i, p in enumerate(paths) if i % world_size == rank]
    if num_workers <= 1 or len(paths) <= 1:
        return sum(process_shard(i, p, plan, d) for i, p, d in jobs)
    context = multiprocessing.get_context("spawn")
    with context.Pool(min(num_workers, len(paths)), initializer=_init_worker, initargs=(plan,)) as pool:
        return sum(pool.starmap(_process_in_worker, jobs, chunksize=1))


def _extension_table(cfg: Stage1Config, vocab_table: CodeTable, ext_codes: list[str], counts: Counter) -> CodeTable:
    """The code table plus description-only rows for `ext_codes` (codes outside the vocabulary)."""
    if not ext_codes:
        return vocab_table
    resolver, _ = build_resolver(cfg)
    descriptions, sources, coverage = resolver.resolve_all(ext_codes)
    encoder = TextEncoder(vocab_table.meta.get("model_name") or cfg.model.name, cfg.device,
                          cfg.model.batch_size, bool(vocab_table.meta.get("normalize", cfg.model.normalize)))
    if encoder.dim != vocab_table.dim:
        raise UserError(f"{cfg.data.vocab_embedding_path}: the code table is {vocab_table.dim}-d but "
                        f"{encoder.path} gives {encoder.dim}-d; rebuild the vocabulary with the same model")
    counts["codes_embedded_from_description_only"] = len(ext_codes)
    log.info("%d codes outside the training vocabulary embedded from descriptions %s", len(ext_codes), coverage)
    return vocab_table.extend(ext_codes, descriptions, sources, encoder.encode(descriptions))


def create_embeddings(cfg: Stage1Config) -> dict:
    """Build the store under `data.embedding_output_dir`; returns the report (also written to report.json)."""
    started = time.time()
    vocab_table = CodeTable.load(Path(cfg.data.vocab_embedding_path))
    plan, labels, counts = make_plan(cfg, vocab_table)
    tasks = list(cfg.data.task_labels) or None  # a multi-label build's tasks, in label order
    paths = meds_io.data_files(Path(cfg.data.data_dir))
    parts_dir = _parts_dir(cfg)
    seq = cfg.sequences
    built = _run_shards(paths, plan, parts_dir, seq.num_workers, seq.shard_rank, seq.shard_world_size)
    part_dirs = [parts_dir / f"shard_{i:05d}" for i in range(len(paths))]
    if seq.shard_world_size > 1:
        done = sum(part_is_done(d, p, plan) for d, p in zip(part_dirs, paths))
        log.info("rank %d of %d: %d parts built; %d of %d shards finished in %s; run again with "
                 "sequences.shard_world_size=1 to write the store", seq.shard_rank, seq.shard_world_size, built, done,
                 len(paths), parts_dir)
        return {"parts_built": built, "parts_done": done, "shards": len(paths), "parts_dir": str(parts_dir)}

    # shards must partition subjects; extension rows numbered in shard order (as the per-subject loop numbers them)
    seen = np.zeros(0, np.int64)
    extension: dict[str, int] = {}
    token_maps: list[np.ndarray] = []  # per part: reading index of an unknown code -> its code-table row
    for path, part_dir in zip(paths, part_dirs):
        meta = json.loads((part_dir / "part.json").read_text(encoding="utf-8"))
        subjects = np.load(part_dir / "subjects.npy")
        again = subjects[np.isin(subjects, seen)]
        if len(again):
            raise UserError(f"{path}: subject {int(again[0])} also appears in an earlier shard; MEDS shards must "
                            f"partition subjects (write each subject's events into one shard)")
        seen = np.union1d(seen, subjects)
        counts.update(meta["counts"])
        token_map = np.zeros(len(meta["unknown_codes"]), np.int32)
        for reading in meta["first_seen"]:
            code = meta["unknown_codes"][reading]
            token_map[reading] = extension.setdefault(code, len(vocab_table.vocab) + len(extension))
        token_maps.append(token_map)
    no_events = labels[~labels["subject_id"].isin(seen)]
    counts["skipped_no_events_before_prediction"] += len(no_events)
    counts["sequences_written"] += 0
    if cfg.sequences.pretrain_windows:
        counts["pretrain_windows"] += 0
    table = _extension_table(cfg, vocab_table, list(extension), counts)
    if counts["sequences_written"] == 0:
        raise UserError(f"{labels_source(cfg)}: no label has events before its prediction_time; check that "
                        f"labels and events use the same subject ids and time zone")

    out_dir = Path(cfg.data.embedding_output_dir)
    report = {"counts": dict(counts), "max_length": cfg.sequences.max_length, "format_version": FORMAT_VERSION,
              "data_dir": str(cfg.data.data_dir), "labels": labels_source(cfg), **({"tasks": tasks} if tasks else {}),
              "vocab_embedding_path": str(cfg.data.vocab_embedding_path),
              "sequences": {"embed_unseen_codes": cfg.sequences.embed_unseen_codes,
                            "max_history_hours": cfg.sequences.max_history_hours,
                            "context_codes": list(cfg.sequences.context_codes),
                            "label_column": cfg.sequences.label_column}}
    splits = [*meds_io.SPLITS, *([PRETRAIN_SPLIT] if cfg.sequences.pretrain_windows else [])]
    with atomic_dir(out_dir) as tmp:
        table.save(tmp / CODE_TABLE_DIR)
        if tasks:
            write_json(tmp / TASKS_FILE, {"tasks": tasks, "label_files": {t: str(p) for t, p in
                                                                          cfg.data.task_labels.items()}})
        for split in splits:
            groups = [(g, m) for d, m in zip(part_dirs, token_maps) if (d / split).is_dir()
                      for g in sorted((d / split).iterdir())]
            sequences = concat_split_parts(tmp / split, [g for g, _ in groups], [m for _, m in groups],
                                           SEQUENCE_COLUMNS)
            report[split] = {"sequences": len(sequences), "events": int(sequences["n_events"].sum())}
            if split != PRETRAIN_SPLIT and tasks:  # multi-label: positives and labelled rows per task
                values = np.stack(sequences["label"].to_numpy()) if len(sequences) else np.zeros((0, len(tasks)))
                report[split]["positives"] = dict(zip(tasks, (values == 1).sum(0).tolist()))
                report[split]["labelled"] = dict(zip(tasks, (values >= 0).sum(0).tolist()))
            elif split != PRETRAIN_SPLIT and pd.api.types.is_float_dtype(sequences["label"]):  # regression
                report[split]["label_mean"] = float(sequences["label"].mean()) if len(sequences) else None
            elif split != PRETRAIN_SPLIT:
                report[split]["positives"] = int((sequences["label"] > 0).sum())
        report["seconds"] = round(time.time() - started, 2)
        write_json(tmp / "report.json", report)
    shutil.rmtree(parts_dir, ignore_errors=True)
    if cfg.sequences.export_pt:
        for split in meds_io.SPLITS:
            export_pt(SequenceStore(out_dir / split), table, out_dir / "pt" / split)
    log.info("sequences -> %s: %s; skips %s (%d of %d shards processed, the rest reused)", out_dir,
             {s: report[s] for s in meds_io.SPLITS}, dict(counts), built, len(paths))
    return report


def run(cfg: Stage1Config) -> int:
    setup_logging()
    create_embeddings(cfg)
    return 0


main = config_main(Stage1Config, run, __doc__)

if __name__ == "__main__":
    raise SystemExit(main())
