"""Evaluate a trained pipeline on a split: operation accuracy and constrained-greedy token metrics vs baselines.

    python -m cnc_gcode.evaluate --config configs/cnc_gcode/sample.yaml            # test split
    python -m cnc_gcode.evaluate --config configs/cnc_gcode/sample.yaml eval.split=val

Writes <run_dir>/reports/results_<split>.json (operation accuracy, token / type / command / parameter-type /
exponent / per-digit accuracy, line exact match, numeric error of decoded parameters in mm, token accuracy with
values within tolerance (coordinates 0.1 mm, F / S 2 %; `token_acc_tol`), value errors per letter group
(`value_err_*`), random and majority baselines), confusion_<split>.png (operations) and samples_<split>.txt (target vs decoded lines).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch

from cnc_gcode.checkpoints import load_models
from cnc_gcode.config import CncConfig, set_threads
from cnc_gcode.data import Windows, batches, cap_windows, groups_used, load_split, load_windows, split_path
from cnc_gcode.decoding import decode_cached
from cnc_gcode.metrics import baselines, token_metrics
from cnc_gcode.virtual_mill import OPERATIONS
from common.cli import config_main
from common.io import atomic_write, atomic_write_text, write_json
from common.logs import setup_logging

log = logging.getLogger(__name__)


def masked_continuous(encoder, continuous: np.ndarray, channels: list[int]) -> np.ndarray:
    """Remove channels by replacing them with their training mean (zero after normalisation)."""
    if not channels:
        return continuous
    out = continuous.copy()
    out[..., channels] = encoder.channel_mean.numpy()[channels]
    return out


@torch.no_grad()
def predict_windows(encoder, decoder, vocab, windows: Windows, batch_size: int = 128,
                    drop_channels: list[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Operation predictions [N] and constrained greedy token ids [N,L]. A decoder with value heads reads its
    anchors (the last measured X/Y/Z) from the same raw continuous input the encoder gets."""
    continuous = masked_continuous(encoder, windows.continuous, drop_channels or [])
    ops, tokens = [], []
    for idx in batches(len(windows), batch_size):
        raw = torch.from_numpy(continuous[idx])
        memory, op_logits = encoder(raw, torch.from_numpy(windows.categorical[idx]))
        ops.append(op_logits.argmax(1).numpy())
        anchor = decoder.value_anchor(raw) if getattr(decoder, "regress", False) else None
        tokens.append(decode_cached(decoder, memory, vocab, anchor))
    return np.concatenate(ops), np.concatenate(tokens)


def score(vocab, windows: Windows, op_pred: np.ndarray, token_pred: np.ndarray) -> dict:
    scores = token_metrics(vocab, token_pred, windows.tokens)
    scores["operation_acc"] = float((op_pred == windows.operation_type).mean())
    return scores


def confusion_plot(y_true: np.ndarray, y_pred: np.ndarray, labels: list[str], path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import confusion_matrix

    matrix = confusion_matrix(y_true, y_pred, labels=list(range(len(labels))))
    fig, ax = plt.subplots(figsize=(7, 6))
    ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(len(labels)), labels, rotation=60, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    for i in range(len(labels)):
        for j in range(len(labels)):
            if matrix[i, j]:
                ax.text(j, i, str(matrix[i, j]), ha="center", va="center", fontsize=7,
                        color="white" if matrix[i, j] > matrix.max() / 2 else "black")
    ax.set_xlabel("predicted operation")
    ax.set_ylabel("true operation")
    ax.set_title(title)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    plt.close(fig)


def operation_names(n: int, data_path: str | Path | None = None) -> list[str]:
    """Names of the n operation classes: the `phases` of the manifest.json beside the data (ingest_umich writes
    them) when it lists n, else the simulator's operations, else op0..op{n-1}."""
    manifest = Path(data_path).parent / "manifest.json" if data_path else None
    if manifest is not None and manifest.is_file():
        phases = json.loads(manifest.read_text(encoding="utf-8")).get("phases")
        if isinstance(phases, list) and len(phases) == n:
            return [str(p) for p in phases]
    return list(OPERATIONS) if n == len(OPERATIONS) else [f"op{i}" for i in range(n)]


def evaluate(cfg: CncConfig) -> int:
    set_threads(cfg)
    reports = cfg.run.run_dir / "reports"
    setup_logging()
    encoder, decoder, vocab, meta = load_models(cfg)
    windows = cap_windows(load_split(cfg, cfg.eval.split, vocab, int(meta["continuous_dim"]), meta.get("channel_names")),
                          cfg.eval.max_windows, cfg.run.seed)
    op_pred, token_pred = predict_windows(encoder, decoder, vocab, windows, cfg.eval.batch_size)
    results = {"split": cfg.eval.split, "path": split_path(cfg, cfg.eval.split), "n_windows": len(windows),
               "skipped_nan_windows": windows.skipped_nan, "channel_groups": groups_used(windows),
               "channels": windows.channel_names, "vocab_size": vocab.size, **score(vocab, windows, op_pred,
                                                                                            token_pred)}
    train = load_windows(cfg.data.train_path, vocab, labels=True, nan_policy="skip")
    results.update(baselines(vocab, train.tokens, windows.tokens, cfg.run.seed))
    majority_op = np.bincount(train.operation_type).argmax()
    results["majority_operation_acc"] = float((windows.operation_type == majority_op).mean())
    write_json(reports / f"results_{cfg.eval.split}.json", results)
    names = operation_names(cfg.encoder.n_operations, cfg.data.train_path)
    confusion_plot(windows.operation_type, op_pred, names, reports / f"confusion_{cfg.eval.split}.png",
                   f"operations, {cfg.eval.split} split (acc {results['operation_acc']:.3f})")
    lines = [f"{'target':<40} | decoded"]
    for i in range(min(40, len(windows))):
        lines.append(f"{vocab.decode_line(windows.tokens[i]):<40} | {vocab.decode_line(token_pred[i])}")
    atomic_write_text(reports / f"samples_{cfg.eval.split}.txt", "\n".join(lines) + "\n")
    log.info("input groups: %s", ", ".join(results["channel_groups"]))
    log.info("%s: operation_acc %.4f token_acc %.4f (majority %.4f, random %.4f) line_exact %.4f", cfg.eval.split,
             results["operation_acc"], results["token_acc"], results["majority_token_acc"],
             results["random_token_acc"], results["line_exact_match"])
    log.info("%s: token_acc with values within tolerance %.4f; value error X/Y/Z median %.3f mm, p95 %.3f mm; F "
             "median %.2f %%", cfg.eval.split, results["token_acc_tol"], results["value_err_xyz_median_mm"],
             results["value_err_xyz_p95_mm"], results["value_err_f_median_pct"])
    print(f"results: {reports / f'results_{cfg.eval.split}.json'}")
    return 0


main = config_main(CncConfig, evaluate, __doc__, prog="python -m cnc_gcode.evaluate")

if __name__ == "__main__":
    raise SystemExit(main())
