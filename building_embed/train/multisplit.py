"""Does training the head help? Frozen embeddings vs the trained head vs PCA + LDA over many identity-disjoint splits.

    python -m building_embed.train.multisplit --config configs/building_embed/sample.toml
    python -m building_embed.train.multisplit --config configs/building_embed/config.toml multisplit.repeats=1

(studies/building_embed/faces.sh runs it on the ORL faces for the results tables.)

One split's result depends on which people land in its test set, so a single "head beats frozen" can be luck. This
stage pools every merged split (paths.merged_dir/{train,val,test}.parquet) and repeats identity k-fold
(multisplit.folds x multisplit.repeats splits, whole place groups per fold, seeded by multisplit.seed). In each split
one fold is the test set; of the other groups data.val_fraction (by images) is the validation set (early stopping)
and the rest trains. Per split, with the package's own stages: the split files are written, the difficulty bands
computed on its training images (difficulty.compute_visual_neighbors) and the head trained (train.train's
run_training, global.seed); then the test people are retrieved with the frozen embeddings, the best head, and a
closed-form reference fitted on the training and validation people (sklearn StandardScaler -> PCA
(multisplit.pca_dim) -> LinearDiscriminantAnalysis), all on train/retrieval.py's protocol.

The summary pairs the splits: for recall@1 and mAP@R, the mean of (model - frozen) over splits with a 95 % Student t
interval over splits (t with n_splits - 1 degrees of freedom), the same interval with Nadeau & Bengio's correction
for overlapping training sets (variance x (1 / n + n_test / n_train); wider, the honest one for repeated CV), and
wins / ties / losses (a tie: equal within multisplit.tie_tolerance).

Writes paths.runs_dir/<global.run_name>/: splits/split_<k>/{merged/, difficulty/, run/, metrics.csv, done.json},
per_split.csv (every split's rows), summary.json and summary.md. Resume: with global.resume=auto a split whose
done.json records the same settings and split files is read back, not retrained (a killed run continues at the split
where it stopped, and the training of that split resumes from its checkpoint); a split made with other settings is
refused (exit 2) naming what changed; global.resume=false redoes every split, force keeps finished ones as they are.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import torch
from scipy import stats

from building_embed.config import BuildingEmbedConfig
from building_embed.difficulty.compute_visual_neighbors import compute as compute_difficulty
from building_embed.generate.generate_embeddings import embeddings_table
from building_embed.model import build_head
from building_embed.preprocess.merge_and_split import SPLITS, read_split
from building_embed.preprocess.schema import IDENTITY
from building_embed.train.data import PANORAMA, load_split
from building_embed.train.retrieval import embed, retrieval_metrics
from building_embed.train.train import OPTUNA_KEYS, run_training
from common.checkpoint import load_weights
from common.cli import config_main
from common.config import to_dict
from common.errors import UserError
from common.fingerprint import fingerprint_changes, make_fingerprint
from common.io import atomic_write, atomic_write_text, write_json
from common.logs import setup_logging

log = logging.getLogger(__name__)
MODELS = ("frozen", "head", "pca_lda")
COMPARED = ("recall@1", "map@r")
GROUP = "place_group"
DONE_FILE, METRICS_FILE = "done.json", "metrics.csv"


@dataclass
class MultiSplitConfig:
    folds: int = 5
    """Identity folds per repeat: every fold (whole place groups) is the test set of one split."""
    repeats: int = 2
    """Repeats of the k-fold partition, each shuffled anew: multisplit.folds x multisplit.repeats splits."""
    seed: int = 0
    """Seed of the fold and validation assignment (global.seed seeds the training of every split)."""
    pca_dim: int = 64
    """PCA components before LDA in the closed-form reference (capped at the training images - 1 and the width)."""
    confidence: float = 0.95
    """Coverage of the paired intervals over splits."""
    tie_tolerance: float = 1e-9
    """A split whose model - frozen difference is within this is a tie, not a win or a loss."""

    def __post_init__(self) -> None:
        if self.folds < 2 or self.repeats < 1:
            raise ValueError(f"multisplit.folds ({self.folds}) must be >= 2 and multisplit.repeats ({self.repeats}) "
                             ">= 1")
        if self.folds * self.repeats < 2:
            raise ValueError("multisplit.folds x multisplit.repeats must give at least 2 splits for an interval")
        if not 0.0 < self.confidence < 1.0:
            raise ValueError(f"multisplit.confidence must be in (0, 1), got {self.confidence}")
        if self.pca_dim < 1:
            raise ValueError(f"multisplit.pca_dim must be positive, got {self.pca_dim}")


@dataclass
class MultiSplitStageConfig(BuildingEmbedConfig):
    """The building_embed config plus [multisplit] (given on the command line or in a config of its own)."""

    multisplit: MultiSplitConfig = field(default_factory=MultiSplitConfig)


def pooled_merged(merged_dir: Path) -> tuple[pd.DataFrame, np.ndarray, dict]:
    """(frame, float32 [N, D] embeddings, embedding schema metadata) of every merged split file, concatenated."""
    paths = [merged_dir / f"{s}.parquet" for s in SPLITS if (merged_dir / f"{s}.parquet").is_file()]
    if not paths:
        raise UserError(f"{merged_dir}: no train / val / test .parquet; run python -m "
                        "building_embed.preprocess.merge_and_split first or set paths.merged_dir")
    frames, values = zip(*(read_split(p) for p in paths))
    frame = pd.concat(frames, ignore_index=True).drop(columns=["split"], errors="ignore")
    for column in (IDENTITY, PANORAMA):
        if column not in frame.columns:
            raise UserError(f"{paths[0]}: no {column!r} column; regenerate it with merge_and_split")
    if GROUP not in frame.columns:  # files without place groups: each identity is its own group
        frame[GROUP] = pd.factorize(frame[IDENTITY])[0]
    meta = json.loads(pq.read_schema(paths[0]).metadata[b"building_embed"])
    return frame, np.concatenate(values), {"embedding_dim": int(meta["embedding_dim"]), "dtype": "float16"}


def split_plan(frame: pd.DataFrame, ms: MultiSplitConfig, val_fraction: float) -> list[dict]:
    """Every split: {"index", "repeat", "fold", "assignment": array of train / val / test per row}.

    Groups are shuffled per repeat (seeded) and dealt into the fold with the fewest images so far, so folds hold
    about the same number of images. Validation: groups of the non-test part, in a seeded order, until
    data.val_fraction of its images (at least one group)."""
    groups = frame[GROUP].to_numpy()
    names, sizes = np.unique(groups, return_counts=True)
    if len(names) < ms.folds + 2:
        raise UserError(f"multisplit.folds={ms.folds}: the merged splits hold only {len(names)} place groups; need "
                        f"folds + 2 (a test fold, training and validation groups); lower multisplit.folds")
    plans = []
    for repeat in range(ms.repeats):
        rng = np.random.default_rng([ms.seed, repeat])
        fold_of, fold_images = {}, np.zeros(ms.folds, np.int64)
        for g in rng.permutation(len(names)):
            fold = int(np.argmin(fold_images))
            fold_of[names[g]] = fold
            fold_images[fold] += sizes[g]
        for fold in range(ms.folds):
            rest = [i for i in range(len(names)) if fold_of[names[i]] != fold]
            order = np.random.default_rng([ms.seed, repeat, fold + 1]).permutation(rest)
            budget, taken, val = val_fraction * sizes[rest].sum(), 0, set()
            for i in order:
                if taken >= budget and val:
                    break
                val.add(names[i])
                taken += sizes[i]
            assignment = np.where(np.isin(groups, [n for n, f in fold_of.items() if f == fold]), "test",
                                  np.where(np.isin(groups, list(val)), "val", "train"))
            plans.append({"index": len(plans), "repeat": repeat, "fold": fold, "assignment": assignment})
    return plans


def _base_config(cfg: MultiSplitStageConfig, split_dir: Path) -> BuildingEmbedConfig:
    """The plain building_embed config of one split: its own merged / difficulty folders and run directory."""
    base = BuildingEmbedConfig(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(BuildingEmbedConfig)})
    paths = dataclasses.replace(cfg.paths, merged_dir=str(split_dir / "merged"),
                                difficulty_dir=str(split_dir / "difficulty"), runs_dir=str(split_dir))
    data = dataclasses.replace(cfg.data, difficulty_splits=["train"])
    return dataclasses.replace(base, paths=paths, data=data, global_=dataclasses.replace(cfg.global_, run_name="run"))


def write_split_files(frame: pd.DataFrame, embeddings: np.ndarray, assignment: np.ndarray, meta: dict,
                      merged_dir: Path) -> dict[str, Path]:
    """merged_dir/{train,val,test}.parquet of one split, in merge_and_split's format."""
    paths = {}
    for name in SPLITS:
        rows = assignment == name
        part = frame[rows].assign(split=name)
        table = embeddings_table({c: part[c].to_numpy() for c in part.columns}, embeddings[rows], meta)
        paths[name] = atomic_write(merged_dir / f"{name}.parquet", lambda tmp, t=table: pq.write_table(t, tmp))
    return paths


