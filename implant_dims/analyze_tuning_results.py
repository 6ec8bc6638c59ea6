"""Summarise an Optuna study of implant_dims.hpo (the original: analyze_tuning_results.py --tuning-job-name).

    python -m implant_dims.analyze_tuning_results --config configs/implant_dims/sample.yaml hpo.kind=dual
    python -m implant_dims.analyze_tuning_results --config configs/implant_dims/sample.yaml hpo.kind=classifier \
        classifier.target=model_type

Reads the study hpo.study_name (default implant_classifier_<target> or implant_dual) from hpo.storage (default
sqlite:///<run_dir>/hpo/optuna.db), the same as implant_dims.hpo, and writes to <run_dir>/hpo/<study>/:
  best_trials.csv / best_trials.md   the 10 best completed trials, best first in the study's direction (validation
                                     accuracy descending, mean MAE ascending): rank, number, value, duration, params
  param_importances.json / .png      fANOVA importance of each tuned parameter (optuna.importance), summing to 1;
                                     with fewer than 2 completed trials, no parameter that varies, or no variance in
                                     the objective, the reason is written instead
  optimization_history.png           objective of every finished trial (pruned ones at their last reported value)
                                     and the best-so-far line
  summary.json                       direction, trials per state, best trial (number, value, params, folder)
A study that does not exist is an input error (exit 2) naming the storage, the study and the command creating it.
Reading a study does not touch running trials, so it can be run while the search goes on.
"""

from __future__ import annotations

import csv
import logging
import math
from pathlib import Path
from typing import Any

from common import tuning
from common.cli import config_main
from common.io import atomic_write_text, write_json
from common.logs import setup_logging
from implant_dims.config import ImplantConfig
from implant_dims.hpo import OBJECTIVES, open_study, storage_url, study_dir

log = logging.getLogger(__name__)
TOP_K = 10


def load_existing_study(cfg: ImplantConfig) -> Any:
    """The study of `cfg`, or UserError naming the storage, the study and the command that creates it. A missing
    SQLite file is never created by looking for it."""
    return open_study(cfg, create=False)


def ranked_trials(study: Any) -> list[Any]:
    """Completed trials, best first in the study's direction (ties by trial number)."""
    import optuna

    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    sign = -1.0 if study.direction == optuna.study.StudyDirection.MAXIMIZE else 1.0
    return sorted(complete, key=lambda t: (sign * t.value, t.number))


def duration_s(trial: Any) -> float | None:
    return None if trial.duration is None else round(trial.duration.total_seconds(), 2)


def write_best_trials(study: Any, out: Path) -> list[dict]:
    """best_trials.csv and best_trials.md: the TOP_K best completed trials."""
    top = ranked_trials(study)[:TOP_K]
    param_names = sorted({name for t in top for name in t.params})
    rows = [{"rank": rank, "number": t.number, "value": t.value, "duration_s": duration_s(t),
             **{name: t.params.get(name) for name in param_names}} for rank, t in enumerate(top, 1)]
    columns = ["rank", "number", "value", "duration_s", *param_names]
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "best_trials.csv", "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    lines = [f"# {study.study_name}: best completed trials ({study.direction.name.lower()} the objective)", "",
             "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = [f"{v:.6g}" if isinstance(v, float) else ("" if v is None else str(v)) for v in row.values()]
        lines.append("| " + " | ".join(cells) + " |")
    if not rows:
        lines.append("| " + " | ".join("" for _ in columns) + " |")
        lines.append("")
        lines.append("No completed trial yet.")
    atomic_write_text(out / "best_trials.md", "\n".join(lines) + "\n")
    return rows


def importances(study: Any) -> tuple[dict[str, float] | None, str]:
    """(fANOVA importance per varying parameter, summing to 1) or (None, the reason there are none)."""
    import optuna

    complete = ranked_trials(study)
    if len(complete) < 2:
        return None, f"{len(complete)} completed trial(s); parameter importances need at least 2"
    varying = sorted({name for t in complete for name in t.params
                      if len({repr(u.params.get(name)) for u in complete}) > 1})
    if not varying:
        return None, "no tuned parameter takes more than one value among the completed trials"
    if len({t.value for t in complete}) < 2:
        return None, f"every completed trial has the same objective value ({complete[0].value}); nothing to explain"
    try:
        result = optuna.importance.get_param_importances(study, params=varying)
    except Exception as exc:  # noqa: BLE001 - any evaluator failure is reported, not fatal
        return None, f"optuna.importance failed: {type(exc).__name__}: {exc}"
    values = {k: float(v) for k, v in result.items()}
    total = sum(values.values())
    if not values or not math.isfinite(total) or total <= 0:
        return None, f"the importance evaluator found no variance to attribute ({values})"
    return values, ""


