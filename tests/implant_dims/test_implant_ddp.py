"""Two-process DDP (torch.distributed.run, gloo on CPU) of train_classifier and train_dual equals one process fed the
same global batches (batch_size doubled), and only rank 0 writes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file
from torchrun_launch import torchrun

from common.logs import read_metrics
from implant_dims import train_classifier, train_dual

# No dropout and no augmentation anywhere: then a step of 2 ranks x 16 images (gradients averaged by DDP) is a step
# of one process on the same 32 images (epoch_batches gives rank r every 2nd index of the epoch's order), up to the
# float summation order. 96 training images = 3 global batches of 32 per epoch, no padding.
CLASSIFIER = ("classifier.dropout=0", "classifier.augment=false", "classifier.epochs=2", "data.test_json=",
              "data.unseen_json=", "run.device=cpu")
DUAL = ("regression.dropout=0", "regression.augment=false", "regression.epochs=3", "regression.mc_samples=0",
        "data.test_json=", "data.unseen_json=", "run.device=cpu")


def weights(stage_dir: Path, which: str = "latest") -> dict[str, np.ndarray]:
    return load_file(str(stage_dir / "checkpoints" / which / "model.safetensors"))


def worst_difference(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> tuple[float, str]:
    assert a.keys() == b.keys()
    return max((float(np.abs(a[k] - b[k]).max()), k) for k in a)


def only_rank0_wrote(stage_dir: Path, epochs: list[int], epoch_line: str) -> None:
    metrics = read_metrics(stage_dir / "metrics.jsonl")
    assert [m["epoch"] for m in metrics] == epochs, "duplicate or missing metrics lines"
    log = (stage_dir / "train.log").read_text()
    for epoch in epochs:
        assert log.count(epoch_line.format(epoch=epoch)) == 1, log
    assert not list(stage_dir.rglob(".tmp-*")) and not list(stage_dir.rglob(".old-*"))


@pytest.fixture(scope="module")
def ddp_classifiers(implant_data, stage_args, tmp_path_factory):
    """Dropout-free classifiers of both targets, one process, batch 32 (the dual DDP test starts from them)."""
    runs = tmp_path_factory.mktemp("implant_ddp")
    for target in ("company", "model_type"):
        assert train_classifier.main(stage_args(implant_data, runs, "single", *CLASSIFIER, "classifier.batch_size=32",
                                                f"classifier.target={target}")) == 0
    return runs


def test_torchrun_classifier_equals_one_process_with_the_doubled_batch(ddp_classifiers, implant_data, stage_args):
    runs = ddp_classifiers
    done = torchrun("implant_dims.train_classifier",
                    stage_args(implant_data, runs, "ddp", *CLASSIFIER, "classifier.batch_size=16"))
    ddp, single = runs / "ddp" / "classifier_company", runs / "single" / "classifier_company"
    only_rank0_wrote(ddp, [1, 2], "company epoch {epoch}: loss")
    assert done.stderr.count("company epoch 1: loss") == 1  # rank 1 logs warnings only
    worst, key = worst_difference(weights(ddp), weights(single))
    assert worst < 1e-5, (worst, key)
    for a, b in zip(read_metrics(ddp / "metrics.jsonl"), read_metrics(single / "metrics.jsonl"), strict=True):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)
        # weights up to 1e-5 apart: a validation image on a near-tie of two logits may flip (1 of 48 = 0.021)
        assert a["val_accuracy"] == pytest.approx(b["val_accuracy"], abs=1.5 / 48)
    report = json.loads((ddp / "reports" / "results_val.json").read_text())
    assert report["n"] == 48 and np.array(report["confusion"]).sum() == 48
    single_confusion = json.loads((single / "reports" / "results_val.json").read_text())["confusion"]
    assert np.abs(np.array(report["confusion"]) - np.array(single_confusion)).sum() <= 2  # at most that one flip
    assert (ddp / "reports" / "confusion_val.png").is_file()


def test_torchrun_dual_equals_one_process_with_the_doubled_batch(ddp_classifiers, implant_data, stage_args):
    """All three unfreezing stages (the DDP module is re-wrapped at each), dropout off everywhere."""
    runs = ddp_classifiers
    ckpts = (f"regression.company_checkpoint={runs / 'single' / 'classifier_company' / 'checkpoints' / 'best'}",
             f"regression.model_checkpoint={runs / 'single' / 'classifier_model_type' / 'checkpoints' / 'best'}")
    assert train_dual.main(stage_args(implant_data, runs, "dual1", *DUAL, *ckpts, "regression.batch_size=32")) == 0
    torchrun("implant_dims.train_dual", stage_args(implant_data, runs, "dual2", *DUAL, *ckpts,
                                                   "regression.batch_size=16"))
    ddp, single = runs / "dual2" / "dual", runs / "dual1" / "dual"
    only_rank0_wrote(ddp, [1, 2, 3], "epoch {epoch} stage")
    assert [m["stage"] for m in read_metrics(ddp / "metrics.jsonl")] == [0, 1, 2]
    a, b = weights(ddp), weights(single)
    head = {k: v for k, v in a.items() if not k.startswith(("embedders.", "visual."))}
    worst, key = worst_difference(head, {k: b[k] for k in head})
    assert worst < 1e-5, (worst, key)
    worst, key = worst_difference(a, b)
    assert worst < 1e-4, (worst, key)
    for x, y in zip(read_metrics(ddp / "metrics.jsonl"), read_metrics(single / "metrics.jsonl"), strict=True):
        assert x["train_loss"] == pytest.approx(y["train_loss"], rel=1e-5)
        assert x["val_mean_mae"] == pytest.approx(y["val_mean_mae"], rel=1e-5)
    report = json.loads((ddp / "reports" / "results_val.json").read_text())
    assert report["n"] == 48 and np.isfinite(report["mean_mae"])
