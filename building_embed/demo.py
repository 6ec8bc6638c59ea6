"""The building_embed chain on the generated sample data, on a CPU with the packaged EfficientNet-Lite0 (about 2 min).

    python -c "from pathlib import Path; from building_embed.demo import run_demo; print(run_demo(Path('demo_output/be')))"

sample_data -> process_tar -> generate_embeddings -> merge_and_split -> compute_visual_neighbors -> train (head vs
frozen embeddings on val / test, one split) -> convert_to_hf, then train.multisplit: frozen vs head vs PCA + LDA over
10 identity-disjoint splits (5 folds x 2 repeats) of the same images, the claim the table reports (one split's
head-vs-frozen can go either way by luck). Every path of `configs/building_embed/sample.toml` is overridden into
out_dir, so nothing outside it is written; the head takes the settings of configs/building_embed/faces_efficientnet.toml
at a smaller width (HEAD).
"""

from __future__ import annotations

import json
from pathlib import Path

from building_embed.difficulty import compute_visual_neighbors
from building_embed.generate import generate_embeddings
from building_embed.preprocess import merge_and_split, process_tar
from building_embed.publish import convert_to_hf
from building_embed.sample_data import make_dataset
from building_embed.train import multisplit, train

PACKAGE = "building_embed"
SAMPLE_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "building_embed" / "sample.toml"
RUN_NAME = "demo"
MULTISPLIT_RUN = "demo_multisplit"
# The head of faces_efficientnet.toml (a wide, slowly trained head keeps what the ImageNet features already separate)
# at half its width and two thirds of its epochs, to fit the demo's time.
HEAD = ["training_model.hidden_dim=1024", "training_model.output_dim=256", "training_model.dropout=0.0",
        "training.lr=1e-4", "training.margin=0.1", "training.epochs=20", "training.identities_per_batch=16",
        "training.batches_per_epoch=0"]
MULTISPLIT = ["multisplit.folds=5", "multisplit.repeats=2", "logging.level=WARNING"]


def _run(stage, argv: list[str]) -> None:
    code = stage.main(argv)
    if code != 0:
        raise RuntimeError(f"{stage.__name__} {' '.join(argv)} exited with {code}")


def _row(stage: str, metric: str, value: object, output: Path) -> dict:
    return {"package": PACKAGE, "stage": stage, "metric": metric, "value": value, "output": str(output)}


def run_demo(out_dir: Path, seed: int | None = None) -> list[dict]:
    """The chain on the sample data; `seed` (an int) is the training seed (global.seed of train only: the split and
    the random backbone keep the config's seed, so the frozen embeddings stay the same); None keeps sample.toml's."""
    out_dir = Path(out_dir)
    data = out_dir / "data"
    make_dataset(data, seed=0)
    config = ["--config", str(SAMPLE_CONFIG), f"global.run_name={RUN_NAME}",
              f"paths.tar_dir={data / 'tars'}", f"paths.intermediates_dir={data / 'intermediates'}",
              f"paths.embeddings_dir={data / 'embeddings'}", f"paths.merged_dir={data / 'merged'}",
              f"paths.difficulty_dir={data / 'difficulty'}", f"paths.runs_dir={out_dir / 'runs'}",
              f"training.optuna_storage=sqlite:///{out_dir / 'optuna.db'}", *HEAD]
    rows = []

    _run(process_tar, config)
    report_path = data / "intermediates" / "process_report.json"
    report = json.loads(report_path.read_text())
    rows.append(_row("process_tar", "members_skipped", _skipped_total(report), report_path))

    _run(generate_embeddings, config)

    _run(merge_and_split, config)
    split_path = data / "merged" / "split_report.json"
    split = json.loads(split_path.read_text())
    rows.append(_row("merge_and_split", "duplicates_dropped", _dropped_total(split), data / "merged" /
                     "dedup_dropped.csv"))
    rows.append(_row("merge_and_split", "leak_audit_count", _leak_total(split), split_path))

    _run(compute_visual_neighbors, config)

    seeded = [] if seed is None else [f"global.seed={seed}"]
    _run(train, [*config, *seeded])
    run_dir = out_dir / "runs" / RUN_NAME
    retrieval_path = run_dir / "reports" / "retrieval.json"
    retrieval = json.loads(retrieval_path.read_text())
    for model in ("head", "frozen"):
        metrics = _metrics(retrieval, "test", model)
        rows.append(_row("train", f"test_recall@1_{model}", float(metrics["recall@1"]), retrieval_path))
        rows.append(_row("train", f"test_map@r_{model}", float(metrics["map@r"]), retrieval_path))

    published = out_dir / "published"
    _run(convert_to_hf, [str(run_dir), str(published), "--force", *config])
    rows.append(_row("convert_to_hf", "published_files", len([p for p in published.iterdir() if p.is_file()]),
                     published))

    _run(multisplit, [*config, *MULTISPLIT, *seeded, f"global.run_name={MULTISPLIT_RUN}"])
    summary_path = out_dir / "runs" / MULTISPLIT_RUN / "summary.json"
    rows += multisplit_rows(json.loads(summary_path.read_text()), summary_path)
    return rows


def multisplit_rows(summary: dict, path: Path) -> list[dict]:
    """Per model and metric: the mean over splits, the paired difference to frozen with its interval, and the lower
    end of that interval and the wins on their own (numbers the demo test reads)."""
    rows = []
    pct = round(100 * summary["confidence"])
    for c in summary["comparisons"].values():
        name = f"test_{c['metric']}_{c['model']}_minus_frozen"
        lo, hi = c["interval"]
        if c["model"] == "head":
            rows.append(_row("multisplit", f"test_{c['metric']}_frozen_mean", round(c["frozen_mean"], 4), path))
        rows.append(_row("multisplit", f"test_{c['metric']}_{c['model']}_mean", round(c["model_mean"], 4), path))
        rows.append(_row("multisplit", f"{name} [{pct}% t, {summary['splits']} splits]",
                         f"{c['mean_difference']:+.4f} [{lo:+.4f}, {hi:+.4f}]", path))
        rows.append(_row("multisplit", f"{name}_low{pct}", round(lo, 4), path))
        rows.append(_row("multisplit", f"{name}_wins_ties_losses", f"{c['wins']}/{c['ties']}/{c['losses']}", path))
    return rows


def _skipped_total(report: dict) -> int:
    return int(report["skipped_total"])


def _dropped_total(split: dict) -> int:
    return int(split["dedup"]["exact_duplicates_dropped"]) + int(split["dedup"]["near_duplicates_dropped"])


def _leak_total(split: dict) -> int:
    """Near-duplicate pairs across splits + identities in several splits + place groups in several splits (0)."""
    audit = split["audit"]
    return int(audit["cross_split_near_duplicate_pairs"]) + int(audit["identities_in_several_splits"]) + int(
        audit["place_groups_in_several_splits"])


def _metrics(retrieval: dict, split: str, model: str) -> dict:
    return retrieval[split][model]


if __name__ == "__main__":
    for row in run_demo(Path("demo_output") / PACKAGE):
        print(row)
