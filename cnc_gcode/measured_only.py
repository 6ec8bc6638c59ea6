"""Headline: G-code inferred from physical signals. The same pipeline trained on measured channels only (no
controller setpoints) and on all channels, beside a nearest-neighbour baseline and the majority baselines on the
same test windows.

    python -m cnc_gcode.measured_only --config configs/cnc_gcode/measured_only.yaml
    scripts/cnc_gcode/measured_only.sh            # makes the data first, then this

For each setting (measured only = measured_only.measured_groups; all channels = every group) and each seed in
measured_only.seeds it trains the encoder and the decoder (in <run_dir>/measured_only/<setting>_seed<N>/, resumable)
and decodes the test split (constrained greedy). The nearest-neighbour baseline (sklearn KNeighborsClassifier, k =
measured_only.neighbors, on the flattened windows normalised with the training split's per-channel statistics, the
same selected channels plus the categorical channels of the selected groups) predicts the token sequence and the
operation of the nearest training window. Writes <run_dir>/reports/measured_only.{json,md}: operation accuracy,
token accuracy (a parameter token counts only with its exact value), line exact match, command accuracy (G0/G1/G3/
G53/M30 where the target has a command), parameter-letter accuracy and the median error of decoded values (mm) per row, with the input groups each row used; with several seeds, mean and
sample standard deviation over them.
"""

from __future__ import annotations

import copy
import logging
import warnings

import numpy as np

from cnc_gcode.ablation_gamma import markdown_table
from cnc_gcode.config import CncConfig
from cnc_gcode.data import Windows
from cnc_gcode.evaluate import predict_windows, score
from cnc_gcode.metrics import baselines, most_frequent, token_metrics
from cnc_gcode.runtime import cap_windows, groups_used, load_models, load_split, set_threads
from cnc_gcode.tokenizer import load_vocabulary
from common.cli import UserError, config_main
from common.io import atomic_write_text, write_json
from common.logs import setup_logging

log = logging.getLogger(__name__)
METRICS = ("operation_acc", "token_acc", "line_exact_match", "command_acc", "ptype_acc", "numeric_median_mm")


