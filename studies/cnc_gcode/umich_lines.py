"""UMich logs as a G-code task: reconstruct the program's lines from the continuous run, tokenize the line each window
executes, and score token accuracy on held-out experiments from measured channels only.

    python -m studies.cnc_gcode.umich_lines --config configs/cnc_gcode/umich_lines.yaml
    python -m studies.cnc_gcode.umich_lines --config configs/cnc_gcode/umich_lines.yaml umich_lines.train_model=false  # ~20 s

1. Program (`reconstruct_program`, on umich.map_experiment = 01, the one continuous recording): the rows of each
   program line (M1_sequence_number, record-marker rows left out) in order of first execution. Its end point is the
   command position X1/Y1/Z1_CommandPosition at the last row executing it; an axis word is written when that end
   differs from the previous line's end by at least umich_lines.min_move_mm; a line that moves no axis is a
   no-motion line (the NONE token line). Motion type: G0 when the line runs at the run's highest reported feed
   (M1_CURRENT_FEEDRATE 50, the positioning moves), else G1 with F = the median feed of its rows. The contour's arc
   corners become G1 moves to their end point (arcs are not detected), and values keep the CSV's precision (three
   significant digits). Written to <run_dir>/reports/umich_program.ngc and parsed back with cnc_gcode.gcode.
2. Windows (every experiment): umich.window rows inside one 1 s record (ingest_umich.record_segments), every
   umich.stride rows; the target is the line executing at the window's last row with that experiment's own feed
   (median M1_CURRENT_FEEDRATE of the experiment's rows of that line: the runs differ only in feed, 3-20); windows
   whose line 01 never executed are dropped and counted. operation_type = the line's majority phase in 01.
   Written to umich_lines.out_dir as train/val/test.npz (the ingest_umich layout with token targets) by experiment.
3. Evaluation on the test experiments, reading data.channel_groups (measured only: no Command* channel, no
   controller feed, no direction channels): the encoder + decoder trained by the package's stages (train_encoder,
   then train, in <run_dir>; umich_lines.train_model=false skips them); with umich_lines.library, the line library
   (cnc_gcode.line_library) trained on the program of step 1 over that encoder, alone and with the decoder's line
   below the threshold chosen on validation; the k-NN baseline (measured_only.knn_baseline on the same selected
   channels), a random forest that picks one of the training target lines from the same flattened channels
   (umich_lines.forest_trees trees; 0 leaves it out) and the majority token per position from training. The model
   rows and the forest repeat for each of umich_lines.seeds (seeds other than run.seed train in <run_dir>/seed<N>;
   mean +- sample sd). Writes <run_dir>/reports/umich_lines.{json,md}.
"""

from __future__ import annotations

import copy
import json
import logging
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path

import numpy as np

from cnc_gcode.config import CncConfig
from cnc_gcode.data import CHANNEL_GROUPS_KEY
from cnc_gcode.gcode import parse_program
from cnc_gcode.metrics import most_frequent, token_metrics
from cnc_gcode.sample_data import SPLITS, save_npz
from cnc_gcode.tokenizer import VOCAB_DIGEST_KEY, Vocabulary, format_number, load_vocabulary, tokenize_text
from common.cli import config_main
from common.errors import UserError
from common.io import atomic_write_text, write_json
from common.logs import setup_logging
from studies.cnc_gcode.ablation_gamma import markdown_table
from studies.cnc_gcode.ingest_umich import (
    CATEGORICAL_NAMES,
    RECORD_MARKER_SEQUENCE,
    categorical_channels,
    default_data_dir,
    experiment_files,
    input_groups,
    learn_phase_map,
    read_experiment,
    record_segments,
    window_ends,
)

log = logging.getLogger(__name__)
AXES = ("X", "Y", "Z")
METRICS = ("token_acc", "line_exact_match", "command_acc", "ptype_acc", "numeric_median_mm", "operation_acc")


@dataclass
class ProgramLine:
    """One reconstructed program line: its number, motion ("G0", "G1" or None: no axis moves), the axis words it
    writes (letter -> mm) and its feed (mm/s as the controller reports it; G1 only)."""

    sequence: int
    motion: str | None
    axes: dict[str, float] = field(default_factory=dict)
    feed: float | None = None
    rows: int = 0

    def text(self, feed: float | None = None) -> str:
        """The line as G-code, with `feed` in place of its own F when given."""
        if self.motion is None:
            return f"N{self.sequence} (no axis motion)"
        words = [f"{axis}{_number(value)}" for axis, value in self.axes.items()]
        if self.motion == "G1":
            words.append(f"F{_number(self.feed if feed is None else feed)}")
        return " ".join([f"N{self.sequence}", self.motion, *words])


