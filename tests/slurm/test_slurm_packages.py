"""Every other package's sbatch training script, submitted to the real Slurm cluster on its sample data (tiny
settings), runs to completion and writes its trained run: price_fusion (embed, then train with afterok), cnc_gcode,
ehr_embedded (the three-config pipeline) and implant_dims. The four chains run side by side on the node.
The submit folder has no .venv: price_fusion's jobs find Python through VIRTUAL_ENV (PYTHON unset, as for a user with
a venv activated elsewhere), the others through PYTHON."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml
from conftest import REPO, assert_completed

pytestmark = [pytest.mark.slurm, pytest.mark.slow]


def price_fusion_jobs(slurm, submit_dir: Path) -> tuple[list[str], callable]:
    from price_fusion.sample_data import write_sample_data

    root = submit_dir / "data" / "price_fusion"
    paths = write_sample_data(root, 240, 60, seed=0, tiny_clip=True)
    args = [str(REPO / "configs" / "price_fusion" / "demo.yaml"), f"runs_dir={root / 'runs'}",
            f"data.train_csv={paths['train_csv']}", f"data.test_csv={paths['test_csv']}",
            f"data.image_dir={paths['image_dir']}", f"data.embeddings_dir={root / 'embeddings'}",
            f"embed.clip_model={paths['clip_model']}", "train.epochs=3", "run_name=slurm"]
    (submit_dir / "runs" / "price_fusion").mkdir(parents=True, exist_ok=True)
    scripts = REPO / "scripts" / "price_fusion" / "slurm"
    # an activated venv outside the submit folder, and no PYTHON: the jobs must not look for ./.venv
    venv = {**{k: v for k, v in slurm.env.items() if k != "PYTHON"}, "VIRTUAL_ENV": sys.prefix}
    embed = slurm.submit(scripts / "embed.sbatch", *args, cwd=submit_dir, env=venv)
    train = slurm.submit(scripts / "train.sbatch", *args, cwd=submit_dir, options=(f"--dependency=afterok:{embed}",),
                         env=venv)

    def check() -> None:
        run = root / "runs" / "slurm"
        assert (run / "checkpoints" / "best" / "model.safetensors").is_file()
        predicted = pd.read_csv(run / "predictions" / "test_out.csv", dtype={"sample_id": str})
        tested = pd.read_csv(paths["test_csv"], dtype={"sample_id": str})
        assert predicted["sample_id"].tolist() == tested["sample_id"].tolist()
        assert (predicted["price"] > 0).all()
    return [embed, train], check


def cnc_gcode_jobs(slurm, submit_dir: Path) -> tuple[list[str], callable]:
    from cnc_gcode.sample_data import make_dataset

    root = submit_dir / "data" / "cnc_gcode"
    make_dataset(root, n_programs=10, seed=3)
    args = [str(REPO / "configs" / "cnc_gcode" / "tiny.yaml"), f"run.out_dir={root / 'runs'}", "run.name=slurm",
            f"data.train_path={root / 'train.npz'}", f"data.val_path={root / 'val.npz'}",
            f"data.test_path={root / 'test.npz'}", "encoder_train.epochs=2", "train.epochs=2"]
    (submit_dir / "runs" / "cnc_gcode").mkdir(parents=True, exist_ok=True)
    job = slurm.submit(REPO / "scripts" / "cnc_gcode" / "slurm" / "train.sbatch", *args, cwd=submit_dir)

    def check() -> None:
        reports = root / "runs" / "slurm" / "reports"
        results = json.loads((reports / "results_test.json").read_text())
        encoder = json.loads((reports / "encoder_results_test.json").read_text())
        assert results and encoder
    return [job], check


def ehr_embedded_jobs(slurm, submit_dir: Path) -> tuple[list[str], callable]:
    from ehr_embedded.sample_data import write_sample

    root = submit_dir / "data" / "ehr"
    meds = root / "meds"
    write_sample(meds, n_subjects=120, seed=0)
    stage1 = {"data": {"data_dir": str(meds), "labels_filepath": str(meds / "labels" / "infection"),
                       "vocab_embedding_path": str(root / "vocab"), "embedding_output_dir": str(root / "store")},
              "vocab": {"min_count": 2}, "sequences": {"max_length": 32}}
    model = {"model_dim": 32, "n_heads": 2, "n_layers": 1, "max_length": 32}
    fine = {"model": {**model, "type": "transformer_encoder_embedded"},
            "data": {"embedding_output_dir": str(root / "store")},
            "training": {"output_dir": str(root / "fine"), "epochs": 2, "batch_size": 16},
            "evaluate": {"n_bootstrap": 20}}
    configs = []
    for name, cfg in (("create.yaml", stage1), ("fine.yaml", fine)):
        (root / name).write_text(yaml.safe_dump(cfg))
        configs.append(str(root / name))
    (submit_dir / "runs" / "ehr_embedded").mkdir(parents=True, exist_ok=True)
    job = slurm.submit(REPO / "scripts" / "ehr_embedded" / "slurm" / "pipeline.sbatch", configs[0], "none",
                       configs[1], cwd=submit_dir)

    def check() -> None:
        report = json.loads((root / "fine" / "reports" / "eval_held_out.json").read_text())
        assert math.isfinite(report["auroc"]["value"]), report["auroc"]
        assert (root / "fine" / "checkpoints" / "best" / "model.safetensors").is_file()
    return [job], check


def implant_dims_jobs(slurm, submit_dir: Path) -> tuple[list[str], callable]:
    from implant_dims.sample_data import make_dataset

    root = submit_dir / "data" / "implant"
    make_dataset(root, n_train=64, n_val=24, n_test=24, n_unseen=16, size=64, seed=1, dicom_every=8, n_calibration=0)
    args = [str(REPO / "configs" / "implant_dims" / "tiny.yaml"), f"run.out_dir={root / 'runs'}", "run.name=slurm",
            f"data.train_json={root / 'augmented_train.json'}", f"data.val_json={root / 'augmented_val.json'}",
            f"data.test_json={root / 'test.json'}", f"data.unseen_json={root / 'unseen_test.json'}",
            f"data.catalogue_csv={root / 'catalogue.csv'}"]
    (submit_dir / "runs" / "implant_dims").mkdir(parents=True, exist_ok=True)
    job = slurm.submit(REPO / "scripts" / "implant_dims" / "slurm" / "train.sbatch", *args, cwd=submit_dir,
                       options=(f"--export=ALL,PREDICT_INPUT={root / 'test.json'}",))

    def check() -> None:
        run = root / "runs" / "slurm"
        for target in ("company", "model_type"):
            assert (run / f"classifier_{target}" / "reports" / "results_test.json").is_file()
        assert (run / "dual" / "reports" / "results_test.json").is_file()
        rows = pd.read_csv(run / "predictions" / "test.csv")
        assert len(rows) == len(json.loads((root / "test.json").read_text()))
    return [job], check


def test_each_package_trains_to_completion_under_slurm(slurm, submit_dir):
    assert not (submit_dir / ".venv").exists()
    assert (Path(sys.prefix) / "bin" / "python").is_file(), f"{sys.prefix}/bin/python: run from a venv or conda env"
    chains = {name: make(slurm, submit_dir) for name, make in (
        ("price_fusion", price_fusion_jobs), ("cnc_gcode", cnc_gcode_jobs), ("ehr_embedded", ehr_embedded_jobs),
        ("implant_dims", implant_dims_jobs))}
    records = slurm.wait([job for jobs, _ in chains.values() for job in jobs], timeout=900, what="package jobs")
    assert_completed(records, submit_dir)
    for _, check in chains.values():
        check()