def _figure() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_importances(values: dict[str, float] | None, reason: str, path: Path, title: str) -> None:
    plt = _figure()
    fig, ax = plt.subplots(figsize=(7, 0.6 + 0.5 * max(len(values or {}), 3)))
    if values:
        names = list(values)[::-1]
        ax.barh(names, [values[n] for n in names], color="tab:blue")
        ax.set_xlabel("fANOVA importance (sums to 1)")
    else:
        ax.axis("off")
        ax.text(0.5, 0.5, f"no parameter importances:\n{reason}", ha="center", va="center", wrap=True)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_history(study: Any, path: Path, metric: str) -> None:
    """Objective per trial number (pruned trials at their last reported value) with the best-so-far line."""
    import optuna

    plt = _figure()
    maximize = study.direction == optuna.study.StudyDirection.MAXIMIZE
    fig, ax = plt.subplots(figsize=(7, 4))
    complete = sorted(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)),
                      key=lambda t: t.number)
    pruned = [t for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.PRUNED,))
              if t.value is not None]
    if complete:
        ax.scatter([t.number for t in complete], [t.value for t in complete], label="completed", color="tab:blue")
        best, line = None, []
        for t in complete:
            best = t.value if best is None else (max(best, t.value) if maximize else min(best, t.value))
            line.append(best)
        ax.step([t.number for t in complete], line, where="post", color="tab:red", label="best so far")
    if pruned:
        ax.scatter([t.number for t in pruned], [t.value for t in pruned], marker="x", color="grey",
                   label="pruned (last value)")
    if not complete and not pruned:
        ax.text(0.5, 0.5, "no finished trial yet", ha="center", va="center", transform=ax.transAxes)
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("trial number")
    ax.set_ylabel(f"validation {metric}")
    ax.set_title(f"{study.study_name} ({'maximise' if maximize else 'minimise'})")
    if complete or pruned:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def analyze(cfg: ImplantConfig) -> dict:
    """Write the reports of the study of `cfg`; returns summary.json's content."""
    study = load_existing_study(cfg)
    out = study_dir(cfg)
    out.mkdir(parents=True, exist_ok=True)
    metric = OBJECTIVES[cfg.hpo.kind]
    rows = write_best_trials(study, out)
    values, reason = importances(study)
    write_json(out / "param_importances.json", {"study_name": study.study_name, "evaluator": "fanova",
                                                "importances": values, "reason": reason or None})
    plot_importances(values, reason, out / "param_importances.png", f"{study.study_name}: parameter importances")
    plot_history(study, out / "optimization_history.png", metric)
    ranked = ranked_trials(study)
    best = ranked[0] if ranked else None
    counts = {state: 0 for state in ("COMPLETE", "PRUNED", "FAIL", "RUNNING", "WAITING")}
    counts.update(tuning.count_states(study))
    summary = {"study_name": study.study_name, "storage": storage_url(cfg), "kind": cfg.hpo.kind,
               "direction": study.direction.name.lower(), "objective": f"val_{metric}", "n_trials": sum(counts.values()),
               "counts": counts,
               "best": None if best is None else {"number": best.number, "value": best.value, "params": best.params,
                                                  "out_dir": best.user_attrs.get("out_dir"),
                                                  "overrides": best.user_attrs.get("overrides")},
               "importances": values, "importances_reason": reason or None, "top": rows}
    write_json(out / "summary.json", summary)
    if best is None:
        log.warning("study %s: no completed trial yet (%s)", study.study_name, counts)
    else:
        log.info("study %s: %s; best trial %d: val %s %.4f %s", study.study_name, counts, best.number, metric,
                 best.value, best.params)
    log.info("importances: %s", values if values else reason)
    log.info("wrote best_trials.csv/.md, param_importances.json/.png, optimization_history.png, summary.json to %s",
             out)
    return summary


def _main(cfg: ImplantConfig) -> int:
    setup_logging(None)
    analyze(cfg)
    return 0


main = config_main(ImplantConfig, _main, __doc__, prog="python -m implant_dims.analyze_tuning_results")

if __name__ == "__main__":
    raise SystemExit(main())