def _number(value: float) -> str:
    """A value as written in the program: rounded to 0.001 mm (the CSV holds three significant digits)."""
    return format_number(Decimal(str(round(float(value), 3))))


def reconstruct_program(signals, sequence: np.ndarray, min_move_mm: float) -> list[ProgramLine]:
    """Program lines of one continuous run, in order of first execution (see the module docstring, step 1).

    signals: DataFrame with X1/Y1/Z1_CommandPosition (mm) and M1_CURRENT_FEEDRATE, one row per 100 ms; sequence [S]
    the executing line of each row. Record-marker rows (RECORD_MARKER_SEQUENCE) are left out.
    """
    sequence = np.asarray(sequence).astype(np.int64)
    position = signals[[f"{axis}1_CommandPosition" for axis in AXES]].to_numpy(np.float64)
    feed = signals["M1_CURRENT_FEEDRATE"].to_numpy(np.float64)
    rows = np.flatnonzero(sequence != RECORD_MARKER_SEQUENCE)
    if len(rows) == 0:
        raise UserError("reconstruct_program: every row is a record marker; nothing executes")
    rapid_feed = np.nanmax(feed[rows])
    order = list(dict.fromkeys(sequence[rows].tolist()))
    program, previous_end = [], position[rows[0]]
    for line in order:
        mine = rows[sequence[rows] == line]
        end = position[mine[-1]]
        moved = {axis: float(end[i]) for i, axis in enumerate(AXES) if abs(end[i] - previous_end[i]) >= min_move_mm}
        line_feed = float(np.median(feed[mine]))
        motion = None if not moved else ("G0" if line_feed >= rapid_feed else "G1")
        program.append(ProgramLine(int(line), motion, moved, line_feed if motion == "G1" else None, len(mine)))
        previous_end = end
    return program


def program_text(program: list[ProgramLine]) -> str:
    return "".join(line.text() + "\n" for line in program)


def line_feeds(signals, sequence: np.ndarray) -> dict[int, float]:
    """{line: median M1_CURRENT_FEEDRATE of the rows executing it} of one run."""
    import pandas as pd

    frame = pd.DataFrame({"line": np.asarray(sequence).astype(np.int64),
                          "feed": signals["M1_CURRENT_FEEDRATE"].to_numpy(np.float64)})
    return {int(k): float(v) for k, v in frame.groupby("line")["feed"].median().items()}


def window_targets(vocab: Vocabulary, program: dict[int, ProgramLine], lines: np.ndarray,
                   feeds: dict[int, float]) -> tuple[np.ndarray, np.ndarray]:
    """Token rows [W, L] of the lines `lines` [W] (F = the run's own feed of that line) and a [W] bool mask of the
    windows that have a target (their line is in `program`)."""
    known = np.array([int(line) in program for line in lines], dtype=bool)
    cache: dict[tuple[int, float | None], list[int]] = {}
    rows = []
    for line in lines[known]:
        target = program[int(line)]
        key = (int(line), feeds.get(int(line)) if target.motion == "G1" else None)
        if key not in cache:
            cache[key] = tokenize_text(vocab, target.text(feed=key[1]))
        rows.append(cache[key])
    tokens = np.asarray(rows, dtype=np.int64).reshape(len(rows), vocab.max_tokens)
    return tokens, known


