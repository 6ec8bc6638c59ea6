"""building_embed on a real Slurm cluster: the chained submission (afterok) with a 2-task Optuna array job on one
study, and a training job requeued part way (scontrol requeue) that ends with the weights of an uninterrupted run."""

from __future__ import annotations

import json
import subprocess
import time
from datetime import datetime
from pathlib import Path

import optuna
import pytest
from conftest import REPO, assert_completed

from building_embed.sample_data import make_dataset

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

SCRIPTS = REPO / "scripts" / "building_embed" / "slurm"
# sample.toml's packaged EfficientNet off: a tiny random ViT is enough to check the plumbing
TINY = ["embedding_model.packaged=", "embedding_model.random_init=true",
        "embedding_model.name=vit_small_patch14_dinov2", "embedding_model.img_size=28", "embedding_model.batch_size=16", "embedding_model.global_pool=avg",
        "embedding_model.model_kwargs={depth: 1, embed_dim: 24, num_heads: 2}", "infrastructure.num_workers=0",
        "infrastructure.num_threads=1", "training_model.input_dim=24", "training_model.hidden_dim=32",
        "training_model.output_dim=16", "data.rows_per_shard=40", "data.neighbors_k=10"]
STAGES = ["process_tar", "generate_embeddings", "merge_and_split", "compute_visual_neighbors", "optuna_worker",
          "fetch_best_and_train", "convert_to_hf"]


def paths(root: Path) -> list[str]:
    return [f"paths.tar_dir={root / 'tars'}", f"paths.intermediates_dir={root / 'inter'}",
            f"paths.embeddings_dir={root / 'emb'}", f"paths.merged_dir={root / 'merged'}",
            f"paths.difficulty_dir={root / 'difficulty'}", f"paths.runs_dir={root / 'runs'}"]


def when(record: dict[str, str]) -> tuple[datetime, datetime]:
    return datetime.fromisoformat(record["StartTime"]), datetime.fromisoformat(record["EndTime"])


@pytest.fixture(scope="module")
def chain(slurm, submit_dir):
    """submit_pipeline.sh --optuna 2 on the sample tars; returns (data root, overrides, {stage: records})."""
    root = submit_dir / "data" / "be"
    make_dataset(root, n_regions=3, targets_per_region=10, views_per_target=5, image_size=48, seed=0)
    overrides = [*paths(root), *TINY, "global.run_name=slurm", f"training.optuna_storage=sqlite:///{root}/optuna.db",
                 "training.optuna_study=slurm", "training.optuna_trials=2", "training.optuna_epochs=2",
                 "training.epochs=4", "training.batches_per_epoch=4", "training.identities_per_batch=6"]
    done = subprocess.run(["bash", str(SCRIPTS / "submit_pipeline.sh"), "--optuna", "2", *overrides], cwd=submit_dir,
                          env=slurm.env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    ids = dict(line.split() for line in done.stderr.splitlines() if len(line.split()) == 2)
    assert list(ids) == STAGES, done.stderr
    slurm.submitted.extend(ids.values())
    records = slurm.wait(list(ids.values()), timeout=900, what="building_embed chain")
    assert_completed(records, submit_dir)
    return root, overrides, {stage: records[job] for stage, job in ids.items()}


def test_chained_stages_run_in_order_and_write_every_output(chain):
    root, _, records = chain
    assert len(records["optuna_worker"]) == 2  # the array: two tasks
    # afterok: no stage starts before every job of the stage before it has ended
    for before, after in zip(STAGES, STAGES[1:]):
        last_end = max(when(r)[1] for r in records[before])
        first_start = min(when(r)[0] for r in records[after])
        assert first_start >= last_end, (before, after)
    assert json.loads((root / "inter" / "process_report.json").read_text())["rows"] > 0
    assert (root / "emb" / "embeddings_manifest.json").is_file()
    audit = json.loads((root / "merged" / "split_report.json").read_text())["audit"]
    assert audit["cross_split_near_duplicate_pairs"] == audit["identities_in_several_splits"] == 0
    assert (root / "difficulty" / "difficulty_metadata.parquet").is_file()
    final = root / "runs" / "slurm"
    best_trial = json.loads((final / "reports" / "best_trial.json").read_text())
    assert (final / "reports" / "retrieval.json").is_file()
    hf = final / "hf"
    assert {"config.json", "model.safetensors"} <= {p.name for p in hf.iterdir()}
    assert best_trial["number"] in range(4)


def test_optuna_array_tasks_share_one_study_and_record_each_trial_once(chain):
    root, _, records = chain
    study = optuna.load_study(study_name="slurm", storage=f"sqlite:///{root}/optuna.db")
    trials = study.get_trials(deepcopy=False)
    # 2 workers x training.optuna_trials=2, numbered once each, none left running
    assert sorted(t.number for t in trials) == [0, 1, 2, 3]
    assert all(t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED) for t in trials)
    run_dirs = [t.user_attrs["run_dir"] for t in trials]
    assert len(set(run_dirs)) == 4 and all(Path(d).is_dir() for d in run_dirs)
    # both array tasks ran trials (each worker logs its own two)
    outs = [Path(r["StdOut"]) for r in records["optuna_worker"]]
    assert len({r["ArrayTaskId"] for r in records["optuna_worker"]}) == 2
    assert all(o.is_file() for o in outs)


def _metrics_lines(path: Path) -> int:
    """Epoch records written so far (a per-step record or a torn last line left out)."""
    lines = path.read_text().split("\n")[:-1] if path.is_file() else []
    return sum('"step"' not in line for line in lines)


def test_requeued_training_job_resumes_to_the_weights_of_an_uninterrupted_run(chain, slurm, submit_dir):
    root, overrides, _ = chain
    train = SCRIPTS / "train.sbatch"
    common = [*overrides, "training.epochs=10", "training.batches_per_epoch=30", "training.patience=10"]
    straight = slurm.submit(train, *common, "global.run_name=straight", cwd=submit_dir)
    job = slurm.submit(train, *common, "global.run_name=requeued", cwd=submit_dir)
    metrics = root / "runs" / "requeued" / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while _metrics_lines(metrics) < 2:  # part way: at least two epochs checkpointed, more to come
        assert time.monotonic() < deadline, slurm.jobs(job)
        assert slurm.jobs(job)[0]["JobState"] in ("PENDING", "RUNNING"), slurm.jobs(job)
        time.sleep(0.5)
    epochs_before = _metrics_lines(metrics)
    slurm.run("scontrol", "requeue", job)
    records = slurm.wait([straight, job], timeout=600, what="requeue test jobs")
    assert_completed(records, submit_dir)
    record = records[job][0]
    assert int(record["Restarts"]) == 1
    out = Path(record["StdOut"])
    assert "restart count: 1" in out.read_text()
    assert epochs_before < 10
    assert "resumed from" in (root / "runs" / "requeued" / "train.log").read_text()
    for name in ("latest", "best"):
        a = (root / "runs" / "straight" / "checkpoints" / name / "model.safetensors").read_bytes()
        b = (root / "runs" / "requeued" / "checkpoints" / name / "model.safetensors").read_bytes()
        assert a == b, name
    assert (root / "runs" / "straight" / "metrics.jsonl").read_text() == metrics.read_text()