def split_fingerprint(cfg: MultiSplitStageConfig, files: dict[str, Path]) -> dict:
    sections = {"global": {"seed": cfg.global_.seed}, "training_model": to_dict(cfg.training_model),
                "training": to_dict(cfg.training), "data": to_dict(cfg.data),
                "multisplit": {k: v for k, v in to_dict(cfg.multisplit).items() if k not in ("confidence",
                                                                                                "tie_tolerance")}}
    heartbeats = tuple(f"training.optuna_{k}" for k in ("heartbeat_interval", "grace_period", "max_retries"))
    return make_fingerprint(sections, data=files, volatile=(*OPTUNA_KEYS, *heartbeats))


def pca_lda_embeddings(train_x: np.ndarray, train_identity: np.ndarray, test_x: np.ndarray,
                       pca_dim: int) -> torch.Tensor:
    """Test embeddings [N, C - 1] from StandardScaler -> PCA -> LDA fitted on the training people (C of them)."""
    from sklearn.decomposition import PCA
    from sklearn.discriminant_analysis import LinearDiscriminantAnalysis
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    n_components = min(pca_dim, train_x.shape[1], len(train_x) - 1)
    model = make_pipeline(StandardScaler(), PCA(n_components=n_components, random_state=0),
                          LinearDiscriminantAnalysis())
    model.fit(train_x, train_identity)
    return torch.from_numpy(np.ascontiguousarray(model.transform(test_x), np.float32))