def build_windows(cfg: CncConfig, data_dir: Path, program: list[ProgramLine], phase_of_line: dict[int, int],
                  vocab: Vocabulary) -> dict:
    """Write umich_lines.out_dir/{train,val,test}.npz + channels.json; returns the manifest."""
    uc = cfg.umich
    by_line = {line.sequence: line for line in program}
    split_of = {e: "val" for e in uc.val_experiments} | {e: "test" for e in uc.test_experiments}
    parts: dict[str, list[dict]] = {s: [] for s in SPLITS}
    per_run, channel_names = {}, None
    for number, path in experiment_files(data_dir):
        signals, _, sequence = read_experiment(path)
        channel_names = channel_names or list(signals.columns)
        if list(signals.columns) != channel_names:
            raise UserError(f"{path}: signal columns differ from the first experiment's; every run needs the same 48")
        ends = window_ends(len(signals), uc.window, uc.stride, record_segments(signals, sequence))
        lines = sequence[ends].astype(np.int64)
        tokens, known = window_targets(vocab, by_line, lines, line_feeds(signals, sequence))
        per_run[str(number)] = {"windows": int(known.sum()), "dropped_windows": int((~known).sum())}
        ends = ends[known]
        if uc.relative_positions:  # as ingest_umich: positions relative to the run's lowest point
            for column in [c for c in signals.columns if "Position" in c and not c.startswith("S1")]:
                signals[column] = signals[column] - signals[column].min()
        continuous, categorical = signals.to_numpy(np.float32), categorical_channels(signals)
        index = ends[:, None] - np.arange(uc.window - 1, -1, -1)[None]
        parts[split_of.get(number, "train")].append({
            "continuous": continuous[index], "categorical": categorical[index], "tokens": tokens,
            "operation_type": np.array([phase_of_line[int(q)] for q in lines[known]], dtype=np.int64),
            "sequence_number": lines[known], "experiment": np.full(len(ends), number, np.int64), "end_row": ends})
    out = Path(cfg.umich_lines.out_dir)
    groups = input_groups(channel_names)
    manifest = {"source": str(data_dir), "window": uc.window, "stride": uc.stride, "experiments": per_run, "splits": {}}
    for split in SPLITS:
        if not parts[split] or not sum(len(p["tokens"]) for p in parts[split]):
            raise UserError(f"split '{split}' got no windows; check umich.val_experiments/test_experiments")
        arrays = {k: np.concatenate([p[k] for p in parts[split]]) for k in parts[split][0]}
        arrays.update({"channel_names": np.asarray(channel_names), "categorical_names": np.asarray(CATEGORICAL_NAMES),
                       CHANNEL_GROUPS_KEY: np.asarray(json.dumps(groups)),
                       VOCAB_DIGEST_KEY: np.asarray(vocab.digest())})
        save_npz(out / f"{split}.npz", arrays)
        manifest["splits"][split] = {"experiments": sorted(set(arrays["experiment"].tolist())),
                                     "windows": len(arrays["tokens"]),
                                     "distinct_target_lines": len(np.unique(arrays["tokens"], axis=0))}
    write_json(out / "channels.json", {"continuous": channel_names, "input_groups": groups,
                                       "categorical": list(CATEGORICAL_NAMES), "categorical_dims": [3, 3, 3, 3]})
    write_json(out / "manifest.json", manifest)
    return manifest


def forest_lines(train_w, test_w, seed: int, n_trees: int) -> tuple[np.ndarray, np.ndarray]:
    """(operation [N], token ids [N,L]) from a random forest that picks one of the training token rows (a class per
    distinct target line) from the flattened selected channels; the operation is the most common one of the chosen
    row's training windows."""
    from sklearn.ensemble import RandomForestClassifier

    rows, row_of = np.unique(train_w.tokens, axis=0, return_inverse=True)
    row_of = row_of.reshape(-1)
    operation_of = np.array([np.bincount(train_w.operation_type[row_of == r]).argmax() for r in range(len(rows))])
    model = RandomForestClassifier(n_estimators=n_trees, random_state=seed, n_jobs=1)
    model.fit(train_w.continuous.reshape(len(train_w), -1), row_of)
    chosen = model.predict(test_w.continuous.reshape(len(test_w), -1))
    return operation_of[chosen], rows[chosen]


def _row(model: str, scores: dict | list[dict], groups: list[str]) -> dict:
    """A report row: each metric's mean over the seeds' scores (one dict: that value) and, with several seeds, its
    sample sd (<metric>_sd) and the per-seed values (per_seed)."""
    runs = scores if isinstance(scores, list) else [scores]
    row = {"model": model, "groups": groups, "n_seeds": len(runs)}
    for m in METRICS:
        values = [r.get(m) for r in runs]
        if any(v is None for v in values):
            row[m] = None
            continue
        row[m] = float(np.mean(values))
        if len(runs) > 1:
            row[f"{m}_sd"] = float(np.std(values, ddof=1))
    for extra in ("threshold", "fallback_share", "feed_acc", "unseen_feed_acc", "unseen_feed_windows"):
        if all(r.get(extra) is not None for r in runs):
            row[extra] = float(np.mean([r[extra] for r in runs]))
    if len(runs) > 1:
        row["per_seed"] = [{m: r.get(m) for m in (*METRICS, "threshold", "fallback_share", "feed_acc",
                                                   "unseen_feed_acc") if m in r} for r in runs]
    return row


def seeds_of(cfg: CncConfig) -> list[int]:
    return list(cfg.umich_lines.seeds) or [cfg.run.seed]


def seed_config(cfg: CncConfig, seed: int) -> CncConfig:
    """cfg for one training repeat: run.seed's own run directory, <run_dir>/seed<N> for the others."""
    sub = copy.deepcopy(cfg)
    sub.run.seed = seed
    if seed != cfg.run.seed:
        sub.run.out_dir, sub.run.name = str(cfg.run.run_dir), f"seed{seed}"
    return sub


