"""Subject-grouped K-fold cross-validation over the train + tuning splits of a store (held_out is never read).

    folds = assign_folds(subject_ids, labels, k=3, seed=0)          # fold of every pooled row
    stores = materialise_folds(Path("runs/ehr_embedded/mimic/long_stay"), out_dir, k=3, seed=0)

The pooled rows are train's rows followed by tuning's, each in stored order. `assign_folds` gives every pooled row a
fold so that no subject is in two folds; it is a pure function of the rows' subjects, labels and the seed, so
optuna_worker (K fold stores, one finetune each) and baseline (`selection=grouped_cv`) cut the same folds from the same
store and seed.

`materialise_folds` writes, for fold k, a complete store `<out_dir>/fold_<k>/` whose `train` split holds the other
folds' rows and whose `tuning` split holds fold k's rows (events copied unchanged from the source arrays), with the
source code table hard-linked (copied where links are impossible) into `fold_<k>/code_table`. `folds.parquet`
records the source split, source row, subject, prediction_time, label and fold of every pooled row, and
`folds.json` the source, K, the seed and a digest of the source rows. The whole directory is built in a temporary
sibling and renamed into place, so several workers may start at once: the first rename wins, the others discard
their copy and use the winner's. An existing directory made from other source rows is refused (UserError).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd

from common.errors import UserError
from common.io import fsync_dir, write_json
from ehr_embedded.storage import CODE_TABLE_DIR, SequenceStore, open_split, write_split

POOLED_SPLITS = ("train", "tuning")
ASSIGNMENT_FILE = "folds.parquet"
MANIFEST_FILE = "folds.json"


def pooled_rows(dataset_dir: Path) -> tuple[dict[str, SequenceStore], pd.DataFrame]:
    """The train and tuning stores, and one frame row per pooled row: source split, source row index, subject_id,
    prediction_time and label (train's rows first, then tuning's)."""
    stores = {s: open_split(Path(dataset_dir), s) for s in POOLED_SPLITS}
    frames = []
    for split, store in stores.items():
        seq = store.sequences
        frames.append(pd.DataFrame({"split": split, "row": np.arange(len(store), dtype=np.int64),
                                    "subject_id": seq["subject_id"].to_numpy(),
                                    "prediction_time": seq["prediction_time"].to_numpy(), "label": store.labels}))
    return stores, pd.concat(frames, ignore_index=True)


def assign_folds(subject_ids: np.ndarray, labels: np.ndarray, k: int, seed: int, key: str = "cv_folds") -> np.ndarray:
    """Fold index (0..k-1) of every row; all rows of a subject share a fold.

    sklearn's StratifiedGroupKFold (shuffled, `random_state=seed`) rather than GroupKFold: with few subjects and a
    minority class, plain GroupKFold can leave a fold with one class and so without a tuning AUROC; stratification
    keeps each fold's positive rate near the pooled one. Float (regression) labels are not stratifiable and are
    refused. UserError naming `key` when there are fewer subjects than folds or a fold lacks a class.
    """
    from sklearn.model_selection import StratifiedGroupKFold

    subject_ids, labels = np.asarray(subject_ids), np.asarray(labels)
    if labels.ndim != 1:
        raise UserError(f"{key}: subject-grouped folds need one class label per row, but the store is multi-label; "
                        "use the tuning split instead")
    if np.issubdtype(labels.dtype, np.floating):
        raise UserError(f"{key}: subject-grouped folds are stratified by class, but the labels are float "
                        "(regression); use the tuning split instead")
    n_subjects = len(np.unique(subject_ids))
    if k < 2 or n_subjects < k:
        raise UserError(f"{key}={k}: needs 2 <= folds <= subjects ({n_subjects} subjects in train + tuning); "
                        "lower it")
    folds = np.full(len(labels), -1, np.int64)
    splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    for fold, (_, test) in enumerate(splitter.split(np.zeros(len(labels)), labels, groups=subject_ids)):
        folds[test] = fold
    n_classes = len(np.unique(labels))
    for fold in range(k):
        present = len(np.unique(labels[folds == fold]))
        if present < n_classes:
            raise UserError(f"{key}={k}: fold {fold} holds {present} of {n_classes} classes, so it has no AUROC; "
                            "lower it")
    return folds


def rows_digest(rows: pd.DataFrame) -> str:
    """SHA-256 of the pooled rows' identity (split, subject, prediction_time, label): what the folds depend on."""
    text = rows[["split", "subject_id", "prediction_time", "label"]].astype(str).to_csv(index=False)
    return hashlib.sha256(text.encode()).hexdigest()


