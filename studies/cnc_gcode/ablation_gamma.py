"""Focal-gamma ablation: retrain the decoder over the same frozen encoder with each loss setting, then evaluate.

    python -m studies.cnc_gcode.ablation_gamma --config configs/cnc_gcode/sample.yaml ablation.epochs=10

Rows (ablation.gammas): `ce` cross-entropy, `ce+ls` cross-entropy with label smoothing (train.label_smoothing),
a number g = focal loss with gamma g and label smoothing. Each run lives in <run_dir>/ablations/gamma_<row>/
(and resumes there). Writes <run_dir>/reports/ablation_gamma.{md,json,png}: test token accuracy (constrained
greedy), line exact match and operation accuracy per row. `ablation.seeds=[0,1,2]` trains each row once per seed
(decoder initialisation, dropout and batch order; the frozen encoder is the run's) in gamma_<row>_seed<N>/, and the
table gives the mean and sample standard deviation over the seeds (per-seed values in the JSON).
"""

from __future__ import annotations

import copy
import logging

import numpy as np

from cnc_gcode.checkpoints import DECODER_DIR, encoder_path, load_models
from cnc_gcode.config import CncConfig, set_threads
from cnc_gcode.data import cap_windows, groups_used, load_split
from cnc_gcode.evaluate import predict_windows, score
from cnc_gcode.train_decoder import train_decoder
from common.cli import config_main
from common.errors import UserError
from common.io import atomic_write, atomic_write_text, write_json
from common.logs import setup_logging

log = logging.getLogger(__name__)


def loss_setting(row: str, label_smoothing: float) -> tuple[float, float]:
    """Ablation row -> (gamma, label_smoothing)."""
    if row == "ce":
        return 0.0, 0.0
    if row == "ce+ls":
        return 0.0, label_smoothing
    try:
        return float(row), label_smoothing
    except ValueError as exc:
        raise UserError(f"config key 'ablation.gammas': row {row!r} is not 'ce', 'ce+ls' or a number") from exc


def bar_chart(labels: list[str], values: list[float], path, ylabel: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(4, 0.9 * len(labels) + 2), 3.5))
    bars = ax.bar(range(len(labels)), values, color="#4477aa")
    ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    low = min(values) if values else 0.0
    ax.set_ylim(max(0.0, low - 0.1), 1.0)
    for bar, value in zip(bars, values):
        ax.text(bar.get_x() + bar.get_width() / 2, value, f"{value:.3f}", ha="center", va="bottom", fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    plt.close(fig)


def markdown_table(header: list[str], rows: list[list]) -> str:
    def cell(v):
        return f"{v:.4f}" if isinstance(v, float) else str(v)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


SEED_METRICS = ("token_acc", "token_acc_tol", "line_exact_match", "operation_acc")


def seed_summary(per_seed: list[dict]) -> dict:
    """Mean of each metric over seeds (under the metric's own name), its sample std (`<metric>_std`, 0 for one seed)
    and the per-seed scores (`per_seed`)."""
    out: dict = {}
    for key in per_seed[0]:
        if key == "seed":
            continue
        values = [s[key] for s in per_seed]
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            out[key] = float(np.mean(values))
            if key in SEED_METRICS:
                out[f"{key}_std"] = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
        else:
            out[key] = values[0]
    out["per_seed"] = per_seed
    return out


def mean_cell(row: dict, key: str, seeds: int) -> str:
    return f"{row[key]:.4f} ± {row[key + '_std']:.4f}" if seeds > 1 else f"{row[key]:.4f}"


def ablation_gamma(cfg: CncConfig) -> int:
    set_threads(cfg)
    setup_logging()
    encoder_ckpt = encoder_path(cfg)
    seeds = list(cfg.ablation.seeds) or [cfg.run.seed]
    results = []
    for row in map(str, cfg.ablation.gammas):
        gamma, smoothing = loss_setting(row, cfg.train.label_smoothing)
        per_seed = []
        for seed in seeds:
            sub = copy.deepcopy(cfg)
            sub.run.out_dir = str(cfg.run.run_dir / "ablations")
            sub.run.name = f"gamma_{row.replace('+', '_')}" + (f"_seed{seed}" if len(seeds) > 1 else "")
            sub.run.seed = seed
            sub.train.focal_gamma, sub.train.label_smoothing = gamma, smoothing
            sub.train.encoder_checkpoint = str(encoder_ckpt)
            if cfg.ablation.epochs:
                sub.train.epochs = cfg.ablation.epochs
                sub.train.warmup_epochs = min(sub.train.warmup_epochs, cfg.ablation.epochs)
            log.info("ablation row %s seed %d: gamma=%s label_smoothing=%s", row, seed, gamma, smoothing)
            train_decoder(sub)
            encoder, decoder, vocab, meta = load_models(sub, sub.run.run_dir / DECODER_DIR / "checkpoints" / "best")
            test = cap_windows(load_split(cfg, "test", vocab, int(meta["continuous_dim"])), cfg.eval.max_windows,
                               cfg.run.seed)
            scores = score(vocab, test, *predict_windows(encoder, decoder, vocab, test, cfg.eval.batch_size))
            per_seed.append({"seed": seed, **scores})
        results.append({"row": row, "gamma": gamma, "label_smoothing": smoothing, "channel_groups": groups_used(test),
                        "seeds": seeds, **seed_summary(per_seed)})
    reports = cfg.run.run_dir / "reports"
    write_json(reports / "ablation_gamma.json", results)
    n = len(seeds)
    table = markdown_table(["loss", "gamma", "label smoothing", "token acc", "within tolerance", "line exact",
                            "operation acc"],
                           [[r["row"], r["gamma"], r["label_smoothing"], mean_cell(r, "token_acc", n),
                             mean_cell(r, "token_acc_tol", n), mean_cell(r, "line_exact_match", n),
                             mean_cell(r, "operation_acc", n)] for r in results])
    table = (f"Input groups: {', '.join(results[0]['channel_groups'])}; "
             f"{'mean ± std over seeds ' + str(seeds) if n > 1 else 'seed ' + str(seeds[0])}\n\n" + table)
    atomic_write_text(reports / "ablation_gamma.md", table)
    bar_chart([r["row"] for r in results], [r["token_acc"] for r in results], reports / "ablation_gamma.png",
              "test token accuracy", "decoder loss ablation")
    print(table)
    return 0


main = config_main(CncConfig, ablation_gamma, __doc__, prog="python -m studies.cnc_gcode.ablation_gamma")

if __name__ == "__main__":
    raise SystemExit(main())
