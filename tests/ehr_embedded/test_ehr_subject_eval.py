"""Evaluation by subject: bootstrap intervals resample subjects, repeated label rows are collapsed or refused."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from ehr_helpers import stage1_overrides

from common import metrics
from common.errors import UserError
from ehr_embedded import create_embeddings as create_embeddings_stage
from ehr_embedded.evaluate import binary_metrics
from ehr_embedded.meds_io import collapse_duplicate_labels, read_labels


def scores(n, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    return y, np.clip(0.3 * y + rng.normal(0.35, 0.25, n), 0, 1)


def test_one_row_per_subject_equals_the_row_bootstrap():
    y, s = scores(40)
    rows = binary_metrics(y, s, 0.5, n_boot=30, seed=3)
    subjects = binary_metrics(y, s, 0.5, n_boot=30, seed=3, subject_ids=np.arange(100, 140)[::-1])
    assert rows["bootstrap"] == "rows" and subjects["bootstrap"] == "subjects" and subjects["n_subjects"] == 40
    for name in ("auroc", "auprc", "f1", "accuracy", "brier"):
        # subjects are drawn in sorted-id order; reversed ids map row i to subject 39 - i, same draws mirrored
        assert subjects[name]["value"] == pytest.approx(rows[name]["value"])
    same_order = binary_metrics(y, s, 0.5, n_boot=30, seed=3, subject_ids=np.arange(40))
    for name in ("auroc", "auprc", "f1", "accuracy", "brier"):
        assert same_order[name] == pytest.approx(rows[name])


def test_subject_bootstrap_keeps_a_subjects_rows_together():
    """One subject holds 20 of 50 rows, all positive and scored high: resampling rows treats them as 20 independent
    draws; resampling subjects draws them together, so the interval is wider. Recomputed by hand."""
    y_rest, s_rest = scores(30, seed=1)
    y = np.r_[np.ones(20, int), y_rest]
    s = np.r_[np.full(20, 0.9), s_rest]
    subject_ids = np.r_[np.zeros(20, int), np.arange(1, 31)]
    by_rows = metrics.bootstrap_ci(metrics.auroc, y, s, n_boot=200, seed=0)
    by_subjects = metrics.grouped_bootstrap_ci(metrics.auroc, y, s, groups=subject_ids, n_boot=200, seed=0)
    assert by_subjects[0] == pytest.approx(metrics.auroc(y, s))
    assert by_subjects[2] - by_subjects[1] > 1.3 * (by_rows[2] - by_rows[1]), (by_rows, by_subjects)

    # the same draws by hand: common.metrics.bootstrap_ci draws subject indices with default_rng(seed)
    rng = np.random.default_rng(0)
    groups = [np.flatnonzero(subject_ids == g) for g in range(31)]
    stats = []
    while len(stats) < 200:
        rows = np.concatenate([groups[g] for g in rng.integers(0, 31, size=31)])
        if len(np.unique(y[rows])) == 2:
            stats.append(metrics.auroc(y[rows], s[rows]))
    assert by_subjects[1:] == pytest.approx(tuple(np.quantile(stats, [0.025, 0.975])))


def test_repeated_label_rows_are_collapsed_and_conflicts_refused():
    t = pd.Timestamp("2020-01-01")
    labels = pd.DataFrame({"subject_id": [1, 1, 1, 2, 2], "prediction_time": [t, t, t + pd.Timedelta(hours=1), t, t],
                           "label": [1, 1, 0, 0, 0]})
    collapsed, dropped = collapse_duplicate_labels(labels)
    assert dropped == 2
    assert collapsed.to_dict("list") == {"subject_id": [1, 1, 2], "prediction_time": [t, t + pd.Timedelta(hours=1), t],
                                         "label": [1, 0, 0]}
    labels.loc[1, "label"] = 0
    with pytest.raises(UserError, match=r"subject_id 1 at prediction_time 2020-01-01 00:00:00 has conflicting "
                                        r"labels \[0, 1\]"):
        collapse_duplicate_labels(labels, "labels.csv")


def test_create_embeddings_counts_collapsed_duplicates_and_refuses_conflicts(built, tmp_path, capsys):
    labels = pd.read_csv(built.meds / "labels.csv")
    doubled = pd.concat([labels, labels.iloc[[5, 5, 9]]], ignore_index=True)
    doubled.to_csv(tmp_path / "doubled.csv", index=False)
    args = [*stage1_overrides(built.meds, tmp_path / "out"), f"data.vocab_embedding_path={built.vocab}",
            f"data.labels_filepath={tmp_path / 'doubled.csv'}"]
    assert create_embeddings_stage.main(args) == 0
    report = json.loads((tmp_path / "out" / "store" / "report.json").read_text())
    reference = json.loads((built.store / "report.json").read_text())
    assert report["counts"]["labels_duplicate_collapsed"] == 3
    assert report["counts"]["labels_total"] == len(labels) + 3
    for split in ("train", "tuning", "held_out"):  # the same sequences as without the repeated rows
        assert report[split] == reference[split], split
    assert len(read_labels(tmp_path / "doubled.csv")) == len(labels) + 3

    conflicting = pd.concat([labels, labels.iloc[[5]].assign(label=1 - labels.loc[5, "label"])], ignore_index=True)
    conflicting.to_csv(tmp_path / "conflicting.csv", index=False)
    assert create_embeddings_stage.main([*args[:-1], f"data.labels_filepath={tmp_path / 'conflicting.csv'}",
                                         f"data.embedding_output_dir={tmp_path / 'out2'}"]) == 2
    err = capsys.readouterr().err
    assert f"subject_id {labels.loc[5, 'subject_id']} at prediction_time" in err and "conflicting labels [0, 1]" in err
    assert not (tmp_path / "out2").exists()