def evaluate_split(split_cfg: BuildingEmbedConfig, pca_dim: int) -> dict[str, dict[str, float]]:
    """Test-set metrics of the frozen embeddings, the split's best head and PCA + LDA."""
    dim = split_cfg.training_model.input_dim
    merged = Path(split_cfg.paths.merged_dir)
    train, val, test = (load_split(merged / f"{s}.parquet", s, dim) for s in SPLITS)
    head = build_head(split_cfg.training_model)
    load_weights(Path(split_cfg.paths.runs_dir) / split_cfg.global_.run_name / "checkpoints" / "best", head)
    fit_x = torch.cat([train.embeddings, val.embeddings]).numpy()
    fit_identity = np.concatenate([train.frame[IDENTITY].to_numpy(), val.frame[IDENTITY].to_numpy()])
    outputs = {"frozen": test.embeddings, "head": embed(head, test.embeddings),
               "pca_lda": pca_lda_embeddings(fit_x, fit_identity, test.embeddings.numpy(), pca_dim)}
    memory_mb = split_cfg.infrastructure.eval_memory_mb
    return {name: retrieval_metrics(z, test.identity, test.panorama, memory_mb=memory_mb)
            for name, z in outputs.items()}


def run_split(cfg: MultiSplitStageConfig, plan: dict, frame: pd.DataFrame, embeddings: np.ndarray, meta: dict,
              split_dir: Path) -> pd.DataFrame:
    """One split end to end (or read back when done.json matches); its metrics.csv rows."""
    split_cfg = _base_config(cfg, split_dir)
    assignment = plan["assignment"]
    files = write_split_files(frame, embeddings, assignment, meta, split_dir / "merged")
    fingerprint = split_fingerprint(cfg, files)
    done, resume = split_dir / DONE_FILE, cfg.global_.resume
    if done.is_file() and (split_dir / METRICS_FILE).is_file() and resume != "false":
        changes = fingerprint_changes(json.loads(done.read_text())["fingerprint"], fingerprint)
        if not changes or resume == "force":
            log.info("split %d: done earlier, read back from %s", plan["index"], split_dir / METRICS_FILE)
            return pd.read_csv(split_dir / METRICS_FILE)
        raise UserError(f"{done}: split {plan['index']} was made with other settings ({'; '.join(changes[:3])}); set "
                        "global.resume=false to redo every split, global.resume=force to keep it, or use another "
                        "global.run_name")
    compute_difficulty(split_cfg)
    run_training(split_cfg, final_report=False)
    metrics = evaluate_split(split_cfg, cfg.multisplit.pca_dim)
    counts = {}
    for name in SPLITS:
        counts[f"{name}_identities"] = int(frame.loc[assignment == name, IDENTITY].nunique())
        counts[f"{name}_images"] = int((assignment == name).sum())
    rows = pd.DataFrame([{"split": plan["index"], "repeat": plan["repeat"], "fold": plan["fold"], "model": name,
                          **counts, **m} for name, m in metrics.items()])
    atomic_write_text(split_dir / METRICS_FILE, rows.to_csv(index=False))
    write_json(done, {"fingerprint": fingerprint})
    log.info("split %d: recall@1 frozen %.4f head %.4f pca_lda %.4f; mAP@R frozen %.4f head %.4f pca_lda %.4f",
             plan["index"], *(metrics[m]["recall@1"] for m in MODELS), *(metrics[m]["map@r"] for m in MODELS))
    return rows