def evaluate_lines(cfg: CncConfig, vocab: Vocabulary, program_path: Path | None = None) -> tuple[list[dict], dict]:
    """Rows of the report (model rows per seed, k-NN, random forest per seed, majority) on the test split with
    cfg.data.channel_groups. `program_path`: the program the line library is trained on (umich_lines.library)."""
    from cnc_gcode.data import groups_used, load_split
    from studies.cnc_gcode.measured_only import knn_baseline

    train_w, test_w = load_split(cfg, "train", vocab), load_split(cfg, "test", vocab)
    used = groups_used(test_w)
    seeds = seeds_of(cfg)
    rows = []
    if cfg.umich_lines.train_model:
        per_seed = [train_and_score(seed_config(cfg, seed), vocab, program_path if cfg.umich_lines.library else None)
                    for seed in seeds]
        rows.append(_row("MMDTAELSTM + multi-head decoder (package stages)", [s["decoder"] for s in per_seed], used))
        if "library" in per_seed[0]:
            rows.append(_row("line library (encoder + library head, feed regressed)",
                             [s["library"] for s in per_seed], used))
            rows.append(_row("line library, decoder below the validation threshold",
                             [s["library_fallback"] for s in per_seed], used))

    def scored(operations: np.ndarray, tokens: np.ndarray) -> dict:
        """Token metrics of predicted token rows on the test windows, plus their operation accuracy."""
        return {**token_metrics(vocab, tokens, test_w.tokens),
                "operation_acc": float((operations == test_w.operation_type).mean())}

    rows.append(_row(f"{cfg.umich_lines.neighbors}-NN on flattened normalised windows",
                     scored(*knn_baseline(train_w, test_w, cfg.umich_lines.neighbors)), used))
    if cfg.umich_lines.forest_trees:
        rows.append(_row("random forest choosing a training line (sklearn)",
                         [scored(*forest_lines(train_w, test_w, seed, cfg.umich_lines.forest_trees))
                          for seed in seeds], used))
    majority_row = np.array([most_frequent(train_w.tokens[:, i]) for i in range(train_w.tokens.shape[1])])
    majority_op = np.bincount(train_w.operation_type).argmax()
    rows.append(_row("majority (token per position; operation)",
                     scored(np.full(len(test_w), majority_op), np.broadcast_to(majority_row, test_w.tokens.shape)), []))
    info = {"n_train_windows": len(train_w), "n_test_windows": len(test_w), "channels": test_w.channel_names,
            "majority_line": vocab.decode_line(majority_row), "seeds": seeds}
    return rows, info


def train_and_score(cfg: CncConfig, vocab: Vocabulary, program_path: Path | None = None) -> dict[str, dict]:
    """train_encoder + train (resumable, in <run_dir>) and constrained greedy decoding of the test split
    ("decoder"); with `program_path`, also the line_library stage on that program and its test lines alone
    ("library") and with the decoder's line below the threshold chosen on validation ("library_fallback")."""
    from cnc_gcode.checkpoints import load_models
    from cnc_gcode.data import load_split
    from cnc_gcode.evaluate import predict_windows, score
    from cnc_gcode.line_library import combine, configured_threshold, library_predict, load_library, train_library
    from cnc_gcode.train_decoder import train_decoder
    from cnc_gcode.train_encoder import train_encoder

    train_encoder(cfg)
    train_decoder(cfg)
    encoder, decoder, vocab, meta = load_models(cfg)
    test = load_split(cfg, "test", vocab, int(meta["continuous_dim"]), meta["channel_names"])
    op_pred, dec_tokens = predict_windows(encoder, decoder, vocab, test, cfg.eval.batch_size)
    out = {"decoder": score(vocab, test, op_pred, dec_tokens)}
    if program_path is None:
        return out
    cfg = copy.deepcopy(cfg)
    cfg.library.program = str(program_path)
    train_library(cfg)
    model, library, _, _ = load_library(cfg)
    lib_tokens, confidence, lib_ops = library_predict(model, library, test)
    threshold = configured_threshold(cfg)
    target_feed, predicted_feed = library.targets(test.tokens)[1], library.targets(lib_tokens)[1]
    fed = np.isfinite(target_feed)
    # feeds no training window has (experiment 09's F15): what a classifier over the training lines cannot write
    unseen = fed & ~np.isin(target_feed, library.targets(load_split(cfg, "train", vocab).tokens)[1])
    out["library"] = {**score(vocab, test, lib_ops, lib_tokens),
                      "feed_acc": float((predicted_feed[fed] == target_feed[fed]).mean()) if fed.any() else None,
                      "unseen_feed_acc": float((predicted_feed[unseen] == target_feed[unseen]).mean())
                      if unseen.any() else None, "unseen_feed_windows": int(unseen.sum())}
    fallback = confidence < threshold
    out["library_fallback"] = {**score(vocab, test, np.where(fallback, op_pred, lib_ops),
                                       combine(lib_tokens, confidence, dec_tokens, threshold)),
                               "threshold": threshold, "fallback_share": float(fallback.mean())}
    return out


