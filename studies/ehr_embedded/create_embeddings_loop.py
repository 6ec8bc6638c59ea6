"""The per-subject reference implementation of create_embeddings: pandas per shard and a Python loop per subject and
per label.

Kept only as the baseline of `benchmarks/ehr_preprocess.py` and as the oracle of
tests/ehr_embedded/test_ehr_streaming.py and test_ehr_stage1.py (the streaming `ehr_embedded.create_embeddings` must
write the same store, byte for byte). Not a stage: it is imported, never run on its own.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import pandas as pd

from common.errors import UserError
from common.io import write_json
from ehr_embedded import meds_io
from ehr_embedded.config import Stage1Config
from ehr_embedded.create_embeddings import STATIC_TIME, _extension_table, keep_known_subjects, read_plan_labels
from ehr_embedded.create_vocab_embeddings import resolve_paths
from ehr_embedded.storage import (
    CODE_TABLE_DIR,
    FORMAT_VERSION,
    PRETRAIN_SPLIT,
    UNK_ID,
    US_PER_HOUR,
    CodeTable,
    SequenceStore,
    atomic_dir,
    export_pt,
    write_split,
)

log = logging.getLogger(__name__)


def cut_indices(times_us: np.ndarray, prediction_us: int, max_length: int) -> np.ndarray:
    """Indices of the events kept for one label.

    Args:
        times_us: `[N]` int64 event times of one subject, sorted, static events (null time) as int64 min first.
        prediction_us: the label's prediction_time in microseconds.
        max_length: most events kept.
    Returns:
        `[K]` int64 indices, K <= max_length: static events first, then the most recent events with
        time < prediction_us (strictly: an event at prediction_time is not known yet).
    """
    n_static = int(np.searchsorted(times_us, STATIC_TIME, side="right"))
    n_before = int(np.searchsorted(times_us, prediction_us, side="left"))
    static_kept = min(n_static, max_length)
    timed_start = max(n_static, n_before - (max_length - static_kept))
    return np.concatenate([np.arange(static_kept), np.arange(timed_start, n_before)]).astype(np.int64)


def window_indices(times_us: np.ndarray, max_length: int) -> list[np.ndarray]:
    """A whole timeline cut into consecutive windows for next-event pretraining: each window holds the static
    events, then the next `max_length - n_static` timed events (every timed event lands in exactly one window)."""
    n_static = min(int(np.searchsorted(times_us, STATIC_TIME, side="right")), max_length - 1)
    step = max_length - n_static
    static = np.arange(n_static)
    return [np.concatenate([static, np.arange(start, min(start + step, len(times_us)))])
            for start in range(n_static, len(times_us), step)]


def time_gaps_hours(times_us: np.ndarray) -> np.ndarray:
    """`[K]` hours since the previous kept event; 0 for the first event and around static events."""
    gaps = np.zeros(len(times_us), np.float64)
    timed = times_us != STATIC_TIME
    both = timed[1:] & timed[:-1]
    gaps[1:][both] = (times_us[1:][both] - times_us[:-1][both]) / US_PER_HOUR
    return gaps.astype(np.float32)


class _SplitBuffer:
    def __init__(self) -> None:
        self.rows: list[dict] = []
        self.token_ids: list[np.ndarray] = []
        self.values: list[np.ndarray] = []
        self.gaps: list[np.ndarray] = []


def create_embeddings_loop(cfg: Stage1Config) -> dict:
    """The per-subject loop: builds the same store as `create_embeddings`; returns the report."""
    started = time.time()
    vocab_table = CodeTable.load(Path(cfg.data.vocab_embedding_path))
    code_to_id = vocab_table.code_to_id()
    splits_path, _ = resolve_paths(cfg)
    splits = meds_io.read_splits(splits_path)
    split_of = dict(zip(splits["subject_id"], splits["split"]))
    if cfg.data.task_labels:
        raise UserError("create_embeddings_loop builds single-task stores only (the benchmark's baseline and the "
                        "tests' oracle); use create_embeddings for data.task_labels")
    labels, _, n_labels, n_duplicates = read_plan_labels(cfg)
    labels, counts = keep_known_subjects(labels, list(split_of), n_labels, n_duplicates, splits_path)
    labels_by_subject = {sid: grp for sid, grp in labels.groupby("subject_id", sort=False)}
    max_length = cfg.sequences.max_length
    extension: dict[str, int] = {}
    buffers = {s: _SplitBuffer() for s in meds_io.SPLITS}
    windows = _SplitBuffer()  # pretraining windows over whole training-split timelines (no labels involved)
    train_subjects = {sid for sid, split in split_of.items() if split == meds_io.SPLITS[0]}
    wanted = set(labels_by_subject) | (train_subjects if cfg.sequences.pretrain_windows else set())
    seen_subjects: set[int] = set()

    for path in meds_io.data_files(Path(cfg.data.data_dir)):
        events = meds_io.read_events(path).to_pandas()
        # NaT (a static event) becomes int64 min, so static events sort first and count as known at any time.
        events["time_us"] = events["time"].to_numpy("datetime64[us]").astype(np.int64)
        events = events[events["subject_id"].isin(wanted)]
        events = events.sort_values(["subject_id", "time_us"], kind="stable")
        for subject_id, ev in events.groupby("subject_id", sort=False):
            if subject_id in seen_subjects:
                raise UserError(f"{path}: subject {subject_id} also appears in an earlier shard; MEDS shards must "
                                f"partition subjects (write each subject's events into one shard)")
            seen_subjects.add(subject_id)
            times = ev["time_us"].to_numpy(np.int64)
            codes = ev["code"].to_numpy(object)
            known_ids = ev["code"].map(code_to_id).fillna(-1).to_numpy(np.int64)  # -1: outside the vocabulary
            values = ev["numeric_value"].to_numpy(np.float32)

            def token_ids(idx: np.ndarray, known_ids=known_ids, codes=codes) -> np.ndarray:
                """Code-table rows of events `idx`; codes outside the vocabulary get description-only rows."""
                ids = known_ids[idx].astype(np.int32)
                for j in np.flatnonzero(ids < 0):
                    if cfg.sequences.embed_unseen_codes:
                        ids[j] = extension.setdefault(codes[idx[j]], len(vocab_table.vocab) + len(extension))
                    else:
                        ids[j] = UNK_ID
                        counts["events_mapped_to_unk"] += 1
                return ids

            if cfg.sequences.pretrain_windows and subject_id in train_subjects:
                for idx in window_indices(times, max_length):
                    windows.rows.append({"subject_id": int(subject_id), "prediction_time": pd.Timestamp(
                        int(times[idx[-1]]) + 1, unit="us"), "label": 0, "n_events_before_cut": len(idx),
                        "n_static": int((times[idx] == STATIC_TIME).sum()), "hours_last_event_to_prediction": 0.0})
                    windows.token_ids.append(token_ids(idx))
                    windows.values.append(values[idx])
                    windows.gaps.append(time_gaps_hours(times[idx]))
            buf = buffers[split_of[subject_id]]
            for label in labels_by_subject.get(subject_id, pd.DataFrame()).itertuples(index=False):
                pred_us = int(np.datetime64(label.prediction_time, "us").astype(np.int64))
                idx = cut_indices(times, pred_us, max_length)
                if not (times[idx] != STATIC_TIME).any():  # static events alone are not a history
                    counts["skipped_no_events_before_prediction"] += 1
                    continue
                ids = token_ids(idx)
                kept_times = times[idx]
                last_timed = kept_times[kept_times != STATIC_TIME]
                hours_to_pred = (pred_us - last_timed[-1]) / US_PER_HOUR if len(last_timed) else 0.0
                n_before = int(np.searchsorted(times, pred_us, side="left"))
                buf.rows.append({"subject_id": int(subject_id), "prediction_time": label.prediction_time,
                                 "label": int(label.label), "n_events_before_cut": n_before,
                                 "n_static": int((kept_times == STATIC_TIME).sum()),
                                 "hours_last_event_to_prediction": float(hours_to_pred)})
                buf.token_ids.append(ids)
                buf.values.append(values[idx])
                buf.gaps.append(time_gaps_hours(kept_times))
                counts["sequences_written"] += 1
                counts["sequences_truncated"] += int(n_before > len(idx))

    no_events = labels[~labels["subject_id"].isin(seen_subjects)]
    if cfg.sequences.pretrain_windows:
        counts["pretrain_windows"] = len(windows.rows)
    counts["skipped_no_events_before_prediction"] += len(no_events)
    # the description-only rows are not what this oracle checks: the streaming stage's own builder makes them
    table = _extension_table(cfg, vocab_table, list(extension), counts)
    if counts["sequences_written"] == 0:
        raise UserError(f"{cfg.data.labels_filepath}: no label has events before its prediction_time; check that "
                        f"labels and events use the same subject ids and time zone")

    out_dir = Path(cfg.data.embedding_output_dir)
    report = {"counts": dict(counts), "max_length": max_length, "format_version": FORMAT_VERSION,
              "data_dir": str(cfg.data.data_dir), "labels": str(cfg.data.labels_filepath),
              "vocab_embedding_path": str(cfg.data.vocab_embedding_path)}
    with atomic_dir(out_dir) as tmp:
        table.save(tmp / CODE_TABLE_DIR)
        for split, buf in buffers.items():
            seqs = pd.DataFrame(buf.rows, columns=["subject_id", "prediction_time", "label", "n_events_before_cut",
                                                   "n_static", "hours_last_event_to_prediction"])
            seqs["prediction_time"] = seqs["prediction_time"].astype("datetime64[us]")
            write_split(tmp / split, seqs, buf.token_ids, buf.values, buf.gaps)
            report[split] = {"sequences": len(buf.rows), "events": int(sum(len(t) for t in buf.token_ids)),
                             "positives": int(sum(r["label"] > 0 for r in buf.rows))}
        if cfg.sequences.pretrain_windows:
            seqs = pd.DataFrame(windows.rows, columns=["subject_id", "prediction_time", "label", "n_events_before_cut",
                                                       "n_static", "hours_last_event_to_prediction"])
            seqs["prediction_time"] = seqs["prediction_time"].astype("datetime64[us]")
            write_split(tmp / PRETRAIN_SPLIT, seqs, windows.token_ids, windows.values, windows.gaps)
            report[PRETRAIN_SPLIT] = {"sequences": len(windows.rows),
                                      "events": int(sum(len(t) for t in windows.token_ids))}
        report["seconds"] = round(time.time() - started, 2)
        write_json(tmp / "report.json", report)
    if cfg.sequences.export_pt:
        for split in meds_io.SPLITS:
            export_pt(SequenceStore(out_dir / split), table, out_dir / "pt" / split)
    log.info("sequences -> %s: %s; skips %s", out_dir, {s: report[s] for s in meds_io.SPLITS}, dict(counts))
    return report
