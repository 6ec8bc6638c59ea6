"""implant_dims training stages end to end on the tiny config: the classifier's and the regressors' outputs (metrics,
reports recomputed independently from the best checkpoint), the unfreezing schedule and the feature cache, the
class-list guard, the cross-attention / thread-head variant, and training on a records file with bad rows."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from common.checkpoint import load_checkpoint, read_meta
from common.config import load_config
from common.logs import read_metrics
from common.seed import seed_everything
from implant_dims import train_classifier, train_dual, train_regression
from implant_dims.config import ImplantConfig
from implant_dims.data import class_list, load_records
from implant_dims.engine import Runtime
from implant_dims.regression import (
    build_regressor,
    make_dataset,
    predict_dataset,
    read_classifiers,
    regressor_from_checkpoint,
)
from implant_dims.sample_data import write_dicom
from implant_dims.stage_setup import build_classifier_from_meta, class_indices

SPLITS = ("val", "test", "unseen")
SPLIT_FILES = {"train": "augmented_train.json", "val": "augmented_val.json", "test": "test.json",
               "unseen": "unseen_test.json"}
CPU = Runtime(dist=None, device=torch.device("cpu"), amp_dtype=None)  # type: ignore[arg-type]


def strict_json(path: Path) -> dict:
    """Parse a report, refusing NaN / Infinity (which json.loads would otherwise accept)."""
    def refuse(name: str):
        raise AssertionError(f"{path}: non-finite constant {name}")
    return json.loads(path.read_text(), parse_constant=refuse)


def classifier_args(implant_data: Path, trained_run: Path, stage_args, runs: Path, name: str, *extra: str) -> list[str]:
    """A new run dir reusing trained_run's two classifiers (so only the regressor trains)."""
    return stage_args(implant_data, runs, name,
                      f"regression.company_checkpoint={trained_run / 'classifier_company' / 'checkpoints' / 'best'}",
                      f"regression.model_checkpoint={trained_run / 'classifier_model_type' / 'checkpoints' / 'best'}",
                      *extra)


# ------------------------------------------------------------------------------------------------- classifier