def _cell(row: dict, metric: str) -> str:
    value = row.get(metric)
    if value is None:
        return "-"
    if f"{metric}_sd" in row:
        return f"{value:.3f} ± {row[f'{metric}_sd']:.3f}"
    return f"{value:.4f}"


def umich_lines(cfg: CncConfig) -> int:
    from cnc_gcode.config import set_threads

    set_threads(cfg)
    setup_logging()
    if "commanded" in cfg.data.channel_groups:
        raise UserError("config key 'data.channel_groups' holds 'commanded' (controller setpoints state the line); "
                        "umich_lines scores measured channels only: leave it out")
    if not cfg.umich.record_windows:
        raise UserError("config key 'umich.record_windows': umich_lines needs true (a window's line must be the one "
                        "executing in its rows, so no window may straddle two shuffled records)")
    uc, vocab = cfg.umich, load_vocabulary(cfg.data.vocab_path)
    data_dir = Path(uc.data_dir) if uc.data_dir else default_data_dir()
    files = dict(experiment_files(data_dir))
    if uc.map_experiment not in files:
        raise UserError(f"config key 'umich.map_experiment': experiment {uc.map_experiment} is not in {data_dir}; "
                        f"name the continuous run (01)")
    signals, phases, sequence = read_experiment(files[uc.map_experiment])
    program = reconstruct_program(signals, sequence, cfg.umich_lines.min_move_mm)
    phase_of_line, _ = learn_phase_map(sequence, phases, 0.0)  # every executed line's majority phase
    text = program_text(program)
    reports = cfg.run.run_dir / "reports"
    atomic_write_text(reports / "umich_program.ngc", text)
    parsed = [line for line in parse_program(text) if not line.is_empty or line.error]
    errors = [f"line {line.lineno}: {line.error}" for line in parsed if line.error]
    if errors:
        raise UserError(f"{reports / 'umich_program.ngc'}: the reconstructed program does not parse ({errors[:3]})")
    manifest = build_windows(cfg, data_dir, program, phase_of_line, vocab)
    sub = copy.deepcopy(cfg)
    out = Path(cfg.umich_lines.out_dir)
    sub.data.train_path, sub.data.val_path, sub.data.test_path = (str(out / f"{s}.npz") for s in SPLITS)
    rows, info = evaluate_lines(sub, vocab, reports / "umich_program.ngc")
    motions = {m: sum(1 for line in program if line.motion == m) for m in ("G0", "G1", None)}
    result = {"program": {"path": str(reports / "umich_program.ngc"), "experiment": uc.map_experiment,
                          "lines": len(program), "parsed_moving_lines": len(parsed), "parse_errors": len(errors),
                          "G0": motions["G0"], "G1": motions["G1"], "no_motion": motions[None]},
              "windows": manifest, "test_experiments": list(uc.test_experiments), **info, "rows": rows}
    write_json(reports / "umich_lines.json", result)
    table = markdown_table(["model", "input groups", "token acc", "line exact", "command acc", "parameter letter acc",
                            "value error, median (mm)", "phase acc"],
                           [[r["model"], ", ".join(r["groups"]) or "-", *[_cell(r, m) for m in METRICS]]
                            for r in rows])
    table = (f"Program: {len(program)} lines from experiment {uc.map_experiment:02d} ({motions['G0']} G0, "
             f"{motions['G1']} G1, {motions[None]} without motion), parsed without error. Test experiments "
             f"{list(uc.test_experiments)}: {info['n_test_windows']} windows of {uc.window} rows inside one record; "
             f"training {info['n_train_windows']}. Seeds {info['seeds']} (mean ± sample sd where several; 1-NN and "
             f"majority have no seed).\n\n" + table)
    atomic_write_text(reports / "umich_lines.md", table)
    print(table)
    return 0


main = config_main(CncConfig, umich_lines, __doc__, prog="python -m studies.cnc_gcode.umich_lines")

if __name__ == "__main__":
    raise SystemExit(main())
