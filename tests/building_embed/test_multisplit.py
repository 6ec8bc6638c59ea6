"""train.multisplit: the fold plan, the paired statistics, the stage end to end on small synthetic identities (outputs,
resume, refusals) and its bad input. The learning claim on real faces is in test_be_real_faces_train.py."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
from scipy import stats

from building_embed.generate.generate_embeddings import embeddings_table
from building_embed.train import multisplit
from building_embed.train.multisplit import MultiSplitConfig, paired_summary, split_plan

torch.set_num_threads(1)

WIDTH = 16
HEAD = ["training_model.input_dim=16", "training_model.hidden_dim=32", "training_model.output_dim=8",
        "training.identities_per_batch=4", "training.views_per_identity=2", "training.batches_per_epoch=2",
        "training.epochs=2", "data.neighbors_k=5", "infrastructure.num_threads=1", "logging.level=WARNING"]


def write_merged(folder: Path, n_identities: int = 12, views: int = 4, seed: int = 0) -> Path:
    """A merged-format train.parquet of Gaussian clusters (one per identity, every image its own panorama);
    identities 0 and 1 share a place group."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_identities, WIDTH))
    identity = np.repeat(np.arange(n_identities), views)
    values = centres[identity] + 0.3 * rng.normal(size=(len(identity), WIDTH))
    group = np.where(identity == 1, 0, identity)
    ids = {"image_key": [f"faces.tar:{i:04d}.jpg" for i in range(len(identity))],
           "identity": [f"201_{i}" for i in identity], "street_view_id": np.arange(len(identity)),
           "place_group": group}
    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(embeddings_table(ids, values.astype(np.float32), {"embedding_dim": WIDTH, "dtype": "float16"}),
                   folder / "train.parquet")
    return folder


def stage_argv(root: Path, *extra: str) -> list[str]:
    return [f"paths.merged_dir={root / 'merged'}", f"paths.runs_dir={root / 'runs'}", "global.run_name=ms",
            "multisplit.folds=3", "multisplit.repeats=1", *HEAD, *extra]


def test_split_plan_holds_out_every_group_once_per_repeat_and_never_splits_a_group():
    groups = np.repeat(np.arange(10), 3)
    frame = pd.DataFrame({"place_group": groups})
    cfg = MultiSplitConfig(folds=5, repeats=2, seed=3)
    plans = split_plan(frame, cfg, val_fraction=0.2)
    assert len(plans) == 10 and [p["index"] for p in plans] == list(range(10))
    for repeat in range(2):
        tested = np.concatenate([groups[p["assignment"] == "test"] for p in plans if p["repeat"] == repeat])
        assert sorted(tested.tolist()) == sorted(groups.tolist())  # each group tested exactly once per repeat
    for plan in plans:
        a = plan["assignment"]
        assert set(np.unique(a)) == {"train", "val", "test"}
        for g in range(10):
            assert len(set(a[groups == g])) == 1, "a place group straddles two sides"
        assert (a == "test").sum() == 6  # 10 groups of 3 images in 5 folds: 2 groups each
        assert 1 <= len(np.unique(groups[a == "val"])) <= 2  # 20 % of 24 non-test images, whole groups
    again = split_plan(frame, cfg, val_fraction=0.2)
    assert all((p["assignment"] == q["assignment"]).all() for p, q in zip(plans, again))
    first, second = (np.array([p["assignment"] == "test" for p in plans if p["repeat"] == r]) for r in (0, 1))
    assert not (first == second).all(), "the two repeats dealt the folds the same way"


