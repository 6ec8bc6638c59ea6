"""scripts/building_embed/slurm: every sbatch is valid bash and runs a real stage; submit_pipeline.sh chains them."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SLURM = ROOT / "scripts" / "building_embed" / "slurm"
SUBMIT = SLURM / "submit_pipeline.sh"
STAGES = {  # sbatch file -> the module it runs
    "process_tar": "building_embed.preprocess.process_tar",
    "generate_embeddings": "building_embed.generate.generate_embeddings",
    "merge_and_split": "building_embed.preprocess.merge_and_split",
    "compute_visual_neighbors": "building_embed.difficulty.compute_visual_neighbors",
    "train": "building_embed.train.train",
    "optuna_worker": "building_embed.train.optuna_worker",
    "fetch_best_and_train": "building_embed.train.fetch_best_and_train",
    "convert_to_hf": "building_embed.publish.convert_to_hf",
}
RESUMING = {"process_tar", "generate_embeddings", "train", "optuna_worker", "fetch_best_and_train"}

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")

FAKE_SBATCH = """#!/usr/bin/env bash
# logs one line per call: the job id it hands out, then every argument (tab-separated); prints the id like
# `sbatch --parsable` on a named cluster ("id;cluster") so the caller must strip the cluster.
n=$(( $(wc -l < "$SBATCH_LOG" 2>/dev/null || echo 0) + 1000 ))
{ printf '%s' "$n"; for a in "$@"; do printf '\\t%s' "$a"; done; printf '\\tCONFIG=%s\\n' "$CONFIG"; } >> "$SBATCH_LOG"
echo "$n;fakecluster"
"""


def test_every_stage_has_an_sbatch_file():
    assert sorted(p.stem for p in SLURM.glob("*.sbatch")) == sorted(STAGES)


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_sbatch_is_valid_bash_and_runs_a_real_stage(stage):
    path = SLURM / f"{stage}.sbatch"
    subprocess.run(["bash", "-n", str(path)], check=True)
    text = path.read_text()
    modules = re.findall(r"-m (building_embed(?:\.\w+)+) [^\n]*--config \"\$CONFIG\" [^\n]*\"\$@\"", text)
    assert modules == [STAGES[stage]], modules
    assert importlib.util.find_spec(modules[0]) is not None, modules[0]
    assert "set -euo pipefail" in text
    assert 'CONFIG="${CONFIG:-configs/building_embed/sample.toml}"' in text
    assert (ROOT / "configs" / "building_embed" / "sample.toml").is_file()
    directives = [line for line in text.splitlines() if line.startswith("#SBATCH")]
    assert ("#SBATCH --requeue" in directives) == (stage in RESUMING), directives
    # #SBATCH lines count only before the first command
    first_command = next(i for i, line in enumerate(text.splitlines()) if line and not line.startswith("#"))
    assert all(not line.startswith("#SBATCH") for line in text.splitlines()[first_command:])
    if stage == "generate_embeddings":
        assert "--gpus-per-node" in text and '--nproc_per_node="$NPROC"' in text
        # the process count: one per GPU of the node, NPROC overriding it, never 0 (a CPU node gets 1)
        lines = "\n".join(line for line in text.splitlines() if line.startswith(("NPROC=", "[[ \"$NPROC\"")))
        for env, expected in (({"SLURM_GPUS_ON_NODE": "4"}, "4"), ({}, "1"), ({"SLURM_GPUS_ON_NODE": "0"}, "1"),
                              ({"SLURM_GPUS_ON_NODE": "0", "NPROC": "2"}, "2")):
            clean = {k: v for k, v in os.environ.items() if k not in ("NPROC", "SLURM_GPUS_ON_NODE")}
            done = subprocess.run(["bash", "-c", f'{lines}\necho "$NPROC"'], env={**clean, **env},
                                  capture_output=True, text=True, check=True)
            assert done.stdout.strip() == expected, (env, lines)
    if stage == "optuna_worker":
        assert any(d.startswith("#SBATCH --array=0-") for d in directives)


def test_submit_pipeline_is_valid_bash():
    subprocess.run(["bash", "-n", str(SUBMIT)], check=True)


def _submit(tmp_path: Path, *args: str) -> list[list[str]]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "sbatch"
    fake.write_text(FAKE_SBATCH)
    fake.chmod(0o755)
    log = tmp_path / "sbatch.log"
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "SBATCH_LOG": str(log),
           "CONFIG": "configs/building_embed/config.toml"}
    env.pop("SBATCH", None)
    result = subprocess.run(["bash", str(SUBMIT), *args], cwd=tmp_path, env=env, capture_output=True, text=True,
                            check=False)
    assert result.returncode == 0, result.stderr
    return [line.split("\t") for line in log.read_text().splitlines()]


def _sbatch_path(stage: str) -> str:
    return str(SLURM / f"{stage}.sbatch")


def test_submit_pipeline_chains_stages_in_order(tmp_path):
    calls = _submit(tmp_path, "global.run_name=prod", "data.neighbors_k=50")
    overrides = ["global.run_name=prod", "data.neighbors_k=50"]
    env_config = "CONFIG=configs/building_embed/config.toml"
    assert calls == [
        ["1000", "--parsable", _sbatch_path("process_tar"), *overrides, env_config],
        ["1001", "--parsable", "--dependency=afterok:1000", _sbatch_path("generate_embeddings"), *overrides, env_config],
        ["1002", "--parsable", "--dependency=afterok:1001", _sbatch_path("merge_and_split"), *overrides, env_config],
        ["1003", "--parsable", "--dependency=afterok:1002", _sbatch_path("compute_visual_neighbors"), *overrides,
         env_config],
        ["1004", "--parsable", "--dependency=afterok:1003", _sbatch_path("train"), *overrides, env_config],
        ["1005", "--parsable", "--dependency=afterok:1004", _sbatch_path("convert_to_hf"), *overrides, env_config],
    ]


def test_submit_pipeline_with_optuna_array(tmp_path):
    calls = _submit(tmp_path, "--optuna", "4")
    env_config = "CONFIG=configs/building_embed/config.toml"
    assert calls == [
        ["1000", "--parsable", _sbatch_path("process_tar"), env_config],
        ["1001", "--parsable", "--dependency=afterok:1000", _sbatch_path("generate_embeddings"), env_config],
        ["1002", "--parsable", "--dependency=afterok:1001", _sbatch_path("merge_and_split"), env_config],
        ["1003", "--parsable", "--dependency=afterok:1002", _sbatch_path("compute_visual_neighbors"), env_config],
        ["1004", "--parsable", "--dependency=afterok:1003", "--array=0-3", _sbatch_path("optuna_worker"), env_config],
        ["1005", "--parsable", "--dependency=afterok:1004", _sbatch_path("fetch_best_and_train"), env_config],
        ["1006", "--parsable", "--dependency=afterok:1005", _sbatch_path("convert_to_hf"), env_config],
    ]


def test_submit_pipeline_refuses_a_bad_worker_count(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text("#!/usr/bin/env bash\necho called >> \"$SBATCH_LOG\"\necho 1\n")
    (bin_dir / "sbatch").chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "SBATCH_LOG": str(tmp_path / "log")}
    result = subprocess.run(["bash", str(SUBMIT), "--optuna", "many"], cwd=tmp_path, env=env, capture_output=True,
                            text=True, check=False)
    assert result.returncode == 2
    assert "--optuna many" in result.stderr
    assert not (tmp_path / "log").exists()
