"""implant_dims bad input: each case exits 2 with one stderr line naming the key (no traceback) before any work, so
nothing is written."""

from __future__ import annotations

from pathlib import Path

import pytest

from implant_dims import predict, train_classifier, train_dual, train_regression


def error_line(capsys) -> str:
    """The one non-empty stderr line of a refused stage (failing when there are more, or a traceback)."""
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


# (stage, overrides on the defaults, words the one error line must hold)
CONFIG_CASES = [
    # the default 2 warm-up epochs do not fit in 1 epoch (cosine_with_warmup raised a traceback)
    (train_classifier, ["classifier.epochs=1"], ["classifier.warmup_epochs", "classifier.epochs"]),
    (train_dual, ["regression.epochs=1"], ["regression.warmup_epochs", "regression.epochs"]),
    (train_classifier, ["classifier.warmup_epochs=-1"], ["classifier.warmup_epochs"]),
    # the input side must hold whole patches of every ViT: tiny 8 px patches, small/base/large 16 px
    (train_classifier, ["data.img_size=60"], ["data.img_size", "classifier.vit.patch_size"]),
    (train_dual, ["visual.vit.patch_size=16", "data.img_size=40"], ["data.img_size", "visual.vit.patch_size"]),
    (train_classifier, ["classifier.vit.model_size=small", "data.img_size=40"], ["data.img_size", "16"]),
    (train_classifier, ["data.img_size=0"], ["data.img_size"]),
    (train_classifier, ["classifier.vit.embed_dim=30", "classifier.vit.num_heads=4"],
     ["classifier.vit", "embed_dim", "num_heads"]),
    (train_classifier, ["classifier.batch_size=0"], ["classifier.batch_size"]),
    (train_dual, ["regression.batch_size=0"], ["regression.batch_size"]),
    (predict, ["predict.batch_size=0"], ["predict.batch_size"]),
    (train_dual, ["regression.grad_accum=0"], ["regression.grad_accum"]),
    (train_classifier, ["classifier.lr=-0.001"], ["classifier.lr"]),
    (train_dual, ["regression.lr=-0.001"], ["regression.lr"]),
    (train_dual, ["regression.embedder_lr_mult=-0.1"], ["regression.embedder_lr_mult"]),
    (train_dual, ["regression.dropout=1.0"], ["regression.dropout"]),
    # an interval of 150 % wrote NaN bounds; -1 dropout passes silently meant "no sampling"
    (predict, ["predict.interval=1.5"], ["predict.interval"]),
    (predict, ["predict.interval=0"], ["predict.interval"]),
    (predict, ["predict.mc_samples=-1"], ["predict.mc_samples"]),
    (train_dual, ["regression.interval=1.5"], ["regression.interval"]),
    (train_dual, ["regression.mc_samples=-1"], ["regression.mc_samples"]),
]


@pytest.mark.parametrize("stage, overrides, words", CONFIG_CASES,
                         ids=[f"{s.__name__.rsplit('.', 1)[-1]}:{' '.join(o)}" for s, o, _ in CONFIG_CASES])
def test_bad_config_value_exits_2_naming_the_key(stage, overrides, words, tmp_path, capsys) -> None:
    runs = tmp_path / "runs"
    capsys.readouterr()
    assert stage.main([f"run.out_dir={runs}", "run.name=bad", *overrides]) == 2
    line = error_line(capsys)
    for word in words:
        assert word in line, (word, line)
    assert overrides[-1] in line or overrides[0] in line, line  # it names what the user typed
    assert not runs.exists()  # refused while reading the config: nothing written


def test_good_edges_are_accepted() -> None:
    """The bounds themselves are valid: warm-up one epoch shorter than training, 1-image batches, 0 MC passes."""
    from common.config import load_config
    from implant_dims.config import ImplantConfig

    cfg = load_config(ImplantConfig, None, ["classifier.epochs=3", "classifier.warmup_epochs=2",
                                            "regression.epochs=1", "regression.warmup_epochs=0",
                                            "classifier.batch_size=1", "predict.mc_samples=0",
                                            "predict.interval=0.999", "data.img_size=48",
                                            "classifier.vit.model_size=small"])
    assert (cfg.classifier.epochs, cfg.classifier.warmup_epochs, cfg.predict.mc_samples) == (3, 2, 0)


@pytest.mark.parametrize("attention", ["dual", "hierarchical", "cross"])
def test_train_regression_refuses_attention_it_cannot_build(attention, tmp_path, capsys) -> None:
    """One embedding fuses by triple attention or concat only; any other type was silently trained as concat."""
    runs = tmp_path / "runs"
    capsys.readouterr()
    assert train_regression.main([f"run.out_dir={runs}", "run.name=bad",
                                  f"regression.attention_type={attention}"]) == 2
    line = error_line(capsys)
    assert "regression.attention_type" in line and attention in line and "triple" in line, line
    assert not runs.exists()


def test_dual_refuses_an_img_size_other_than_the_classifiers(trained_run: Path, implant_data, stage_args, tmp_path,
                                                              capsys) -> None:
    """Classifiers trained at 32 px (tiny.yaml) cannot embed 64 px inputs: refused before the run directory exists,
    naming data.img_size and the classifiers' size (it was a shape traceback inside the first forward pass)."""
    ckpts = [f"regression.company_checkpoint={trained_run / 'classifier_company' / 'checkpoints' / 'best'}",
             f"regression.model_checkpoint={trained_run / 'classifier_model_type' / 'checkpoints' / 'best'}"]
    capsys.readouterr()
    for stage in (train_dual, train_regression):
        assert stage.main(stage_args(implant_data, tmp_path, "r", *ckpts, "data.img_size=64",
                                     "regression.epochs=1")) == 2
        line = error_line(capsys)
        assert "data.img_size" in line and "64" in line and "32" in line, line
    assert not (tmp_path / "r").exists()


def test_vit_spec_is_the_config_section_plus_the_input_side() -> None:
    """VitSpec holds VitConfig's fields once (inherited) plus img_size: it refuses what the config refuses, and the
    dict a checkpoint's meta.json stores (written before the two classes were one) rebuilds the same spec."""
    import dataclasses

    from implant_dims.config import VitConfig
    from implant_dims.models import VitSpec

    assert [f.name for f in dataclasses.fields(VitSpec)] == [f.name for f in dataclasses.fields(VitConfig)] + [
        "img_size"]
    stored = {"model_size": "tiny", "img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2,
              "drop_rate": 0.0, "drop_path_rate": 0.0, "global_pool": "avg", "stem": "patch", "weights": ""}
    assert dataclasses.asdict(VitSpec(**stored)) == stored
    for bad, words in (({"img_size": 36}, "multiple"), ({"embed_dim": 30, "num_heads": 4}, "divisible"),
                       ({"stem": "conv", "patch_size": 6}, "power of 2"), ({"model_size": "huge"}, "model_size"),
                       ({"model_size": "small", "img_size": 40}, "multiple")):
        with pytest.raises(ValueError, match=words):
            VitSpec(**{**stored, **bad})