def knn_features(windows: Windows, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """[N, T*(C+K)] float32: normalised continuous channels and the categorical values, flattened."""
    cont = (windows.continuous - mean) / std
    return np.concatenate([cont, windows.categorical.astype(np.float32)], axis=2).reshape(len(windows), -1)


def knn_baseline(train: Windows, test: Windows, neighbors: int) -> tuple[np.ndarray, np.ndarray]:
    """(operation [N], token ids [N,L]) of the nearest training window (k > 1: the most common training window among
    the k nearest, by the classifier's vote over training-window indices; ties to the nearest)."""
    from sklearn.neighbors import KNeighborsClassifier

    flat = train.continuous.reshape(-1, train.continuous.shape[2]).astype(np.float64)
    mean, std = flat.mean(0).astype(np.float32), np.maximum(flat.std(0), 1e-6).astype(np.float32)
    if neighbors == 1:
        with warnings.catch_warnings():  # one class per training window is the point, not a regression in disguise
            warnings.simplefilter("ignore", UserWarning)
            model = KNeighborsClassifier(n_neighbors=1).fit(knn_features(train, mean, std), np.arange(len(train)))
        nearest = model.predict(knn_features(test, mean, std))
    else:  # vote over the k nearest windows' token rows: the row most of them share
        from sklearn.neighbors import NearestNeighbors

        index = NearestNeighbors(n_neighbors=neighbors).fit(knn_features(train, mean, std))
        _, near = index.kneighbors(knn_features(test, mean, std))
        nearest = np.empty(len(test), dtype=np.int64)
        for i, row in enumerate(near):
            keys = [train.tokens[j].tobytes() for j in row]
            nearest[i] = row[max(range(len(row)), key=lambda a: (keys.count(keys[a]), -a))]
    return train.operation_type[nearest], train.tokens[nearest]


def _summary(values: list[float]) -> dict:
    array = np.asarray([np.nan if v is None else v for v in values], dtype=np.float64)
    return {"mean": float(array.mean()), "std": float(array.std(ddof=1)) if len(array) > 1 else 0.0,
            "values": [float(v) for v in array]}


def _cell(stats: dict) -> str:
    return f"{stats['mean']:.4f}" + (f" ± {stats['std']:.4f}" if len(stats["values"]) > 1 else "")


def train_and_score(cfg: CncConfig, name: str, groups: list[str], seed: int) -> dict:
    from cnc_gcode.train import train
    from cnc_gcode.train_encoder import train_encoder

    sub = copy.deepcopy(cfg)
    sub.run.out_dir = str(cfg.run.run_dir / "measured_only")
    sub.run.name = f"{name}_seed{seed}"
    sub.run.seed = seed
    sub.data.channel_groups = list(groups)
    log.info("measured_only: training %s (groups %s, seed %d)", sub.run.name, groups or "all", seed)
    train_encoder(sub)
    train(sub)
    encoder, decoder, vocab, meta = load_models(sub)
    test = cap_windows(load_split(sub, "test", vocab, int(meta["continuous_dim"]), meta["channel_names"]),
                       cfg.eval.max_windows, cfg.run.seed)
    scores = score(vocab, test, *predict_windows(encoder, decoder, vocab, test, cfg.eval.batch_size))
    return {"seed": seed, "channels": test.channel_names, **scores}


def measured_only(cfg: CncConfig) -> int:
    set_threads(cfg)
    setup_logging()
    mo = cfg.measured_only
    if "commanded" in mo.measured_groups:
        raise UserError("config key 'measured_only.measured_groups' holds 'commanded' (controller setpoints); the "
                        "measured-only rows must leave it out")
    seeds = list(mo.seeds) or [cfg.run.seed]
    vocab = load_vocabulary(cfg.data.vocab_path)
    settings = [("measured_only", list(mo.measured_groups)), ("all_channels", [])]
    rows, results = [], {"train_path": cfg.data.train_path, "test_path": cfg.data.test_path, "seeds": seeds}
    majority = None
    for name, groups in settings:
        sel = copy.deepcopy(cfg)
        sel.data.channel_groups = groups
        train_w = cap_windows(load_split(sel, "train", vocab), cfg.data.max_train_windows, cfg.run.seed)
        test_w = cap_windows(load_split(sel, "test", vocab), cfg.eval.max_windows, cfg.run.seed)
        used = groups_used(test_w)
        runs = [train_and_score(cfg, name, groups, seed) for seed in seeds]
        model = {m: _summary([r.get(m) for r in runs]) for m in METRICS}
        rows.append({"model": "MMDTAELSTM + multi-head decoder", "setting": name, "groups": used,
                     "n_channels": len(test_w.channel_names), **model, "runs": runs})
        knn_ops, knn_tokens = knn_baseline(train_w, test_w, mo.neighbors)
        knn = token_metrics(vocab, knn_tokens, test_w.tokens)
        knn["operation_acc"] = float((knn_ops == test_w.operation_type).mean())
        rows.append({"model": f"{mo.neighbors}-NN on flattened normalised windows", "setting": name, "groups": used,
                     "n_channels": len(test_w.channel_names),
                     **{m: _summary([knn.get(m)]) for m in METRICS}})
        if majority is None:
            base = baselines(vocab, train_w.tokens, test_w.tokens, cfg.run.seed)
            majority_op = np.bincount(train_w.operation_type).argmax()
            majority_row = np.array([most_frequent(train_w.tokens[:, i]) for i in range(train_w.tokens.shape[1])])
            majority = token_metrics(vocab, np.broadcast_to(majority_row, test_w.tokens.shape), test_w.tokens)
            assert abs(majority["token_acc"] - base["majority_token_acc"]) < 1e-12
            majority.update({"operation_acc": float((test_w.operation_type == majority_op).mean()),
                             "n_test_windows": len(test_w), "n_train_windows": len(train_w)})
    rows.append({"model": "majority (operation; token per position)", "setting": "none", "groups": [],
                 "n_channels": 0, **{m: _summary([majority.get(m)]) for m in METRICS}})
    results.update({"n_test_windows": majority["n_test_windows"], "n_train_windows": majority["n_train_windows"],
                    "rows": rows})
    reports = cfg.run.run_dir / "reports"
    write_json(reports / "measured_only.json", results)
    seeds = f"mean ± std over seeds {seeds}" if len(seeds) > 1 else f"seed {seeds[0]}"
    table = markdown_table(["model", "input groups", "channels", "operation acc", "token acc", "line exact",
                            "command acc", "parameter letter acc", "value error, median (mm)"],
                           [[r["model"], ", ".join(r["groups"]) or "-", r["n_channels"], _cell(r["operation_acc"]),
                             _cell(r["token_acc"]), _cell(r["line_exact_match"]), _cell(r["command_acc"]),
                             _cell(r["ptype_acc"]), _cell(r["numeric_median_mm"])] for r in rows])
    table = (f"Test split: {results['n_test_windows']} windows ({cfg.data.test_path}); training "
             f"{results['n_train_windows']} windows; models: {seeds}.\n\n" + table)
    atomic_write_text(reports / "measured_only.md", table)
    print(table)
    return 0


main = config_main(CncConfig, measured_only, __doc__, prog="python -m cnc_gcode.measured_only")

if __name__ == "__main__":
    raise SystemExit(main())