def test_paired_summary_is_the_t_interval_and_win_tie_loss_of_the_differences():
    frozen_map = np.array([0.50, 0.60, 0.55, 0.70])
    head_map = frozen_map + np.array([0.05, 0.02, 0.0, -0.01])
    rows = []
    for split in range(4):
        sizes = {"train_images": 60, "val_images": 20, "test_images": 20}
        rows.append({"split": split, "model": "frozen", "recall@1": 0.9, "map@r": frozen_map[split], **sizes})
        rows.append({"split": split, "model": "head", "recall@1": 0.9, "map@r": head_map[split], **sizes})
        rows.append({"split": split, "model": "pca_lda", "recall@1": 0.8, "map@r": 0.5, **sizes})
    summary = paired_summary(pd.DataFrame(rows), confidence=0.95, tie_tolerance=1e-9)
    c = summary["comparisons"]["head - frozen map@r"]
    diff = head_map - frozen_map
    half = stats.t.ppf(0.975, 3) * diff.std(ddof=1) / 2
    assert c["mean_difference"] == pytest.approx(diff.mean(), abs=1e-12)
    assert c["interval"] == pytest.approx([diff.mean() - half, diff.mean() + half], abs=1e-12)
    corrected = stats.t.ppf(0.975, 3) * diff.std(ddof=1) * np.sqrt(1 / 4 + 20 / 80)
    assert c["corrected_interval"] == pytest.approx([diff.mean() - corrected, diff.mean() + corrected], abs=1e-12)
    assert (c["wins"], c["ties"], c["losses"]) == (2, 1, 1)
    assert summary["comparisons"]["head - frozen recall@1"]["ties"] == 4
    assert summary["comparisons"]["pca_lda - frozen recall@1"]["losses"] == 4


def test_stage_writes_every_split_and_resumes_without_retraining(tmp_path, capsys):
    write_merged(tmp_path / "merged")
    assert multisplit.main(stage_argv(tmp_path)) == 0
    out = tmp_path / "runs" / "ms"
    per_split = pd.read_csv(out / "per_split.csv")
    assert sorted(per_split.split.unique()) == [0, 1, 2]
    assert sorted(per_split.model.unique()) == ["frozen", "head", "pca_lda"]
    assert (per_split.test_identities + per_split.val_identities + per_split.train_identities == 12).all()
    assert per_split.groupby("split").test_identities.first().sum() == 12  # 3 folds cover every identity once
    summary = json.loads((out / "summary.json").read_text())
    assert summary["splits"] == 3 and set(summary["comparisons"]) == {
        f"{m} - frozen {k}" for m in ("head", "pca_lda") for k in ("recall@1", "map@r")}
    for c in summary["comparisons"].values():
        assert c["wins"] + c["ties"] + c["losses"] == 3
        assert c["interval"][0] <= c["mean_difference"] <= c["interval"][1]
    assert "| head | map@r |" in (out / "summary.md").read_text()
    for k in range(3):
        split_dir = out / "splits" / f"split_{k:02d}"
        assert (split_dir / "run" / "checkpoints" / "best" / "model.safetensors").is_file()
        assert len(pd.read_csv(split_dir / "metrics.csv")) == 3

    # a finished split is read back, not retrained: its checkpoint stays untouched and the summary is the same
    best = out / "splits" / "split_01" / "run" / "checkpoints" / "best" / "model.safetensors"
    stamp = best.stat().st_mtime_ns
    (out / "summary.json").unlink()
    assert multisplit.main(stage_argv(tmp_path)) == 0
    assert best.stat().st_mtime_ns == stamp
    assert json.loads((out / "summary.json").read_text()) == summary

    # other settings on the same run: refused, naming the split and the changed key
    capsys.readouterr()
    assert multisplit.main(stage_argv(tmp_path, "training.lr=0.01")) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "split 0" in err and "training.lr" in err


def test_bad_input_is_exit_2_naming_file_or_key(tmp_path, capsys):
    assert multisplit.main(stage_argv(tmp_path)) == 2  # no merged files yet
    err = capsys.readouterr().err
    assert str(tmp_path / "merged") in err and "merge_and_split" in err and len(err.strip().splitlines()) == 1

    write_merged(tmp_path / "merged", n_identities=4)
    assert multisplit.main(stage_argv(tmp_path)) == 2  # 3 place groups, fewer than folds + 2
    err = capsys.readouterr().err
    assert "multisplit.folds=3" in err and "3 place groups" in err

    write_merged(tmp_path / "merged")
    assert multisplit.main(stage_argv(tmp_path, "training_model.input_dim=32")) == 2
    err = capsys.readouterr().err
    assert "16 wide" in err and "training_model.input_dim=16" in err

    assert multisplit.main(stage_argv(tmp_path, "multisplit.folds=1")) == 2
    assert "multisplit.folds" in capsys.readouterr().err
