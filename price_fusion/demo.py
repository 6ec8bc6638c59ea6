"""The whole price_fusion chain on generated sample data, for scripts/demo.py.

    python -c "import pathlib, price_fusion.demo as d; print(d.run_demo(pathlib.Path('demo_output/price_fusion')))"

sample_data -> embed (tiny random CLIP + packaged all-MiniLM-L6-v2) -> train -> evaluate -> predict -> gbt ->
ensemble, each through its command-line `main`, then scores the test predictions against the hidden test prices
and writes the rows to <out_dir>/reports/demo_results.json (`python scripts/demo.py --packages price_fusion` prints
them and writes them to demo_output/price_fusion/reports/demo_results.json).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from common import metrics
from common.io import write_json

from . import embed, ensemble, evaluate, gbt, predict, sample_data, train

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "price_fusion" / "demo.yaml"
N_TRAIN, N_TEST = 500, 120


def _run(stage, argv: list[str]) -> None:
    code = stage.main(argv)
    if code != 0:
        raise RuntimeError(f"{stage.__name__} {' '.join(argv)} exited with {code}")


def _test_smape(path: Path, truth: pd.Series) -> float:
    pred = pd.read_csv(path, dtype={"sample_id": str}).set_index("sample_id").price
    return metrics.smape(truth.to_numpy(), pred.loc[truth.index].to_numpy())


def run_demo(out_dir: Path, seed: int | None = None) -> list[dict]:
    """Run the chain under out_dir; `seed` (None: the config's train.seed) seeds both training stages, train and gbt
    (gbt reads train.seed); the sample data are the same whatever the seed."""
    out_dir = Path(out_dir)
    seeded = [] if seed is None else [f"train.seed={seed}"]
    data = out_dir / "data"
    paths = sample_data.write_sample_data(data, N_TRAIN, N_TEST, seed=0, tiny_clip=True)
    runs = out_dir / "runs"
    common = ["--config", str(CONFIG), f"runs_dir={runs}", f"data.train_csv={paths['train_csv']}",
              f"data.test_csv={paths['test_csv']}", f"data.image_dir={paths['image_dir']}",
              f"data.embeddings_dir={out_dir / 'embeddings'}", f"embed.clip_model={paths['clip_model']}",
              "train.epochs=40", "train.resume=false"]
    _run(embed, common)
    _run(train, [*common, *seeded])
    _run(evaluate, common)
    _run(predict, common)
    _run(gbt, [*common, "run_name=demo_gbt", *seeded])
    fusion_test, gbt_test = runs / "demo" / "predictions" / "test_out.csv", runs / "demo_gbt" / "predictions" / "test_out.csv"
    ensemble_out = runs / "ensemble" / "test_out.csv"
    _run(ensemble, [*common, f"ensemble.inputs=[{fusion_test},{gbt_test}]", f"ensemble.output={ensemble_out}"])

    truth = pd.read_csv(paths["test_labels"], dtype={"sample_id": str}).set_index("sample_id").price
    train_median = float(np.median(pd.read_csv(paths["train_csv"]).price))
    evaluation = pd.read_json(runs / "demo" / "reports" / "evaluation_summary.json", typ="series")
    row = {"package": "price_fusion"}
    rows = [
        {**row, "stage": "embed", "metric": "train products embedded", "value": float(N_TRAIN),
         "output": str(out_dir / "embeddings")},
        {**row, "stage": "evaluate", "metric": "val SMAPE % (fusion)", "value": float(evaluation.smape),
         "output": str(runs / "demo" / "reports" / "evaluation_results.csv")},
        {**row, "stage": "predict", "metric": "test SMAPE % (fusion)", "value": _test_smape(fusion_test, truth),
         "output": str(fusion_test)},
        {**row, "stage": "gbt", "metric": "test SMAPE % (trees + kNN)", "value": _test_smape(gbt_test, truth),
         "output": str(gbt_test)},
        {**row, "stage": "ensemble", "metric": "test SMAPE % (mean of both)", "value": _test_smape(ensemble_out, truth),
         "output": str(ensemble_out)},
        {**row, "stage": "baseline", "metric": "test SMAPE % (train median)",
         "value": metrics.smape(truth.to_numpy(), np.full(len(truth), train_median)), "output": str(paths["train_csv"])},
    ]
    write_json(out_dir / "reports" / "demo_results.json", rows)  # the rows the README and RESULTS.md quote
    return rows
