"""The whole cnc_gcode chain on simulator data it generates itself, at a small CPU size (about two minutes).

    python -c "from pathlib import Path; from cnc_gcode.demo import run_demo; print(run_demo(Path('demo_output/cnc')))"

sample_data -> build_vocab (round trip on the generated programs) -> train_encoder -> train_decoder -> evaluate ->
predict (one test program back to G-code) -> export_onnx (onnxruntime parity).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from cnc_gcode import build_vocab, evaluate, export_onnx, predict, train_decoder, train_encoder
from cnc_gcode.sample_data import make_dataset, save_npz

PACKAGE = "cnc_gcode"
TINY_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "cnc_gcode" / "tiny.yaml"
DEMO_PROGRAMS = 60
# A demo budget (about a minute on 2 cores): enough training for the table to show learning, not the README numbers.
DEMO_BUDGET = ["encoder_train.epochs=8", "train.epochs=10", "train.patience=10", "data.max_train_windows=2000",
               "eval.max_windows=400", "decoder.d_model=64", "decoder.n_layers=2", "decoder.ff_dim=128",
               "encoder.hidden_dim=64"]


def _run(stage, argv: list[str]) -> None:
    code = stage.main(argv)
    if code != 0:
        raise RuntimeError(f"{stage.__name__} {' '.join(argv)} exited with {code}")


def run_demo(out_dir: Path, seed: int | None = None) -> list[dict]:
    """The demo's rows. `seed`: run.seed of the two training stages (train_encoder, train_decoder; their weights, noise,
    epoch order and training subset); None keeps the config's. The data and the evaluated windows do not change."""
    out_dir = Path(out_dir)
    trained = [] if seed is None else [f"run.seed={seed}"]
    data = out_dir / "data"
    make_dataset(data, n_programs=DEMO_PROGRAMS, seed=0)
    common = ["--config", str(TINY_CONFIG), f"run.out_dir={out_dir / 'runs'}", "run.name=demo",
              f"data.train_path={data / 'train.npz'}", f"data.val_path={data / 'val.npz'}",
              f"data.test_path={data / 'test.npz'}", *DEMO_BUDGET]
    run_dir = out_dir / "runs" / "demo"
    rows = []
    _run(build_vocab, [*common, f"build_vocab.corpus=[{data / 'programs'}]", f"build_vocab.out={out_dir / 'vocab.json'}"])
    report = json.loads((out_dir / "vocab_report.json").read_text())
    rows.append({"package": PACKAGE, "stage": "build_vocab", "metric": "round_trip_rate",
                 "value": float(report["round_trip_rate"]), "output": str(out_dir / "vocab_report.json")})
    _run(train_encoder, [*common, *trained])
    enc = json.loads((run_dir / "reports" / "encoder_results_test.json").read_text())
    rows.append({"package": PACKAGE, "stage": "train_encoder", "metric": "test_operation_acc",
                 "value": enc["operation_acc"], "output": str(run_dir / "encoder")})
    _run(train_decoder, [*common, *trained])
    _run(evaluate, common)
    results = json.loads((run_dir / "reports" / "results_test.json").read_text())
    for metric in ("operation_acc", "token_acc", "majority_token_acc", "line_exact_match"):
        rows.append({"package": PACKAGE, "stage": "evaluate", "metric": metric, "value": float(results[metric]),
                     "output": str(run_dir / "reports" / "results_test.json")})
    with np.load(data / "test.npz") as test:
        first = test["program_id"] == test["program_id"][0]
        order = np.argsort(test["line_index"][first], kind="stable")
        save_npz(out_dir / "one_program.npz", {"continuous": test["continuous"][first][order],
                                               "categorical": test["categorical"][first][order]})
    _run(predict, [*common, f"predict.input={out_dir / 'one_program.npz'}"])
    predicted = run_dir / "predictions" / "one_program.nc"
    rows.append({"package": PACKAGE, "stage": "predict", "metric": "program_lines",
                 "value": float(len(predicted.read_text().splitlines()) - 1), "output": str(predicted)})
    _run(export_onnx, common)
    parity = json.loads((run_dir / "onnx" / "parity.json").read_text())
    rows.append({"package": PACKAGE, "stage": "export_onnx", "metric": "max_abs_diff_step_logits",
                 "value": parity["max_abs_diff_step_logits"], "output": str(run_dir / "onnx")})
    rows.append({"package": PACKAGE, "stage": "export_onnx", "metric": "greedy_identical",
                 "value": str(parity["greedy_identical"]), "output": str(run_dir / "onnx" / "parity.json")})
    return rows


if __name__ == "__main__":
    for row in run_demo(Path("demo_output") / PACKAGE):
        print(row)