def tensorboard_events(folder: Path):
    """The event files in `folder`/tensorboard as TensorBoard reads them (every event kept, duplicates included)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder / "tensorboard"), size_guidance={"scalars": 0}, purge_orphaned_data=False)
    events.Reload()
    return events


@pytest.mark.parametrize("target", ["company", "model_type"])
def test_classifier_metrics_and_reports(trained_run: Path, implant_data: Path, target: str) -> None:
    out = trained_run / f"classifier_{target}"
    metrics = read_metrics(out / "metrics.jsonl")
    assert [m["epoch"] for m in metrics] == [1, 2]  # tiny: classifier.epochs=2, one line each
    assert all(0.0 <= m["val_accuracy"] <= 1.0 and np.isfinite(m["train_loss"]) for m in metrics)
    assert sum(m["best"] for m in metrics) >= 1 and metrics[0]["best"]
    # the same numbers in TensorBoard (<stage>/tensorboard), one point per epoch; `best` (a bool) stays in the jsonl
    events = tensorboard_events(out)
    assert {"train/loss", "val/accuracy", "run/lr", "run/seconds"} <= set(events.Tags()["scalars"])
    assert not any("best" in tag for tag in events.Tags()["scalars"])
    for tag, key in (("train/loss", "train_loss"), ("val/accuracy", "val_accuracy")):
        assert [p.step for p in events.Scalars(tag)] == [1, 2]
        assert [p.value for p in events.Scalars(tag)] == pytest.approx([m[key] for m in metrics], rel=1e-6)

    meta = read_meta(out / "checkpoints" / "best")
    classes = meta["classes"]
    train_records, _ = load_records(implant_data / SPLIT_FILES["train"])
    assert classes == class_list(train_records, target)
    train_labels = class_indices(train_records, target, classes)
    majority = int(np.bincount(train_labels, minlength=len(classes)).argmax())
    best_val_acc = max(m["val_accuracy"] for m in metrics)

    model = build_classifier_from_meta(meta)
    load_checkpoint(out / "checkpoints" / "best", model)
    model.eval()
    for split in SPLITS:
        rep = strict_json(out / "reports" / f"results_{split}.json")
        records, _ = load_records(implant_data / SPLIT_FILES[split])
        labels = class_indices(records, target, classes)
        known = labels >= 0
        confusion = np.array(rep["confusion"])
        assert confusion.shape == (len(classes), len(classes))
        assert confusion.sum() == rep["n"] == int(known.sum()), split
        assert rep["n"] + rep["n_unknown_label"] == len(records)
        assert rep["accuracy"] == pytest.approx(np.trace(confusion) / confusion.sum())
        assert rep["accuracy"] <= rep["top3_accuracy"] <= 1.0
        assert rep["majority_accuracy"] == pytest.approx(float((labels[known] == majority).mean()))
        assert rep["classes"] == classes and rep["split"] == split and rep["target"] == target
        # the report is of the best checkpoint: recompute the accuracy and the confusion matrix from its weights (the
        # report's predict_logits also runs all n <= 128 images as one float32 CPU batch: the same arithmetic)
        dataset = make_dataset(records, {"embedders": {}}, 32)
        with torch.no_grad():
            logits = model(torch.stack([dataset[i]["image"] for i in range(len(dataset))]))
        pred = logits.argmax(1).numpy()
        expected = np.zeros_like(confusion)
        np.add.at(expected, (labels[known], pred[known]), 1)
        assert (confusion == expected).all(), split
        if split == "val":
            assert rep["accuracy"] == pytest.approx(best_val_acc)
        png = out / "reports" / f"confusion_{split}.png"
        assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------------------------------------------- regressor


def check_regressor_reports(out: Path, implant_data: Path, embedders: list[str], catalogue: bool = True) -> dict:
    """Every report of a trained regressor, its numbers checked against an independent recomputation."""
    train_records, _ = load_records(implant_data / SPLIT_FILES["train"])
    train_targets = np.array([[r.length, r.diameter] for r in train_records])
    model, meta = regressor_from_checkpoint(out / "checkpoints" / "best")
    assert list(meta["embedders"]) == embedders
    summary = strict_json(out / "reports" / "results.json")
    assert set(summary["splits"]) == set(SPLITS)
    reports = {}
    for split in SPLITS:
        rep = strict_json(out / "reports" / f"results_{split}.json")
        records, _ = load_records(implant_data / SPLIT_FILES[split])
        true = np.array([[r.length, r.diameter] for r in records])
        assert rep["n"] == len(records)
        det = predict_dataset(model, make_dataset(records, meta, 32), CPU)
        pred = det["pred_mm"]
        err = np.abs(true - pred)
        assert rep["length_mae"] == pytest.approx(err[:, 0].mean(), abs=1e-4)
        assert rep["diameter_mae"] == pytest.approx(err[:, 1].mean(), abs=1e-4)
        assert rep["mean_mae"] == pytest.approx((rep["length_mae"] + rep["diameter_mae"]) / 2)
        base = np.abs(true - train_targets.mean(0))
        assert rep["mean_baseline_length_mae"] == pytest.approx(base[:, 0].mean())
        assert rep["mean_baseline_diameter_mae"] == pytest.approx(base[:, 1].mean())
        assert rep["mean_baseline_mean_mae"] == pytest.approx(base.mean())
        assert rep["median_baseline_mean_mae"] == pytest.approx(np.abs(true - np.median(train_targets, 0)).mean())
        assert rep["mae_ratio_to_mean_baseline"] == pytest.approx(rep["mean_mae"] / rep["mean_baseline_mean_mae"])
        for dim in ("length", "diameter"):
            low, high = rep[f"{dim}_mae_ci95"]
            assert 0 <= low <= high
        if rep.get("mc_samples"):
            for key in ("interval_coverage_raw", "interval_coverage_calibrated"):
                assert len(rep[key]) == 2 and all(0.0 <= c <= 1.0 for c in rep[key]), (split, key)
            assert all(s >= 0 for s in rep["mc_mean_std_mm"])
        # each embedding model's classifier head, read inside the regressor: its accuracy on the labelled rows
        heads = {}
        for name in embedders:
            classes = meta["embedders"][name]["classes"]
            labels = class_indices(records, name, classes)
            heads[name] = [classes[int(i)] for i in det[f"logits_{name}"].argmax(1)]
            known = labels >= 0
            expected = float((det[f"logits_{name}"].argmax(1) == labels)[known].mean())
            assert rep[f"{name}_accuracy"] == pytest.approx(expected), (split, name)
        if catalogue:
            # nearest catalogue size (per-dimension train std as the unit) under the report's one rule, recomputed
            # from catalogue.csv: the whole catalogue, or (predicted_class) the sizes of the company / model type a
            # head reads where its softmax probability is above the rule's threshold (a part the regressor lacks,
            # or one below it, matches any value)
            rule = rep["snap_rule"]
            assert rule == summary["snap_rule"] and rule["mode"] in ("catalogue", "predicted_class"), rule
            rows = [line.split(",") for line in (implant_data / "catalogue.csv").read_text().splitlines()[1:]]
            scale = train_targets.std(0)
            snapped = np.empty_like(true)
            sure = {}
            for name in embedders:
                logits = det[f"logits_{name}"].astype(np.float64)
                prob = np.exp(logits - logits.max(1, keepdims=True))
                prob = (prob / prob.sum(1, keepdims=True)).max(1)
                sure[name] = (prob > rule["min_prob"]) if rule["mode"] == "predicted_class" else np.zeros(len(prob), bool)
            for i in range(len(records)):
                company = heads["company"][i] if "company" in heads and sure["company"][i] else None
                model_type = heads["model_type"][i] if "model_type" in heads and sure["model_type"][i] else None
                options = np.array([[float(r[2]), float(r[3])] for r in rows
                                    if company in (None, r[0]) and model_type in (None, r[1])])
                snapped[i] = options[np.argmin((((options - pred[i]) / scale) ** 2).sum(1))]
            exact = np.isclose(snapped, true)
            assert rep["exact_size_accuracy"] == pytest.approx(exact.all(1).mean()), split
            assert rep["exact_length_accuracy"] == pytest.approx(exact[:, 0].mean()), split
            assert rep["exact_diameter_accuracy"] == pytest.approx(exact[:, 1].mean()), split
            assert rep["snapped"]["mean_mae"] == pytest.approx(np.abs(snapped - true).mean(), abs=1e-4), split
        png = out / "reports" / f"pred_vs_true_{split}.png"
        assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert summary["splits"][split] == rep  # exact: the same numbers written to both files
        reports[split] = rep
    return reports


def trainable_counts_from_log(log: str) -> dict[int, int]:
    return {int(s): int(n) for s, n in re.findall(r"unfreezing stage (\d) \((\d+) trainable parameters\)", log)}


def test_dual_unfreezing_schedule_and_reports(trained_run: Path, implant_data: Path) -> None:
    out = trained_run / "dual"
    metrics = read_metrics(out / "metrics.jsonl")
    # tiny: unfreeze_half_epoch=1, unfreeze_all_epoch=2 (0-based) -> epochs 1, 2, 3 are stages 0, 1, 2
    assert [(m["epoch"], m["stage"]) for m in metrics] == [(1, 0), (2, 1), (3, 2)]
    # visual.frozen_in_stage0 is false by default: the visual ViT trains from epoch 1, so nothing is cached
    assert [m["cached_features"] for m in metrics] == [False, False, False]
    for m in metrics:
        assert all(np.isfinite(m[k]) for k in ("train_loss", "val_length_mae", "val_diameter_mae", "val_mean_mae"))

    # the number of trainable parameters grows with each stage: the log agrees with the model's own count
    counts = trainable_counts_from_log((out / "train.log").read_text())
    assert sorted(counts) == [0, 1, 2]
    assert counts[0] < counts[1] < counts[2]
    model, _ = regressor_from_checkpoint(out / "checkpoints" / "best")
    total = sum(p.numel() for p in model.parameters())
    assert counts[2] == total
    for stage in (0, 1, 2):
        model.set_stage(stage, 0.5, False)
        assert sum(p.numel() for p in model.parameters() if p.requires_grad) == counts[stage]
    # stage 0: nothing of the embedders trains; stage 1 already trains part of them
    embedder_params = sum(p.numel() for p in model.embedders.parameters())
    assert counts[0] == total - embedder_params
    assert counts[1] < total

    reports = check_regressor_reports(out, implant_data, ["company", "model_type"])
    assert reports["val"]["mc_samples"] == 5
    assert read_meta(out / "checkpoints" / "best")["epoch"] == min(metrics, key=lambda m: m["val_mean_mae"])["epoch"]


def test_features_are_cached_only_while_everything_is_frozen(trained_run, implant_data, stage_args, tmp_path):
    """visual.frozen_in_stage0=true: stage 0 (epoch 1) runs on cached features, later stages on images; caching
    changes no number (the same run with regression.cache_features=false ends at the same weights)."""
    common = ("visual.frozen_in_stage0=true", "regression.mc_samples=0", "data.test_json=", "data.unseen_json=",
              "regression.epochs=2")
    runs = tmp_path / "runs"
    assert train_dual.main(classifier_args(implant_data, trained_run, stage_args, runs, "c", *common)) == 0
    assert train_dual.main(classifier_args(implant_data, trained_run, stage_args, runs, "n", *common,
                                           "regression.cache_features=false")) == 0
    cached = read_metrics(runs / "c" / "dual" / "metrics.jsonl")
    plain = read_metrics(runs / "n" / "dual" / "metrics.jsonl")
    assert [(m["stage"], m["cached_features"]) for m in cached] == [(0, True), (1, False)]
    assert [m["cached_features"] for m in plain] == [False, False]
    assert "features cached" in (runs / "c" / "dual" / "train.log").read_text()
    for a, b in zip(cached, plain, strict=True):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)
        assert a["val_mean_mae"] == pytest.approx(b["val_mean_mae"], rel=1e-5)
    wa = load_file(str(runs / "c" / "dual" / "checkpoints" / "latest" / "model.safetensors"))
    wb = load_file(str(runs / "n" / "dual" / "checkpoints" / "latest" / "model.safetensors"))
    assert wa.keys() == wb.keys()
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], atol=1e-5, rtol=1e-4, msg=key)
    # and the visual backbone really was frozen in stage 0 but trained in stage 1: no reports without test splits
    assert not (runs / "c" / "dual" / "reports" / "results_test.json").exists()
    assert (runs / "c" / "dual" / "reports" / "results_val.json").is_file()


def test_train_regression_writes_single_embedding_reports(trained_run, implant_data, stage_args, tmp_path):
    runs = tmp_path / "runs"
    args = classifier_args(implant_data, trained_run, stage_args, runs, "s", "regression.embedding=company",
                           "regression.epochs=2", "regression.mc_samples=3")
    assert train_regression.main(args) == 0
    out = runs / "s" / "single_company"
    assert [(m["epoch"], m["stage"]) for m in read_metrics(out / "metrics.jsonl")] == [(1, 0), (2, 1)]
    reports = check_regressor_reports(out, implant_data, ["company"])
    dual_val = strict_json(trained_run / "dual" / "reports" / "results_val.json")
    assert set(reports["val"]) == set(dual_val) - {"model_type_accuracy"}
    assert strict_json(out / "reports" / "results.json")["attention_type"] == "triple"
    assert not (runs / "s" / "dual").exists()


def test_cross_attention_with_the_thread_head(trained_run, implant_data, stage_args, tmp_path):
    runs = tmp_path / "runs"
    args = classifier_args(implant_data, trained_run, stage_args, runs, "x", "regression.attention_type=cross",
                           "regression.out_subdir=dual_cross", "regression.aux_thread_weight=0.5",
                           "regression.epochs=2", "regression.mc_samples=2", "data.unseen_json=")
    assert train_dual.main(args) == 0
    out = runs / "x" / "dual_cross"
    meta = read_meta(out / "checkpoints" / "best")
    train_records, _ = load_records(implant_data / SPLIT_FILES["train"])
    assert meta["attention_type"] == "cross"
    assert meta["thread_classes"] == class_list(train_records, "thread_type") and len(meta["thread_classes"]) >= 2
    weights = load_file(str(out / "checkpoints" / "latest" / "model.safetensors"))
    assert weights["thread_head.weight"].shape == (len(meta["thread_classes"]), 2 * 32)
    assert any(k.startswith("fusion.attn.") for k in weights)
    metrics = read_metrics(out / "metrics.jsonl")
    assert [m["stage"] for m in metrics] == [0, 1] and all(np.isfinite(m["train_loss"]) for m in metrics)
    for split in ("val", "test"):
        rep = strict_json(out / "reports" / f"results_{split}.json")
        assert np.isfinite(rep["mean_mae"]) and rep["n"] > 0
    assert strict_json(out / "reports" / "results.json")["attention_type"] == "cross"
    # the auxiliary loss is the thread head's only gradient: it must have moved from its initial weights
    cfg = load_config(ImplantConfig, args[1], args[2:])
    seed_everything(cfg.run.seed)
    classifiers = read_classifiers(cfg, ("company", "model_type"), train_records)
    initial, _ = build_regressor(cfg, "cross", train_records, classifiers)
    assert not torch.equal(initial.thread_head.weight.detach(), weights["thread_head.weight"])
    # (and the same init seen through a tensor the aux loss does not decide alone: the shapes agree)
    assert initial.thread_head.weight.shape == weights["thread_head.weight"].shape


# ------------------------------------------------------------------------------------------------ input errors


def test_classifier_missing_a_company_is_refused_naming_checkpoint_and_company(trained_run, implant_data, stage_args,
                                                                                tmp_path, capsys):
    rows = json.loads((implant_data / SPLIT_FILES["train"]).read_text())
    dropped = sorted({r["company"] for r in rows})[-1]
    for row in rows:
        row["image_path"] = str((implant_data / row["image_path"]).resolve())
    subset = tmp_path / "no_company.json"
    subset.write_text(json.dumps([r for r in rows if r["company"] != dropped]))
    runs = tmp_path / "runs"
    assert train_classifier.main(stage_args(implant_data, runs, "m", f"data.train_json={subset}",
                                            "classifier.epochs=1", "data.test_json=", "data.unseen_json=")) == 0
    ckpt = runs / "m" / "classifier_company" / "checkpoints" / "best"
    assert dropped not in read_meta(ckpt)["classes"]
    capsys.readouterr()
    args = stage_args(implant_data, runs, "m", f"regression.company_checkpoint={ckpt}",
                      f"regression.model_checkpoint={trained_run / 'classifier_model_type' / 'checkpoints' / 'best'}")
    assert train_dual.main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert str(ckpt) in err and repr(dropped) in err, err
    assert not (runs / "m" / "dual").exists()


def _bad_rows(implant_data: Path, folder: Path) -> list[dict]:
    good = json.loads((implant_data / SPLIT_FILES["train"]).read_text())[0]
    image = str((implant_data / good["image_path"]).resolve())
    write_dicom(folder / "empty.dcm", None, 0.1)
    return [{**good, "image_path": image, "company": ""},
            {**good, "image_path": image, "length": "abc"},
            {**good, "image_path": str(folder / "missing.png")},
            {**good, "image_path": str(folder / "empty.dcm")}]


SKIP_TEXT = ("skipped 4 of", "empty company x1", "non-numeric length x1", "missing image x1", "no pixel data x1")


def test_training_skips_bad_rows_and_logs_the_counts(trained_run, implant_data, stage_args, tmp_path):
    rows = json.loads((implant_data / SPLIT_FILES["train"]).read_text())
    for row in rows:
        row["image_path"] = str((implant_data / row["image_path"]).resolve())
    bad = _bad_rows(implant_data, tmp_path)
    train_json = tmp_path / "train_with_bad_rows.json"
    train_json.write_text(json.dumps(rows[:40] + bad[:2] + rows[40:] + bad[2:]))
    runs = tmp_path / "runs"
    extra = (f"data.train_json={train_json}", "data.test_json=", "data.unseen_json=")
    assert train_classifier.main(stage_args(implant_data, runs, "b", *extra, "classifier.epochs=1")) == 0
    log = (runs / "b" / "classifier_company" / "train.log").read_text()
    assert all(text in log for text in SKIP_TEXT), log[:2000]
    assert f"{len(rows)} train" in log
    assert train_dual.main(classifier_args(implant_data, trained_run, stage_args, runs, "b", *extra,
                                           "regression.epochs=1", "regression.mc_samples=0")) == 0
    log = (runs / "b" / "dual" / "train.log").read_text()
    assert all(text in log for text in SKIP_TEXT), log[:2000]
    assert f"{len(rows)} train" in log


@pytest.mark.parametrize("stage", ["classifier", "dual"])
def test_training_on_only_bad_rows_exits_2(trained_run, implant_data, stage_args, tmp_path, capsys, stage):
    train_json = tmp_path / "bad.json"
    train_json.write_text(json.dumps(_bad_rows(implant_data, tmp_path)))
    runs = tmp_path / "runs"
    args = classifier_args(implant_data, trained_run, stage_args, runs, "z", f"data.train_json={train_json}")
    main = train_classifier.main if stage == "classifier" else train_dual.main
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert str(train_json) in err and "no usable records" in err, err
    assert not (runs / "z").exists()