def fold_dir_name(k: int, seed: int) -> str:
    return f"folds_k{k}_seed{seed}"


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _write_subset(directory: Path, store: dict[str, SequenceStore], picks: pd.DataFrame) -> None:
    """One split of a fold store: the pooled rows `picks` (split, row) in order, events copied unchanged."""
    seqs, token_ids, values, gaps = [], [], [], []
    for split, row in zip(picks["split"], picks["row"]):
        src = store[split]
        lo, hi = int(src.offsets[row]), int(src.offsets[row + 1])
        seqs.append(src.sequences.iloc[[row]])
        token_ids.append(np.asarray(src.token_ids[lo:hi]))
        values.append(np.asarray(src.values[lo:hi]))
        gaps.append(np.asarray(src.time_gaps[lo:hi]))
    write_split(directory, pd.concat(seqs, ignore_index=True), token_ids, values, gaps)


def materialise_folds(dataset_dir: Path, out_dir: Path, k: int, seed: int, key: str = "optuna.cv_folds") -> list[Path]:
    """The K fold stores of `dataset_dir` under `out_dir` (made once, atomically; reused when they exist)."""
    dataset_dir, out_dir = Path(dataset_dir), Path(out_dir)
    stores, rows = pooled_rows(dataset_dir)
    digest = rows_digest(rows)
    paths = [out_dir / f"fold_{f}" for f in range(k)]
    if not out_dir.exists():
        folds = assign_folds(rows["subject_id"].to_numpy(), rows["label"].to_numpy(), k, seed, key)
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = out_dir.parent / f".tmp-{out_dir.name}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        try:
            for fold in range(k):
                root = tmp / f"fold_{fold}"
                _write_subset(root / "train", stores, rows[folds != fold])
                _write_subset(root / "tuning", stores, rows[folds == fold])
                shutil.copytree(dataset_dir / CODE_TABLE_DIR, root / CODE_TABLE_DIR, copy_function=_link_or_copy)
            rows.assign(fold=folds).to_parquet(tmp / ASSIGNMENT_FILE, index=False)
            write_json(tmp / MANIFEST_FILE, {"source": str(dataset_dir), "k": k, "seed": seed, "rows_sha256": digest,
                                             "n_rows": len(rows), "fold_rows": np.bincount(folds, minlength=k).tolist(),
                                             "splitter": "sklearn StratifiedGroupKFold(shuffle=True)"})
            fsync_dir(tmp)
            os.rename(tmp, out_dir)  # fails when a racing worker renamed its copy first: use that one
        except OSError:
            if not (out_dir / MANIFEST_FILE).is_file():
                raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        fsync_dir(out_dir.parent)
    manifest_path = out_dir / MANIFEST_FILE
    if not manifest_path.is_file():
        raise UserError(f"{out_dir}: not a fold directory (no {MANIFEST_FILE}); delete it")
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    if (manifest["k"], manifest["seed"], manifest["rows_sha256"]) != (k, seed, digest):
        raise UserError(f"{out_dir}: folds made from other rows of train + tuning (or another K / seed) than "
                        f"{dataset_dir} holds now; delete {out_dir} or use a new optuna.study")
    return paths
