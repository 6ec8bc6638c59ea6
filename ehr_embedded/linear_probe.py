"""Linear probe: standardised logistic regression on the representations `represent` exported.

    python -m ehr_embedded.represent run_dir=runs/ehr_embedded/mimic/finetune_encoder
    python -m ehr_embedded.linear_probe run_dir=runs/ehr_embedded/mimic/finetune_encoder
    python -m ehr_embedded.linear_probe train=A.parquet tuning=B.parquet held_out=C.parquet output_dir=OUT
    python -m ehr_embedded.linear_probe run_dir=RUN selection=grouped_cv cv_folds=5      # C by subject-grouped CV

The standard way foundation models are compared: freeze the model, fit a linear classifier on its patient vectors.
A StandardScaler fitted on train, then sklearn LogisticRegression (L2, lbfgs; multinomial for more than two classes;
balanced class weights by default) for each C of `c_grid`. C is chosen by tuning AUROC (binary; macro one-vs-rest for
multi-class) or, with `selection=grouped_cv`, by the mean AUROC over GroupKFold folds of train grouped by subject; the
decision threshold is the F1-best one on tuning (binary). held_out is scored once, with subject-bootstrap 95%
intervals (evaluate.binary_metrics / multiclass_metrics). Writes `linear_probe.json` (the report; summarize reads the
binary one), `linear_probe.md` and `linear_probe_held_out.parquet` (predictions, evaluate's columns) into
`output_dir` (default: beside the held_out file).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GroupKFold, cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from common.cli import config_main
from common.errors import UserError
from common.io import atomic_write_text, write_json
from common.logs import setup_logging
from ehr_embedded.config import LinearProbeConfig
from ehr_embedded.evaluate import choose_threshold, macro_ovr_auroc, task_metrics
from ehr_embedded.prediction_files import DEFAULT_THRESHOLD, write_multiclass_predictions, write_predictions
from ehr_embedded.represent import SPLITS, read_representations

log = logging.getLogger(__name__)


def representation_files(cfg: LinearProbeConfig) -> dict[str, Path]:
    """split -> parquet: explicit files win, the rest come from `<run_dir>/representations/`."""
    files = {}
    for split in SPLITS:
        given = getattr(cfg, split)
        if given is None and cfg.run_dir is not None:
            given = Path(cfg.run_dir) / "representations" / f"{split}.parquet"
        if given is None:
            raise UserError(f"linear_probe: no {split} representations; pass run_dir=RUN (after `python -m "
                            f"ehr_embedded.represent run_dir=RUN`) or {split}=FILE")
        files[split] = Path(given)
    return files


def probe_model(c: float, cfg: LinearProbeConfig):
    """StandardScaler + LogisticRegression(C=c): what is fitted for every C and every fold."""
    weight = "balanced" if cfg.class_weight == "balanced" else None
    return make_pipeline(StandardScaler(), LogisticRegression(C=c, class_weight=weight, max_iter=cfg.max_iter,
                                                              random_state=cfg.seed))


def ranking_score(y: np.ndarray, probs: np.ndarray) -> float:
    """AUROC for two classes, macro one-vs-rest AUROC for more (ValueError when a class is missing)."""
    from sklearn.metrics import roc_auc_score

    if probs.shape[1] == 2:
        return float(roc_auc_score(y, probs[:, 1]))
    return macro_ovr_auroc(y, probs)


def load_splits(files: dict[str, Path]) -> dict[str, tuple]:
    """split -> (frame, x, meta); all splits must have the same dimension, train at least two classes and every
    tuning / held_out class must occur in train."""
    data = {s: read_representations(p) for s, p in files.items()}
    dims = {s: x.shape[1] for s, (_, x, _) in data.items()}
    if len(set(dims.values())) > 1:
        raise UserError(f"{files['held_out']}: representations are {dims['held_out']}-d but {files['train']} is "
                        f"{dims['train']}-d (dims by split: {dims}); export all splits from the same run")
    for split, (frame, _, _) in data.items():
        if len(frame) == 0:
            raise UserError(f"{files[split]}: no rows; the probe needs rows in every split")
    if any(frame["label"].dtype == object for frame, _, _ in data.values()):
        raise UserError(f"{files['train']}: multi-label rows (one label list per row); the linear probe fits one "
                        f"task: export representations from a single-task store")
    if any(np.issubdtype(frame["label"].dtype, np.floating) for frame, _, _ in data.values()):
        raise UserError(f"{files['train']}: float (float_value regression) labels; the linear probe is a classifier "
                        f"(for regression use ehr_embedded.baseline, which fits Ridge)")
    train_classes = set(np.unique(data["train"][0]["label"]).tolist())
    if len(train_classes) < 2:
        raise UserError(f"{files['train']}: one class only ({sorted(train_classes)}); a probe needs two or more")
    for split in ("tuning", "held_out"):
        extra = sorted(set(np.unique(data[split][0]["label"]).tolist()) - train_classes)
        if extra:
            raise UserError(f"{files[split]}: class(es) {extra} never occur in {files['train']}; the probe cannot "
                            f"predict them")
    if sorted(train_classes) != list(range(len(train_classes))):
        raise UserError(f"{files['train']}: classes {sorted(train_classes)}; expected 0..K-1 (what represent writes)")
    return data


def select_c(cfg: LinearProbeConfig, x: dict, y: dict, groups: np.ndarray, files: dict) -> tuple[float, dict]:
    """(chosen C, {C: selection score}); the first of equal scores wins (grid order)."""
    scores = {}
    n_classes = len(np.unique(y["train"]))
    if cfg.selection == "tuning":
        if len(np.unique(y["tuning"])) < n_classes:
            raise UserError(f"{files['tuning']}: the tuning split lacks a class, so tuning AUROC is undefined; use "
                            f"selection=grouped_cv")
        for c in cfg.c_grid:
            scores[c] = ranking_score(y["tuning"], probe_model(c, cfg).fit(x["train"], y["train"]).predict_proba(
                x["tuning"]))
    else:
        if len(np.unique(groups)) < cfg.cv_folds:
            raise UserError(f"{files['train']}: {len(np.unique(groups))} subjects for cv_folds={cfg.cv_folds}; "
                            f"lower cv_folds")
        scoring = "roc_auc" if n_classes == 2 else "roc_auc_ovr"
        for c in cfg.c_grid:
            folds = cross_val_score(probe_model(c, cfg), x["train"], y["train"], groups=groups,
                                    cv=GroupKFold(n_splits=cfg.cv_folds), scoring=scoring)
            scores[c] = float(np.mean(folds))
    for c, score in scores.items():
        log.info("C=%g %s AUROC %.4f", c, cfg.selection, score)
    best = max(scores, key=lambda c: (scores[c], -cfg.c_grid.index(c)))
    return best, scores


def linear_probe(cfg: LinearProbeConfig) -> dict:
    files = representation_files(cfg)
    data = load_splits(files)
    x = {s: d[1] for s, d in data.items()}
    y = {s: d[0]["label"].to_numpy(np.int64) for s, d in data.items()}
    groups = data["train"][0]["subject_id"].to_numpy()
    c, scores = select_c(cfg, x, y, groups, files)
    model = probe_model(c, cfg).fit(x["train"], y["train"])
    tuning_probs = model.predict_proba(x["tuning"])
    probs = model.predict_proba(x["held_out"])
    threshold = choose_threshold(y["tuning"], tuning_probs[:, 1]) if probs.shape[1] == 2 else DEFAULT_THRESHOLD
    held = data["held_out"][0]
    meta = data["held_out"][2]
    try:
        tuning_auroc = ranking_score(y["tuning"], tuning_probs)
    except ValueError:
        tuning_auroc = None
    report = {"model": f"linear probe (standardised logistic regression) on {meta.get('model_type', 'the')} "
                       f"representation", "representations": {s: str(p) for s, p in files.items()},
              "source": meta, "dim": int(x["train"].shape[1]), "n_train": int(len(y["train"])),
              "selection": cfg.selection, "cv_folds": cfg.cv_folds if cfg.selection == "grouped_cv" else None,
              "c_grid": list(cfg.c_grid), "selection_auroc": {str(k): v for k, v in scores.items()}, "C": c,
              "class_weight": cfg.class_weight, "tuning_auroc": tuning_auroc, "split": "held_out",
              **task_metrics(y["held_out"], probs, threshold, cfg.n_bootstrap, cfg.seed,
                             subject_ids=held["subject_id"].to_numpy())}
    out = Path(cfg.output_dir) if cfg.output_dir is not None else files["held_out"].parent
    write_json(out / "linear_probe.json", report)
    atomic_write_text(out / "linear_probe.md", markdown(report))
    if probs.shape[1] == 2:
        write_predictions(out / "linear_probe_held_out.parquet", held, y["held_out"], probs[:, 1], threshold)
    else:
        write_multiclass_predictions(out / "linear_probe_held_out.parquet", held, y["held_out"], probs)
    headline = "auroc" if "auroc" in report else "macro_auroc_ovr"
    if headline in report:
        log.info("linear probe held_out %s %.4f [%.4f, %.4f] (C=%g by %s) -> %s", headline, report[headline]["value"],
                 report[headline]["low"], report[headline]["high"], c, cfg.selection, out / "linear_probe.json")
    return report


def markdown(report: dict) -> str:
    rows = [(k, v) for k, v in report.items() if isinstance(v, dict) and "value" in v]
    lines = [f"# {report['model']}", "",
             f"train {report['representations']['train']} ({report['n_train']} rows, {report['dim']}-d); C = "
             f"{report['C']:g} chosen by {report['selection']} AUROC over {report['c_grid']}; held_out n = "
             f"{report['n']}, bootstrap over {report['bootstrap']}.", "",
             "| metric | held_out value | 95% CI |", "|---|---|---|"]
    lines += [f"| {k} | {v['value']:.3f} | [{v['low']:.3f}, {v['high']:.3f}] |" for k, v in rows]
    return "\n".join(lines) + "\n"


def run(cfg: LinearProbeConfig) -> int:
    setup_logging()
    linear_probe(cfg)
    return 0


main = config_main(LinearProbeConfig, run, __doc__)

if __name__ == "__main__":
    raise SystemExit(main())
