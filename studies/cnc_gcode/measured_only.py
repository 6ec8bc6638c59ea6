"""Headline: G-code inferred from physical signals. The same pipeline trained on measured channels only (no
controller setpoints) and on all channels, beside a nearest-neighbour baseline and the majority baselines on the
same test windows.

    python -m studies.cnc_gcode.measured_only --config configs/cnc_gcode/measured_only.yaml
    studies/cnc_gcode/measured_only.sh            # makes the data first, then this

For each setting (measured only = measured_only.measured_groups; all channels = every group) and each seed in
measured_only.seeds it trains the encoder and the decoder (in <run_dir>/measured_only/<setting>_seed<N>/, resumable)
and decodes the test split (constrained greedy). The nearest-neighbour baseline (sklearn KNeighborsClassifier, k =
measured_only.neighbors, on the flattened windows normalised with the training split's per-channel statistics, the
same selected channels plus the categorical channels of the selected groups) predicts the token sequence and the
operation of the nearest training window. Writes <run_dir>/reports/measured_only.{json,md}: operation accuracy,
token accuracy (a parameter token counts only with its exact value), line exact match, command accuracy (G0/G1/G3/
G53/M30 where the target has a command), parameter-letter accuracy and the median error of decoded values (mm) per row, with the input groups each row used; with several seeds, mean and
sample standard deviation over them.

Values as quantities: the measured-only model is trained once per decoder value mode in measured_only.value_modes
(regress: value heads; digits: the digit heads; the digits decoder reads the regress run's encoder, so the two rows
differ only in the decoder), the all-channels model with the first mode. Each row also gives token accuracy with
values within tolerance (coordinates 0.1 mm, F / S 2 %), the median / p95 X/Y/Z error (mm) and the median F error
(%). Observability (`observability` in the JSON): how many test X/Y/Z targets already lie within 0.1 mm of the
window's last measured position (the line's end point reached and seen), and how often the measured path speed at
the last step is within 2 % of the line's F (the feed seen), and how often the decoder's torch F anchor reading
(`model.plateau_speed`) agrees with `plateau_speed`; the model's values within tolerance split by the first.
`labelling` in the JSON (and the table's first line): how the windows were cut and labelled, from the manifest.json
sample_data writes beside the training split (window_end executing / completed, settle_samples).
"""

from __future__ import annotations

import copy
import logging
import warnings

import numpy as np

from cnc_gcode.checkpoints import load_models
from cnc_gcode.config import CncConfig, set_threads
from cnc_gcode.data import Windows, cap_windows, groups_used, load_split
from cnc_gcode.evaluate import predict_windows, score
from cnc_gcode.metrics import baselines, most_frequent, token_metrics
from cnc_gcode.tokenizer import load_vocabulary
from common.cli import config_main
from common.errors import UserError
from common.io import atomic_write_text, write_json
from common.logs import setup_logging
from studies.cnc_gcode.ablation_gamma import markdown_table

log = logging.getLogger(__name__)
METRICS = ("operation_acc", "token_acc", "token_acc_tol", "line_exact_match", "command_acc", "ptype_acc",
           "numeric_median_mm", "value_err_xyz_median_mm", "value_err_xyz_p95_mm", "value_err_f_median_pct",
           "axis_tokens_reached_tol", "axis_tokens_unreached_tol")
# target-token groups of the error breakdown: commands, the value letters by group, everything else (end of line)
ERROR_GROUPS = ("command", "xyz", "ijkr", "f", "s", "end")
AXES = "XYZ"


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