def paired_summary(per_split: pd.DataFrame, confidence: float, tie_tolerance: float) -> dict:
    """For each model other than frozen and each compared metric: the paired differences' mean, sd, t interval,
    Nadeau-Bengio corrected interval and wins / ties / losses over splits."""
    wide = per_split.pivot(index="split", columns="model")
    sizes = per_split[per_split.model == "frozen"].set_index("split")
    test_share = float((sizes["test_images"] / (sizes["train_images"] + sizes["val_images"])).mean())
    n = len(wide)
    t_crit = float(stats.t.ppf(0.5 + confidence / 2, df=n - 1))
    out: dict = {"splits": n, "confidence": confidence, "interval": "Student t over splits (n - 1 df)",
                 "corrected_interval": "Nadeau-Bengio: variance x (1/n + n_test/n_train)", "comparisons": {}}
    for model in [m for m in MODELS if m != "frozen"]:
        for metric in COMPARED:
            diff = (wide[(metric, model)] - wide[(metric, "frozen")]).to_numpy(np.float64)
            mean, sd = float(diff.mean()), float(diff.std(ddof=1))
            half = t_crit * sd / np.sqrt(n)
            half_corrected = t_crit * sd * np.sqrt(1.0 / n + test_share)
            out["comparisons"][f"{model} - frozen {metric}"] = {
                "model": model, "metric": metric, "frozen_mean": float(wide[(metric, "frozen")].mean()),
                "model_mean": float(wide[(metric, model)].mean()), "mean_difference": mean, "sd": sd,
                "interval": [mean - half, mean + half], "corrected_interval": [mean - half_corrected,
                                                                               mean + half_corrected],
                "wins": int((diff > tie_tolerance).sum()), "ties": int((np.abs(diff) <= tie_tolerance).sum()),
                "losses": int((diff < -tie_tolerance).sum())}
    return out


