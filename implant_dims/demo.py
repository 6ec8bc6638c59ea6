"""The implant_dims chain on sample data it generates itself, with tiny ViTs trained from scratch (about two minutes
on 2 CPU cores; the results tables come from studies/implant_dims/sample_experiment.sh at full size).

    python -c "from pathlib import Path; from implant_dims.demo import run_demo; print(run_demo(Path('demo_output/implant_dims')))"

sample_data -> train_classifier (company, model_type) -> train_dual (triple attention, progressive unfreezing) ->
predict (the test records, DICOM included, with Monte Carlo dropout intervals).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from implant_dims import predict, train_classifier, train_dual
from implant_dims.sample_data import make_dataset

PACKAGE = "implant_dims"
CONFIG = Path(__file__).resolve().parents[1] / "configs" / "implant_dims" / "sample.yaml"
# A demo budget: fewer images and epochs than sample.yaml, enough for the table to show learning. It keeps the
# regressor recipe its test margins were measured with (no augmentation, so the frozen-feature cache works, and the
# loss on standardised targets), not sample.yaml's 80-epoch recipe.
DEMO_BUDGET = ["classifier.epochs=10", "classifier.warmup_epochs=1", "regression.epochs=16",
               "regression.unfreeze_half_epoch=6", "regression.unfreeze_all_epoch=11", "regression.mc_samples=10",
               "regression.augment=false", "regression.loss_space=standardised", "run.num_threads=0"]


def _run(stage, argv: list[str]) -> None:
    code = stage.main(argv)
    if code != 0:
        raise RuntimeError(f"{stage.__name__} {' '.join(argv)} exited with {code}")


def run_demo(out_dir: Path, seed: int | None = None) -> list[dict]:
    """The demo's table rows. `seed`: run.seed of both classifiers, the dual regressor and predict's Monte Carlo
    draws (None keeps sample.yaml's); the sample data are the same either way."""
    out_dir = Path(out_dir)
    data = out_dir / "data"
    make_dataset(data, n_train=800, n_val=150, n_test=150, n_unseen=100, size=64, seed=0, dicom_every=10,
                 n_calibration=0)
    common = ["--config", str(CONFIG), f"run.out_dir={out_dir / 'runs'}", "run.name=demo",
              f"data.train_json={data / 'augmented_train.json'}", f"data.val_json={data / 'augmented_val.json'}",
              f"data.test_json={data / 'test.json'}", f"data.unseen_json={data / 'unseen_test.json'}",
              f"data.catalogue_csv={data / 'catalogue.csv'}",
              "data.calibration_json=",  # no calibration split in the demo's data: the guard calibrates on val
              *DEMO_BUDGET,
              *([] if seed is None else [f"run.seed={seed}"])]
    run_dir = out_dir / "runs" / "demo"
    rows = []
    for target in ("company", "model_type"):
        _run(train_classifier, [*common, f"classifier.target={target}"])
        report = run_dir / f"classifier_{target}" / "reports" / "results_test.json"
        result = json.loads(report.read_text())
        rows.append({"package": PACKAGE, "stage": f"train_classifier ({target})", "metric": "test accuracy",
                     "value": result["accuracy"], "output": str(report)})
        rows.append({"package": PACKAGE, "stage": f"train_classifier ({target})", "metric": "test chance accuracy",
                     "value": result["chance_accuracy"], "output": str(report)})
    _run(train_dual, common)
    for split in ("test", "unseen"):
        report = run_dir / "dual" / "reports" / f"results_{split}.json"
        result = json.loads(report.read_text())
        for dim in ("length", "diameter"):
            rows.append({"package": PACKAGE, "stage": "train_dual (triple)", "metric": f"{split} {dim} MAE mm",
                         "value": result[f"{dim}_mae"], "output": str(report)})
            rows.append({"package": PACKAGE, "stage": "baseline (train mean)", "metric": f"{split} {dim} MAE mm",
                         "value": result[f"mean_baseline_{dim}_mae"], "output": str(report)})
    _run(predict, [*common, f"predict.input={data / 'test.json'}", "predict.snap_to_catalogue=true"])
    predictions = run_dir / "predictions" / "test.csv"
    with predictions.open() as fh:
        n_rows = sum(1 for _ in csv.DictReader(fh))
    rows.append({"package": PACKAGE, "stage": "predict", "metric": "rows (PNG + DICOM)", "value": float(n_rows),
                 "output": str(predictions)})
    return rows


if __name__ == "__main__":
    for row in run_demo(Path("demo_output") / PACKAGE):
        print(row)