def observable(vocab, windows: Windows) -> tuple[np.ndarray, np.ndarray]:
    """(axis [N,L] bool: the target is an X/Y/Z word; reached [N,L] bool: its value is within 0.1 mm of the window's
    last measured position of that axis, i.e. the end point is in the window). Windows without actual_<axis>
    channels have no reached tokens."""
    from cnc_gcode.metrics import ABS_TOLERANCE, param_values

    fields = vocab.fields(windows.tokens)
    letter = np.where(fields["ptype"] >= 0, fields["ptype"] // 2, -1)
    values = param_values(fields)
    names = list(windows.channel_names or [])
    axis, reached = np.zeros(letter.shape, bool), np.zeros(letter.shape, bool)
    for k, name in enumerate(vocab.letters):
        if name not in AXES:
            continue
        here = letter == k
        axis |= here
        channel = f"actual_{name.lower()}"
        if channel in names:
            last = windows.continuous[:, -1, names.index(channel)][:, None]
            reached |= here & (np.abs(values - last) <= ABS_TOLERANCE + 1e-9)
    return axis, reached


def plateau_share(vocab, windows: Windows) -> float:
    """Share of F targets within 2 % of the window's plateau speed (`plateau_speed`)."""
    from cnc_gcode.metrics import REL_TOLERANCE, param_values

    if "F" not in vocab.letters:
        return float("nan")
    fields = vocab.fields(windows.tokens)
    is_f = (fields["ptype"] >= 0) & (fields["ptype"] // 2 == vocab.letters.index("F"))
    rows = np.nonzero(is_f)[0]
    target = param_values(fields)[is_f]
    return float((np.abs(plateau_speed(windows)[rows] - target) <= REL_TOLERANCE * np.abs(target)).mean())


def feed_seen(vocab, windows: Windows) -> tuple[int, float]:
    """(F targets, share whose measured path speed at the window's last step is within 2 % of F)."""
    from cnc_gcode.metrics import REL_TOLERANCE, param_values

    names = list(windows.channel_names or [])
    if "F" not in vocab.letters or not all(f"velocity_{a}" in names for a in "xyz"):
        return 0, float("nan")
    fields = vocab.fields(windows.tokens)
    is_f = fields["ptype"] // 2 == vocab.letters.index("F")
    is_f &= fields["ptype"] >= 0
    rows = np.nonzero(is_f)[0]
    speed = np.sqrt(sum(windows.continuous[rows, -1, names.index(f"velocity_{a}")] ** 2 for a in "xyz")) * 60.0
    target = param_values(fields)[is_f]
    return int(len(rows)), float((np.abs(speed - target) <= REL_TOLERANCE * np.abs(target)).mean())


def error_breakdown(vocab, predicted: np.ndarray, target: np.ndarray) -> dict:
    """Per target-token group (ERROR_GROUPS): tokens, share right within tolerance (the token_acc_tol rule) and share
    of all wrong tokens, so a table shows which group holds the remaining errors."""
    from cnc_gcode.metrics import ABS_LETTERS, ABS_TOLERANCE, REL_LETTERS, REL_TOLERANCE, VALUE_GROUPS, value_errors
    from cnc_gcode.tokenizer import PAD, TYPE_COMMAND, TYPE_PARAM

    fields = vocab.fields(target)
    valid = target != PAD
    same, error = value_errors(vocab, predicted, target)
    is_param = fields["type"] == TYPE_PARAM
    letter = np.asarray(vocab.letters)[np.where(is_param, fields["ptype"] // 2, 0)]
    absolute, relative = np.isin(letter, list(ABS_LETTERS)), np.isin(letter, list(REL_LETTERS))
    right = (predicted == target) | (same & ((absolute & (error <= ABS_TOLERANCE + 1e-9))
                                             | (relative & (error <= REL_TOLERANCE + 1e-12))))
    masks = {"command": valid & (fields["type"] == TYPE_COMMAND)}
    for name, letters, _ in VALUE_GROUPS:
        masks[name] = valid & is_param & np.isin(letter, list(letters))
    masks["end"] = valid & ~np.logical_or.reduce(list(masks.values()))
    wrong = int((valid & ~right).sum())
    return {name: {"tokens": int(mask.sum()), "right_tol": float(right[mask].mean()) if mask.any() else float("nan"),
                   "share_of_wrong": float((mask & ~right).sum() / max(wrong, 1))} for name, mask in masks.items()}


def plateau_speed(windows: Windows) -> np.ndarray:
    """[N] mm/min: each window's path speed on its last speed plateau (median of the last run of samples whose
    measured path speed changes by under 1 % per step, the 3 last samples left out: the exact stop, the settle
    samples). Not a model: a hand-written reading of the velocity channels, to measure how much of F the window
    shows (NaN without velocity_x/y/z)."""
    names = list(windows.channel_names or [])
    if not all(f"velocity_{a}" in names for a in "xyz"):
        return np.full(len(windows), np.nan)
    speed = np.sqrt(sum(windows.continuous[:, :, names.index(f"velocity_{a}")].astype(np.float64) ** 2
                        for a in "xyz")) * 60.0
    out = np.empty(len(windows))
    for i, row in enumerate(speed[:, :-3]):
        flat = np.flatnonzero(np.abs(np.diff(row)) < 0.01 * np.maximum(row[1:], 1.0))
        if not len(flat):
            out[i] = row.max()
            continue
        start = end = flat[-1]
        while start > 0 and start - 1 == flat[np.searchsorted(flat, start) - 1]:
            start -= 1
        out[i] = np.median(row[start:end + 2])
    return out


def torch_plateau_speed(windows: Windows) -> np.ndarray:
    """[N] mm/min: the decoder's own F anchor reading (model.plateau_speed, torch ops that export to ONNX) of each
    window, NaN without velocity_x/y/z; compared with `plateau_speed` in the observability line."""
    import torch

    from cnc_gcode.model import VELOCITY_CHANNELS
    from cnc_gcode.model import plateau_speed as torch_reading

    names = list(windows.channel_names or [])
    if not all(c in names for c in VELOCITY_CHANNELS):
        return np.full(len(windows), np.nan)
    index = torch.tensor([names.index(c) for c in VELOCITY_CHANNELS])
    return torch_reading(torch.from_numpy(np.asarray(windows.continuous)), index).double().numpy()


def plateau_agreement(windows: Windows) -> float:
    """Share of windows whose torch plateau reading is within 0.1 % of the numpy one (the two should agree up to
    float32 rounding of the result)."""
    ref, mine = plateau_speed(windows), torch_plateau_speed(windows)
    return float((np.abs(mine - ref) <= 1e-3 * np.maximum(np.abs(ref), 1.0)).mean())


def with_plateau_feed(vocab, windows: Windows, predicted: np.ndarray) -> float:
    """token_acc_tol of `predicted` with every F token the model put where the target has F re-read as the
    window's plateau speed: what the score would be with F read as well as `plateau_speed` reads it."""
    from cnc_gcode.metrics import REL_TOLERANCE, param_values, tolerance_metrics, value_errors

    same, _ = value_errors(vocab, predicted, windows.tokens)
    fields = vocab.fields(windows.tokens)
    is_f = same & (fields["ptype"] >= 0) & (fields["ptype"] // 2 == vocab.letters.index("F"))
    target = param_values(fields)
    read_ok = np.abs(plateau_speed(windows)[:, None] - target) <= REL_TOLERANCE * np.abs(target)
    fixed = np.where(is_f & read_ok, windows.tokens, predicted)  # a read within tolerance counts as right
    return tolerance_metrics(vocab, fixed, windows.tokens)["token_acc_tol"]


def train_and_score(cfg: CncConfig, name: str, groups: list[str], seed: int, value_mode: str = "",
                    encoder_from: str = "") -> dict:
    from cnc_gcode.train_decoder import train_decoder
    from cnc_gcode.train_encoder import train_encoder

    sub = copy.deepcopy(cfg)
    sub.run.out_dir = str(cfg.run.run_dir / "measured_only")
    sub.run.name = f"{name}_seed{seed}"
    sub.run.seed = seed
    sub.data.channel_groups = list(groups)
    if value_mode:
        sub.decoder.value_mode = value_mode
    log.info("measured_only: training %s (groups %s, seed %d, values %s)", sub.run.name, groups or "all", seed,
             sub.decoder.value_mode)
    if encoder_from:  # the same frozen encoder as another row: the rows differ only in the decoder
        sub.train.encoder_checkpoint = str(cfg.run.run_dir / "measured_only" / f"{encoder_from}_seed{seed}" /
                                           "encoder" / "checkpoints" / "best")
    else:
        train_encoder(sub)
    train_decoder(sub)
    encoder, decoder, vocab, meta = load_models(sub)
    test = cap_windows(load_split(sub, "test", vocab, int(meta["continuous_dim"]), meta["channel_names"]),
                       cfg.eval.max_windows, cfg.run.seed)
    from cnc_gcode.metrics import ABS_TOLERANCE, value_errors

    _, token_pred = predictions = predict_windows(encoder, decoder, vocab, test, cfg.eval.batch_size)
    scores = score(vocab, test, *predictions)
    axis, reached = observable(vocab, test)
    same, error = value_errors(vocab, token_pred, test.tokens)
    close = same & (error <= ABS_TOLERANCE + 1e-9)
    split = {"axis_tokens_reached_tol": float(close[reached].mean()) if reached.any() else float("nan"),
             "axis_tokens_unreached_tol": float(close[axis & ~reached].mean()) if (axis & ~reached).any()
             else float("nan")}
    return {"seed": seed, "channels": test.channel_names, "value_mode": sub.decoder.value_mode, **scores, **split,
            "errors_by_group": error_breakdown(vocab, token_pred, test.tokens),
            "token_acc_tol_feed_from_plateau": with_plateau_feed(vocab, test, token_pred)}


def labelling(train_path: str) -> dict:
    """How the windows were cut (sample_data's manifest.json beside the training split): window_end and
    settle_samples, 'unknown' where there is no manifest (data from elsewhere)."""
    import json
    from pathlib import Path

    manifest = Path(train_path).with_name("manifest.json")
    if not manifest.is_file():
        return {"window_end": "unknown", "settle_samples": None}
    data = json.loads(manifest.read_text())
    # manifests written before the option existed are the seed's labelling
    return {"window_end": data.get("window_end", "executing"), "settle_samples": data.get("settle_samples", 0)}


def errors_table(rows: list[dict]) -> str:
    """Markdown: per model row with per-seed runs, each ERROR_GROUPS group's accuracy within tolerance and share of
    the wrong tokens (mean over seeds), and the score with F read off the plateau (`with_plateau_feed`)."""
    lines = ["Where the errors are (test; per target-token group: right within tolerance / share of all wrong "
             "tokens, mean over seeds; end = end of line and other tokens):", ""]
    header = (["model", "input groups"] + [f"{g} ({n})" for g, n in zip(ERROR_GROUPS, _group_counts(rows))]
              + ["token acc within tolerance, F read off the speed plateau"])
    body = []
    for r in rows:
        if "runs" not in r:
            continue
        cells = [r["model"], ", ".join(r["groups"])]
        for g in ERROR_GROUPS:
            right = np.mean([run["errors_by_group"][g]["right_tol"] for run in r["runs"]])
            share = np.mean([run["errors_by_group"][g]["share_of_wrong"] for run in r["runs"]])
            cells.append(f"{right:.3f} / {share:.3f}")
        body.append(cells + [_cell(_summary([run["token_acc_tol_feed_from_plateau"] for run in r["runs"]]))])
    return "\n".join(lines) + "\n" + markdown_table(header, body)


def _group_counts(rows: list[dict]) -> list[int]:
    runs = [r["runs"][0] for r in rows if "runs" in r]
    return [runs[0]["errors_by_group"][g]["tokens"] if runs else 0 for g in ERROR_GROUPS]


def measured_only(cfg: CncConfig) -> int:
    set_threads(cfg)
    setup_logging()
    mo = cfg.measured_only
    if "commanded" in mo.measured_groups:
        raise UserError("config key 'measured_only.measured_groups' holds 'commanded' (controller setpoints); the "
                        "measured-only rows must leave it out")
    seeds = list(mo.seeds) or [cfg.run.seed]
    vocab = load_vocabulary(cfg.data.vocab_path)
    modes = list(mo.value_modes) or [cfg.decoder.value_mode]
    bad = [m for m in modes if m not in ("digits", "regress")]
    if bad:
        raise UserError(f"config key 'measured_only.value_modes' holds {bad}; use digits and/or regress")
    settings = [("measured_only", list(mo.measured_groups), modes), ("all_channels", [], modes[:1])]
    rows, results = [], {"train_path": cfg.data.train_path, "test_path": cfg.data.test_path, "seeds": seeds,
                         "value_modes": modes, "labelling": labelling(cfg.data.train_path)}
    majority = None
    for name, groups, setting_modes in settings:
        sel = copy.deepcopy(cfg)
        sel.data.channel_groups = groups
        train_w = cap_windows(load_split(sel, "train", vocab), cfg.data.max_train_windows, cfg.run.seed)
        test_w = cap_windows(load_split(sel, "test", vocab), cfg.eval.max_windows, cfg.run.seed)
        used = groups_used(test_w)
        if name == "measured_only":
            axis, reached = observable(vocab, test_w)
            n_f, f_seen = feed_seen(vocab, test_w)
            results["observability"] = {
                "axis_tokens": int(axis.sum()), "axis_tokens_reached": int(reached.sum()),
                "axis_reached_share": float(reached.sum() / max(axis.sum(), 1)),
                "f_tokens": n_f, "f_speed_within_2pct_share": f_seen,
                "f_plateau_within_2pct_share": plateau_share(vocab, test_w),
                "f_anchor_plateau_agreement": plateau_agreement(test_w),
                "value_token_share": float((vocab.fields(test_w.tokens)["ptype"] >= 0).sum()
                                           / (test_w.tokens != 0).sum())}
        for i, mode in enumerate(setting_modes):
            run_name = name if i == 0 else f"{name}_{mode}"
            runs = [train_and_score(cfg, run_name, groups, seed, mode, encoder_from=name if i else "")
                    for seed in seeds]
            model = {m: _summary([r.get(m) for r in runs]) for m in METRICS}
            rows.append({"model": f"MMDTAELSTM + multi-head decoder, {mode} values", "setting": name,
                         "value_mode": mode, "groups": used, "n_channels": len(test_w.channel_names), **model,
                         "runs": runs})
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
    table = markdown_table(["model", "input groups", "channels", "operation acc", "token acc, values within "
                            "tolerance", "token acc (exact)", "line exact", "command acc", "parameter letter acc",
                            "value error, median (mm)", "X/Y/Z error, median (mm)", "X/Y/Z error, p95 (mm)",
                            "F error, median (%)"],
                           [[r["model"], ", ".join(r["groups"]) or "-", r["n_channels"], _cell(r["operation_acc"]),
                             _cell(r["token_acc_tol"]), _cell(r["token_acc"]), _cell(r["line_exact_match"]),
                             _cell(r["command_acc"]), _cell(r["ptype_acc"]), _cell(r["numeric_median_mm"]),
                             _cell(r["value_err_xyz_median_mm"]), _cell(r["value_err_xyz_p95_mm"]),
                             _cell(r["value_err_f_median_pct"])] for r in rows])
    obs = results["observability"]
    label = results["labelling"]
    table = (f"Windows: window_end {label['window_end']}, settle_samples {label['settle_samples']}. "
             f"Test split: {results['n_test_windows']} windows ({cfg.data.test_path}); training "
             f"{results['n_train_windows']} windows; models: {seeds}. Tolerance: coordinates 0.1 mm, F / S 2 %.\n\n"
             + table + f"\nObservability (test, measured channels): {obs['axis_tokens_reached']} of "
             f"{obs['axis_tokens']} X/Y/Z targets ({obs['axis_reached_share']:.3f}) lie within 0.1 mm of the "
             f"window's last measured position; the path speed at the last step is within 2 % of F for "
             f"{obs['f_speed_within_2pct_share']:.3f} of {obs['f_tokens']} F targets, the speed on the window's last "
             f"plateau for {obs['f_plateau_within_2pct_share']:.3f} (the decoder's torch F anchor reading agrees "
             f"with it within 0.1 % on {obs['f_anchor_plateau_agreement']:.3f} of the windows); value tokens are "
             f"{obs['value_token_share']:.3f} of the target tokens.\n")
    table += "\n" + errors_table(rows)
    atomic_write_text(reports / "measured_only.md", table)
    print(table)
    return 0


main = config_main(CncConfig, measured_only, __doc__, prog="python -m studies.cnc_gcode.measured_only")

if __name__ == "__main__":
    raise SystemExit(main())