def summary_markdown(summary: dict, per_split: pd.DataFrame) -> str:
    pct = round(100 * summary["confidence"])
    lines = [f"{summary['splits']} identity-disjoint splits; paired difference model - frozen, mean with a {pct} % t "
             "interval over splits and the Nadeau-Bengio corrected one; wins / ties / losses.", "",
             f"| model | metric | frozen | model | difference | {pct} % interval | corrected | W / T / L |",
             "|---|---|---|---|---|---|---|---|"]
    for c in summary["comparisons"].values():
        lo, hi = c["interval"]
        clo, chi = c["corrected_interval"]
        lines.append(f"| {c['model']} | {c['metric']} | {c['frozen_mean']:.4f} | {c['model_mean']:.4f} | "
                     f"{c['mean_difference']:+.4f} | [{lo:+.4f}, {hi:+.4f}] | [{clo:+.4f}, {chi:+.4f}] | "
                     f"{c['wins']} / {c['ties']} / {c['losses']} |")
    lines += ["", "| split | model | queries | recall@1 | mAP@R |", "|---|---|---|---|---|"]
    for row in per_split.to_dict("records"):
        lines.append(f"| {row['split']} | {row['model']} | {row['queries']} | {row['recall@1']:.4f} | "
                     f"{row['map@r']:.4f} |")
    return "\n".join(lines) + "\n"


def multisplit(cfg: MultiSplitStageConfig) -> dict:
    """Run (or resume) every split; returns the summary (also written to summary.json)."""
    setup_logging(level=getattr(logging, cfg.logging.level.upper(), logging.INFO))
    out_dir = Path(cfg.paths.runs_dir) / cfg.global_.run_name
    frame, embeddings, meta = pooled_merged(Path(cfg.paths.merged_dir))
    if meta["embedding_dim"] != cfg.training_model.input_dim:
        raise UserError(f"{cfg.paths.merged_dir}: embeddings are {meta['embedding_dim']} wide but "
                        f"training_model.input_dim is {cfg.training_model.input_dim}; set "
                        f"training_model.input_dim={meta['embedding_dim']}")
    plans = split_plan(frame, cfg.multisplit, cfg.data.val_fraction)
    log.info("multisplit: %d images of %d identities, %d splits -> %s", len(frame), frame[IDENTITY].nunique(),
             len(plans), out_dir)
    per_split = pd.concat([run_split(cfg, plan, frame, embeddings, meta, out_dir / "splits" / f"split_{p:02d}")
                           for p, plan in enumerate(plans)], ignore_index=True)
    summary = paired_summary(per_split, cfg.multisplit.confidence, cfg.multisplit.tie_tolerance)
    atomic_write_text(out_dir / "per_split.csv", per_split.to_csv(index=False))
    write_json(out_dir / "summary.json", summary)
    atomic_write_text(out_dir / "summary.md", summary_markdown(summary, per_split))
    for name, c in summary["comparisons"].items():
        log.info("%s: %+.4f [%+.4f, %+.4f] (corrected [%+.4f, %+.4f]), W/T/L %d/%d/%d", name, c["mean_difference"],
                 *c["interval"], *c["corrected_interval"], c["wins"], c["ties"], c["losses"])
    return summary


def _stage(cfg: MultiSplitStageConfig) -> int:
    multisplit(cfg)
    return 0


main = config_main(MultiSplitStageConfig, _stage, __doc__, prog="python -m building_embed.train.multisplit")

if __name__ == "__main__":
    raise SystemExit(main())
