"""The wrapper scripts under scripts/: which Python they run (scripts/_python.sh), and that a multi-stage wrapper hands
the user's overrides to every stage and reads back only the paths the resolved config gives.

The dry-run tests run each wrapper with DRY_RUN=1, which prints every stage command (`DRY_RUN: cmd ...`, shell-quoted)
instead of running it; the config reads the wrappers make still run. One real run of
scripts/price_fusion/recommended.sh on a tiny catalogue checks the whole chain lands under a non-default runs_dir.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "scripts"
RESOLVER = SCRIPTS / "_python.sh"

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


# --- which Python: scripts/_python.sh ---------------------------------------------------------------------------

def _executable(path: Path, body: str = "exit 0") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(0o755)
    return path


@pytest.fixture
def tree(tmp_path):
    """A fake checkout (scripts/_python.sh, .venv/bin/python), a venv, a conda env and a PATH whose python3 has no
    torch (the stub exits 1 for the torch probe); `resolve(**env)` sources the file and returns (exit code, PY,
    stderr)."""
    repo = tmp_path / "repo"
    (repo / "scripts").mkdir(parents=True)
    shutil.copy(RESOLVER, repo / "scripts" / "_python.sh")
    dotvenv = _executable(repo / ".venv" / "bin" / "python")
    venv = _executable(tmp_path / "venv" / "bin" / "python")
    conda = _executable(tmp_path / "conda" / "bin" / "python")
    bin_dir = tmp_path / "bin"
    python3 = _executable(bin_dir / "python3", "exit 1")
    explicit = _executable(tmp_path / "my" / "python3.11")
    base_env = {"PATH": f"{bin_dir}{os.pathsep}/usr/bin{os.pathsep}/bin", "HOME": str(tmp_path)}

    def resolve(**env: str) -> tuple[int, str, str]:
        done = subprocess.run(["bash", "-c", 'set -euo pipefail; source "$1"; printf %s "$PY"', "wrapper.sh",
                               str(repo / "scripts" / "_python.sh")], env={**base_env, **env}, capture_output=True,
                              text=True, cwd=tmp_path)
        return done.returncode, done.stdout, done.stderr

    return {"resolve": resolve, "repo": repo, "dotvenv": dotvenv, "venv": venv, "conda": conda, "python3": python3,
            "explicit": explicit, "bin": bin_dir}


def test_python_override_wins_over_everything(tree):
    venv_dir, conda_dir = tree["venv"].parents[1], tree["conda"].parents[1]
    code, py, _ = tree["resolve"](PYTHON=str(tree["explicit"]), VIRTUAL_ENV=str(venv_dir), CONDA_PREFIX=str(conda_dir),
                                  CONDA_DEFAULT_ENV="torch")
    assert (code, py) == (0, str(tree["explicit"]))
    # a command name is looked up on PATH
    _executable(tree["bin"] / "python3.12")
    assert tree["resolve"](PYTHON="python3.12")[:2] == (0, str(tree["bin"] / "python3.12"))


def test_active_venv_wins_over_conda_and_dot_venv(tree):
    code, py, _ = tree["resolve"](VIRTUAL_ENV=str(tree["venv"].parents[1]), CONDA_PREFIX=str(tree["conda"].parents[1]),
                                  CONDA_DEFAULT_ENV="torch")
    assert (code, py) == (0, str(tree["venv"]))


def test_active_conda_env_wins_over_dot_venv_but_base_does_not(tree):
    conda_dir = str(tree["conda"].parents[1])
    assert tree["resolve"](CONDA_PREFIX=conda_dir, CONDA_DEFAULT_ENV="torch")[:2] == (0, str(tree["conda"]))
    # conda's base env, which `conda init` activates in every shell, is not a choice of environment
    assert tree["resolve"](CONDA_PREFIX=conda_dir, CONDA_DEFAULT_ENV="base")[:2] == (0, str(tree["dotvenv"]))


def test_without_override_or_active_env_the_checkouts_dot_venv(tree):
    assert tree["resolve"]()[:2] == (0, str(tree["dotvenv"]))
    assert tree["resolve"](PYTHON="")[:2] == (0, str(tree["dotvenv"]))  # empty counts as unset


def test_without_any_python_exit_2_with_one_line(tree):
    shutil.rmtree(tree["repo"] / ".venv")
    code, py, err = tree["resolve"]()
    assert code == 2 and py == ""
    assert len(err.strip().splitlines()) == 1, err
    assert "no Python to run the stages" in err and "PYTHON=" in err and str(tree["repo"] / ".venv") in err
    # a python3 on PATH that has torch (a cluster module) is the last resort
    _executable(tree["python3"], "exit 0")
    assert tree["resolve"]()[:2] == (0, str(tree["python3"]))


@pytest.mark.parametrize("env, names", [({"PYTHON": "/nonexistent/python"}, "PYTHON=/nonexistent/python"),
                                        ({"VIRTUAL_ENV": "/nonexistent/venv"}, "VIRTUAL_ENV=/nonexistent/venv"),
                                        ({"CONDA_PREFIX": "/nonexistent/env", "CONDA_DEFAULT_ENV": "x"},
                                         "CONDA_PREFIX=/nonexistent/env")])
def test_a_named_python_that_is_missing_is_an_error_not_a_fall_through(tree, env, names):
    code, py, err = tree["resolve"](**env)
    assert code == 2 and py == "", (py, err)
    assert len(err.strip().splitlines()) == 1 and names in err, err


def test_every_wrapper_finds_python_through_the_shared_file():
    """No script runs a hard-coded interpreter: each sources _python.sh (test.sh/demo.sh: _env.sh, which installs
    .venv; lock.sh builds a throwaway venv from a base python)."""
    own_python = {"_env.sh", "test.sh", "demo.sh", "lock.sh", "_python.sh"}
    no_python = {"submit_pipeline.sh", "cluster.sh"}
    delegates = {"pipeline.sbatch"}  # execs scripts/ehr_embedded/run_embedded_pipeline.sh
    for path in sorted([*SCRIPTS.rglob("*.sh"), *SCRIPTS.rglob("*.sbatch")]):
        text = path.read_text()
        if path.name in own_python | no_python | delegates:
            continue
        assert "_python.sh" in text, f"{path.relative_to(REPO)} does not source scripts/_python.sh"
        assert ".venv/bin/python" not in text and "PYTHON:-" not in text, path.relative_to(REPO)


# --- overrides reach every stage (DRY_RUN=1) --------------------------------------------------------------------

def dry_run(script: str, *args: str, env: dict[str, str] | None = None, cwd: Path = REPO) -> list[list[str]]:
    """The stage commands `script args` would run, each as its argument list (the interpreter first)."""
    full = {**os.environ, "PYTHON": sys.executable, "DRY_RUN": "1", "SLURM_SUBMIT_DIR": str(REPO), **(env or {})}
    done = subprocess.run(["bash", str(SCRIPTS / script), *args], env=full, cwd=cwd, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = [line for line in done.stdout.splitlines() if line.startswith("DRY_RUN: ")]
    assert lines, f"{script} printed no stage command:\n{done.stdout}"
    return [shlex.split(line.removeprefix("DRY_RUN: ")) for line in lines]


def stage_of(cmd: list[str]) -> str:
    return cmd[cmd.index("-m") + 1] if "-m" in cmd else " ".join(cmd[1:2])


def value(cmd: list[str], key: str) -> str:
    """The last `key=value` on the command line (the one a config loader keeps)."""
    found = [arg.split("=", 1)[1] for arg in cmd if arg.startswith(f"{key}=")]
    assert found, f"{key}= missing from {cmd}"
    return found[-1]


def paths_in(arg: str) -> list[str]:
    """The paths in one `key=value` / `key=[a,b]` argument."""
    text = arg.split("=", 1)[1] if "=" in arg else arg
    return [p for p in text.strip("[]").split(",") if "/" in p]


def test_recommended_passes_overrides_and_reads_under_the_runs_dir(tmp_path):
    runs = tmp_path / "elsewhere"
    cmds = dry_run("price_fusion/recommended.sh", "configs/price_fusion/demo.yaml", f"runs_dir={runs}",
                   "run_name=mine", "train.epochs=2", env={"KFOLD": "3"})
    assert [stage_of(c) for c in cmds] == ["price_fusion.train", "price_fusion.predict", "price_fusion.gbt",
                                           "price_fusion.baselines", "price_fusion.ensemble"]
    for cmd in cmds:
        assert value(cmd, "runs_dir") == str(runs) and value(cmd, "train.epochs") == "2", cmd
    assert value(cmds[0], "run_name") == value(cmds[1], "run_name") == "mine_kfold"
    ensemble = cmds[-1]
    read = [p for key in ("ensemble.inputs", "ensemble.oof_inputs", "ensemble.output")
            for p in paths_in(f"x={value(ensemble, key)}")]
    assert len(read) == 11 and all(p.startswith(f"{runs}/mine_") for p in read), read
    assert value(ensemble, "ensemble.output") == f"{runs}/mine_recommended/test_out.csv"


def test_run_chain_passes_overrides_and_reads_under_the_runs_dir(tmp_path):
    runs = tmp_path / "r"
    cmds = dry_run("price_fusion/run_chain.sh", "configs/price_fusion/demo.yaml", f"runs_dir={runs}", "run_name=c")
    assert [stage_of(c).split(".")[1] for c in cmds] == ["embed", "train", "evaluate", "predict", "gbt", "ensemble"]
    assert all(value(c, "runs_dir") == str(runs) for c in cmds)
    ensemble = cmds[-1]
    assert paths_in(f"x={value(ensemble, 'ensemble.inputs')}") == [f"{runs}/c/predictions/test_out.csv",
                                                                   f"{runs}/c_gbt/predictions/test_out.csv"]
    assert value(ensemble, "ensemble.output") == f"{runs}/c_ensemble/test_out.csv"


def test_structural_ablation_reads_its_runs_from_the_runs_dir_override(tmp_path):
    out, runs = tmp_path / "abl", tmp_path / "runs_here"
    cmds = dry_run("../studies/price_fusion/structural_ablation.sh", str(out), f"runs_dir={runs}", "train.epochs=2")
    stages = [c for c in cmds if "-m" in c and c[c.index("-m") + 1] != "price_fusion.sample_data"]
    assert len(stages) == 8
    for cmd in stages:
        assert value(cmd, "runs_dir") == str(runs) and value(cmd, "train.epochs") == "2", cmd
    # the two settings keep their own runs and data whatever the overrides say
    assert sorted({value(c, "run_name") for c in stages}) == ["legacy", "legacy_baselines", "quantities",
                                                              "quantities_baselines"]
    report = cmds[-1]
    assert report[1:] == ["-", str(out), str(runs)]
    # with no OUT_DIR, a first key=value argument is an override, not the output folder
    cmds = dry_run("../studies/price_fusion/structural_ablation.sh", f"runs_dir={runs}")
    assert cmds[0][-3:] == ["runs/price_fusion/ablation/data", "--quantities", "--tiny-clip"]


def test_kfold_array_keeps_a_run_per_seed_under_a_run_name_override():
    cmds = dry_run("price_fusion/slurm/kfold_array.sbatch", "configs/price_fusion/moe.yaml", "run_name=sweep",
                   "train.seed=99", env={"SLURM_ARRAY_TASK_ID": "2"})
    assert [stage_of(c) for c in cmds] == ["price_fusion.train", "price_fusion.predict"]
    assert {value(c, "run_name") for c in cmds} == {"sweep_seed2"}
    assert value(cmds[0], "train.seed") == "2"


SLURM_CHAINS = [  # (script, arguments, override keys every stage must carry, stage count)
    ("price_fusion/slurm/train.sbatch", ["configs/price_fusion/demo.yaml", "runs_dir=/x/r", "run_name=a"],
     ["runs_dir", "run_name"], 3),
    ("cnc_gcode/slurm/train.sbatch", ["configs/cnc_gcode/tiny.yaml", "run.out_dir=/x/r", "run.name=a"],
     ["run.out_dir", "run.name"], 3),
    ("cnc_gcode/slurm/ablations.sbatch", ["configs/cnc_gcode/tiny.yaml", "run.out_dir=/x/r", "run.name=a"],
     ["run.out_dir", "run.name"], 2),
    ("implant_dims/slurm/train.sbatch", ["configs/implant_dims/tiny.yaml", "run.out_dir=/x/r", "run.name=a"],
     ["run.out_dir", "run.name"], 4),
]


@pytest.mark.parametrize("script, args, keys, n_stages", SLURM_CHAINS, ids=[s for s, *_ in SLURM_CHAINS])
def test_sbatch_chains_pass_every_override_to_every_stage(script, args, keys, n_stages):
    cmds = dry_run(script, *args, env={"PREDICT_INPUT": "/x/images"})
    assert len(cmds) == n_stages, cmds
    for cmd in cmds:
        assert cmd[0] == sys.executable and cmd[cmd.index("--config") + 1] == args[0], cmd
        for key in keys:
            assert value(cmd, key) == next(a.split("=", 1)[1] for a in args if a.startswith(f"{key}=")), cmd


def test_convert_to_hf_reads_the_run_under_the_runs_dir_override(tmp_path):
    runs = tmp_path / "be_runs"
    cmds = dry_run("building_embed/slurm/convert_to_hf.sbatch", f"paths.runs_dir={runs}", "global.run_name=prod")
    assert len(cmds) == 1
    run_dir, publish_dir = cmds[0][3:5]
    assert (run_dir, publish_dir) == (f"{runs}/prod", f"{runs}/prod/hf")


FIXED = ["history_windows_auroc", "mimic_cv_search", "mimic_multitask", "mimic_results", "mimic_splits",
         "mimic_variants", "probe_results", "sample_codes_only", "sample_results"]


@pytest.mark.parametrize("name", FIXED)
def test_fixed_ehr_recipes_refuse_overrides_instead_of_dropping_them(name):
    env = {**os.environ, "PYTHON": sys.executable, "DRY_RUN": "1"}
    done = subprocess.run(["bash", str(REPO / "studies" / "ehr_embedded" / f"{name}.sh"), "training.output_dir=/x"],
                          env=env, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and done.stdout == "", done.stdout
    assert done.stderr.strip() == (f"{name}.sh: takes no arguments (got: training.output_dir=/x); its configs and "
                                   "paths are fixed: run its stages by hand to change them")


# --- one real run ---------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_recommended_sh_writes_everything_under_a_non_default_runs_dir(tmp_path):
    """The whole recommended chain (2-fold fusion, trees, baselines, fitted blend) on a tiny catalogue, with
    runs_dir outside runs/price_fusion: the blend finds every prediction file and writes under the override."""
    from price_fusion import embed, sample_data

    paths = sample_data.write_sample_data(tmp_path / "data", 120, 30, seed=0, tiny_clip=True)
    runs = tmp_path / "my_runs"
    args = [f"runs_dir={runs}", "run_name=tiny", f"data.train_csv={paths['train_csv']}",
            f"data.test_csv={paths['test_csv']}", f"data.image_dir={paths['image_dir']}",
            f"data.embeddings_dir={tmp_path / 'embeddings'}", f"embed.clip_model={paths['clip_model']}",
            "model.branch_dim=16", "model.head_dims=[16,8]", "train.epochs=3", "train.batch_size=32",
            "train.num_threads=1", "train.resume=false", "gbt.max_iter=10", "gbt.pca_dims=4", "gbt.num_threads=1",
            "baselines.cv_folds=2", "baselines.knn_ks=[3,5]", "baselines.ridge_alphas=[1.0,10.0]",
            "baselines.num_threads=1"]
    assert embed.main(["--config", str(REPO / "configs/price_fusion/demo.yaml"), *args]) == 0
    env = {**os.environ, "PYTHON": sys.executable, "KFOLD": "2", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    env.pop("DRY_RUN", None)
    done = subprocess.run(["bash", str(SCRIPTS / "price_fusion" / "recommended.sh"), "configs/price_fusion/demo.yaml",
                           *args], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    blend = pd.read_csv(runs / "tiny_recommended" / "test_out.csv", dtype={"sample_id": str})
    tested = pd.read_csv(paths["test_csv"], dtype={"sample_id": str})
    assert sorted(blend["sample_id"]) == sorted(tested["sample_id"]) and (blend["price"] > 0).all()
    assert (runs / "tiny_recommended" / "test_out.weights.json").is_file()
    for run in ("tiny_kfold", "tiny_gbt", "tiny_baselines"):
        assert (runs / run).is_dir(), sorted(p.name for p in runs.iterdir())
    assert not (REPO / "runs" / "price_fusion" / "tiny_recommended").exists()
