"""implant_dims.hpo and analyze_tuning_results: parallel workers on one SQLite study, continuation, pruning, failed
and dead-worker trials (a SIGKILLed worker process among them), the cap on finished trials, the up-front check of the
search space, the dual study on trained classifiers, the analysis reports, and the missing-study error."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import textwrap
import threading
import time
import warnings
from pathlib import Path

import optuna
import pytest
import torch
import yaml

from common.config import load_config
from common.errors import UserError
from common.logs import read_metrics
from implant_dims import analyze_tuning_results, hpo, train_classifier
from implant_dims.config import ImplantConfig
from implant_dims.sample_data import make_dataset

ROOT = Path(__file__).resolve().parents[2]
TINY = str(ROOT / "configs" / "implant_dims" / "tiny.yaml")
COMPLETE, PRUNED, FAIL = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED,
                          optuna.trial.TrialState.FAIL)

torch.set_num_threads(1)
optuna.logging.set_verbosity(optuna.logging.WARNING)


@pytest.fixture(scope="module")
def data_args(tmp_path_factory) -> list[str]:
    root = tmp_path_factory.mktemp("implant_hpo_data")
    make_dataset(root, n_train=64, n_val=32, n_test=16, n_unseen=16, size=64, n_calibration=0)
    return [f"data.train_json={root / 'augmented_train.json'}", f"data.val_json={root / 'augmented_val.json'}",
            f"data.test_json={root / 'test.json'}", f"data.unseen_json={root / 'unseen_test.json'}"]


def load_study(run_dir: Path, name: str) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=f"sqlite:///{run_dir / 'hpo' / 'optuna.db'}")


def finished_trials(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    return [t for t in study.get_trials() if t.state in (COMPLETE, PRUNED)]


@pytest.fixture(scope="module")
def classifier_study(data_args, tmp_path_factory) -> dict:
    """3 trials by 2 worker processes on one SQLite study, then a continuation to 4 trials in-process."""
    out = tmp_path_factory.mktemp("implant_hpo_cls")
    args = ["--config", TINY, *data_args, f"run.out_dir={out}", "hpo.kind=classifier", "hpo.trial_epochs=1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    started = time.time()
    proc = subprocess.run([sys.executable, "-m", "implant_dims.hpo", *args, "hpo.n_trials=3", "hpo.n_workers=2"],
                          cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)  # ~95 s on a loaded 2-core machine; room for a slower one
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = out / "tiny"
    first = load_study(run_dir, "implant_classifier_company").get_trials()
    best_first = json.loads((run_dir / "hpo" / "implant_classifier_company" / "best.json").read_text())
    first_seconds = time.time() - started
    assert hpo.main([*args, "hpo.n_trials=4", "hpo.n_workers=1"]) == 0
    return {"args": args, "run_dir": run_dir, "first": first, "best_first": best_first,
            "first_seconds": first_seconds}


def test_two_workers_finish_exactly_n_trials_and_a_rerun_continues_the_study(classifier_study):
    run_dir = classifier_study["run_dir"]
    sdir = run_dir / "hpo" / "implant_classifier_company"
    first = classifier_study["first"]
    assert len(first) == 3 and all(t.state in (COMPLETE, PRUNED) for t in first)  # no overshoot by the 2nd worker
    assert sorted(t.number for t in first) == [0, 1, 2]
    assert len({t.params["classifier.lr"] for t in first}) == 3  # distinct draws (the workers' seeds differ)
    assert {t.user_attrs["worker"] for t in first} <= {0, 1}
    assert all((sdir / "workers" / f"worker_{i}.log").is_file() for i in (0, 1))

    study = load_study(run_dir, "implant_classifier_company")
    trials = study.get_trials()
    assert len(trials) == 4 and len(finished_trials(study)) == 4  # the rerun added exactly one trial
    new = trials[3]
    assert {(t.params["classifier.lr"], t.params["classifier.batch_size"]) for t in first}.isdisjoint(
        {(new.params["classifier.lr"], new.params["classifier.batch_size"])})  # no repeat of an earlier draw

    for t in trials:
        out_dir = Path(t.user_attrs["out_dir"])
        assert out_dir == sdir / f"trial_{t.number}"
        stage = out_dir / "classifier_company"
        assert (stage / "checkpoints" / "best" / "model.safetensors").is_file()
        config = yaml.safe_load((stage / "config.yaml").read_text())["classifier"]
        # exact: the sampled value copied into config.yaml (YAML writes a float's repr)
        assert config["lr"] == t.params["classifier.lr"] and config["batch_size"] == t.params["classifier.batch_size"]
        assert config["epochs"] == 1 and config["vit"]["model_size"] == "tiny"
        epochs = [r["epoch"] for r in read_metrics(stage / "metrics.jsonl")]
        assert epochs == sorted(t.intermediate_values) == [1]
        assert not (stage / "reports" / "results_test.json").exists()  # the search never evaluates held-out data
        if t.state == COMPLETE:
            val = json.loads((stage / "reports" / "results_val.json").read_text())
            assert t.value == pytest.approx(val["accuracy"]) == t.user_attrs["val_report"]["accuracy"]

    # best.json / summary.json copy the study's values: exact
    best = classifier_study["best_first"]
    first_best = max((t for t in first if t.state == COMPLETE), key=lambda t: (t.value, -t.number))
    assert (best["number"], best["value"], best["params"]) == (first_best.number, first_best.value,
                                                               first_best.params)
    best_now = json.loads((sdir / "best.json").read_text())
    assert best_now["number"] == study.best_trial.number and best_now["value"] == study.best_value
    assert best_now["params"] == study.best_params and best_now["out_dir"] == str(sdir / f"trial_{best_now['number']}")
    assert f"classifier.lr={study.best_params['classifier.lr']}" in best_now["overrides"]

    assert hpo.main([*classifier_study["args"], "hpo.n_trials=4", "hpo.n_workers=1"]) == 0
    assert len(load_study(run_dir, "implant_classifier_company").get_trials()) == 4  # already complete: no trial


class AlwaysPrune(optuna.pruners.BasePruner):
    def prune(self, study, trial) -> bool:
        return True


def _cfg(tmp_path: Path, *overrides: str) -> ImplantConfig:
    return load_config(ImplantConfig, TINY, [f"run.out_dir={tmp_path}", "hpo.kind=classifier", *overrides])


def test_the_epoch_callback_reports_and_prunes_the_trial(tmp_path, monkeypatch):
    study = optuna.create_study(direction="maximize", pruner=AlwaysPrune())
    trial = study.ask()
    callback = hpo.pruning_callback(trial, "accuracy")
    with pytest.raises(optuna.TrialPruned):
        callback(1, {"accuracy": 0.4})
    study.tell(trial, state=PRUNED)
    assert study.trials[0].state == PRUNED and study.trials[0].intermediate_values == {1: 0.4}

    epochs_run = []

    def fake_stage(tcfg, epoch_callback):  # a 3-epoch training that calls back after each epoch
        for epoch in (1, 2, 3):
            epochs_run.append(epoch)
            epoch_callback(epoch, {"accuracy": 0.1 * epoch})
        return {"accuracy": 0.3}

    monkeypatch.setattr(hpo, "run_stage", fake_stage)
    study.optimize(hpo.make_objective(_cfg(tmp_path)), n_trials=1)
    pruned = study.trials[1]
    assert pruned.state == PRUNED and epochs_run == [1] and pruned.intermediate_values == {1: 0.1}

    kept = optuna.create_study(direction="maximize", pruner=optuna.pruners.NopPruner())
    epochs_run.clear()
    kept.optimize(hpo.make_objective(_cfg(tmp_path)), n_trials=1)
    # exact: the value fake_stage returned, stored
    assert kept.trials[0].state == COMPLETE and epochs_run == [1, 2, 3] and kept.trials[0].value == 0.3


def test_trial_config_applies_the_params_in_the_trials_own_folder(tmp_path):
    cfg = _cfg(tmp_path, "hpo.trial_epochs=3", "classifier.vit.weights=/w/vit_{model_size}.safetensors")
    tcfg = hpo.trial_config(cfg, {"classifier.vit.model_size": "base", "classifier.lr": 2e-4,
                                  "classifier.batch_size": 16}, 7)
    assert tcfg.run.run_dir == tmp_path / "tiny" / "hpo" / "implant_classifier_company" / "trial_7"
    assert (tcfg.classifier.vit.model_size, tcfg.classifier.lr, tcfg.classifier.batch_size) == ("base", 2e-4, 16)
    assert tcfg.classifier.vit.weights == "/w/vit_base.safetensors" and tcfg.classifier.epochs == 3
    assert tcfg.classifier.resume == "false" and tcfg.data.test_json == tcfg.data.unseen_json == ""
    assert tcfg.data.val_json == cfg.data.val_json and cfg.classifier.lr != 2e-4  # the base config is untouched

    dual = load_config(ImplantConfig, TINY, [f"run.out_dir={tmp_path}", "hpo.kind=dual"])
    params = {"regression.fusion_dim": 64, "regression.attention_type": "dual", "regression.unfreeze_schedule": "3/9",
              "regression.lr": 1e-3, "regression.embedder_lr_mult": 0.05}
    tdual = hpo.trial_config(dual, params, 0)
    rc = tdual.regression
    assert (rc.fusion_dim, rc.attention_type, rc.unfreeze_half_epoch, rc.unfreeze_all_epoch, rc.lr,
            rc.embedder_lr_mult, rc.epochs) == (64, "dual", 3, 9, 1e-3, 0.05, dual.regression.epochs)
    assert hpo.stage_dir(tdual) == tmp_path / "tiny" / "hpo" / "implant_dual" / "trial_0" / "dual"
    assert "regression.unfreeze_all_epoch=9" in hpo.override_args(params)


def test_a_failing_trial_is_recorded_and_a_dead_workers_trial_is_retried(tmp_path, monkeypatch):
    cfg = _cfg(tmp_path, "hpo.n_trials=3", "hpo.heartbeat_interval=1", "hpo.grace_period=2", "hpo.max_failures=3")
    study = hpo.open_study(cfg)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # optuna: heartbeats are meant for optimize(), not ask()
        dead = study.ask()  # a worker took this trial, sent one heartbeat and was killed
    hpo.suggest(dead, cfg)
    study._storage.record_heartbeat(dead._trial_id)
    time.sleep(3.5)  # SQLite keeps heartbeats to the whole second: grace + 1 s and a margin

    calls = []

    def fake_stage(tcfg, epoch_callback):
        calls.append(tcfg.run.name)
        if len(calls) == 1:
            raise RuntimeError("simulated crash in training")
        return {"accuracy": 0.5 + 0.01 * len(calls)}

    monkeypatch.setattr(hpo, "run_stage", fake_stage)
    assert hpo.run_worker(cfg, study) == 0
    trials = study.get_trials()
    assert [t.state for t in trials] == [FAIL, FAIL, COMPLETE, COMPLETE, COMPLETE]
    assert trials[1].params == trials[0].params  # the stale trial was re-queued with its parameters
    assert trials[1].system_attrs["failed_trial"] == 0
    assert "simulated crash" in trials[1].user_attrs["error"]  # the crash of the retry is recorded, search goes on
    assert calls == ["trial_1", "trial_2", "trial_3", "trial_4"]
    assert [t.value for t in trials[2:]] == pytest.approx([0.52, 0.53, 0.54])

    def always_fails(tcfg, epoch_callback):
        raise RuntimeError("broken")

    monkeypatch.setattr(hpo, "run_stage", always_fails)
    cfg_more = _cfg(tmp_path, "hpo.n_trials=10", "hpo.max_failures=2")
    assert hpo.run_worker(cfg_more, hpo.open_study(cfg_more)) == 1  # gives up after 2 failures in a row
    assert [t.state for t in study.get_trials()][5:] == [FAIL, FAIL]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}


# A worker whose trial reports one epoch, leaves a marker file and hangs, so that the test can SIGKILL it inside
# the trial (polling the marker, not the study: opening the storage while the worker creates it would race).
HANGING_WORKER = textwrap.dedent("""
    import sys, time
    from implant_dims import hpo

    def hang(tcfg, epoch_callback):
        epoch_callback(1, {"accuracy": 0.5})
        tcfg.run.run_dir.mkdir(parents=True, exist_ok=True)
        (tcfg.run.run_dir / "inside_the_trial").touch()
        time.sleep(600)

    hpo.run_stage = hang
    sys.exit(hpo.main(sys.argv[1:]))
""")


def test_a_sigkilled_worker_process_leaves_a_trial_that_the_next_worker_fails_and_reruns(data_args, tmp_path,
                                                                                          monkeypatch):
    args = ["--config", TINY, *data_args, f"run.out_dir={tmp_path}", "hpo.kind=classifier", "hpo.n_trials=2",
            "hpo.n_workers=1", "hpo.heartbeat_interval=1", "hpo.grace_period=2"]
    proc = subprocess.Popen([sys.executable, "-c", HANGING_WORKER, *args], cwd=ROOT, env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    marker = tmp_path / "tiny" / "hpo" / "implant_classifier_company" / "trial_0" / "inside_the_trial"
    deadline = time.time() + 120
    try:
        while not marker.is_file():
            assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
            assert time.time() < deadline, "the worker never reached its trial"
            time.sleep(0.2)
    finally:
        proc.kill()
        proc.wait()
    (killed,) = load_study(tmp_path / "tiny", "implant_classifier_company").get_trials()
    assert killed.state == optuna.trial.TrialState.RUNNING and killed.intermediate_values == {1: 0.5}
    # SQLite keeps heartbeats to the whole second, so wait grace + 1 s and a margin before the stale check
    time.sleep(3.5)

    def fake_stage(tcfg, epoch_callback):
        epoch_callback(1, {"accuracy": 0.6})
        return {"accuracy": 0.6}

    monkeypatch.setattr(hpo, "run_stage", fake_stage)
    assert hpo.main(args) == 0
    trials = load_study(tmp_path / "tiny", "implant_classifier_company").get_trials()
    assert [t.state for t in trials] == [FAIL, COMPLETE, COMPLETE]  # the cap counts finished trials only
    retry = trials[1]
    assert retry.system_attrs["failed_trial"] == killed.number == 0 and retry.params == killed.params
    assert retry.user_attrs["out_dir"].endswith("trial_1")  # the retry runs in a folder of its own


def test_a_worker_waits_while_the_last_slot_runs_elsewhere_and_never_overshoots(tmp_path, monkeypatch):
    cfg = _cfg(tmp_path, "hpo.n_trials=2", "hpo.heartbeat_interval=1", "hpo.grace_period=60")
    study = hpo.open_study(cfg)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # optuna: heartbeats are meant for optimize(), not ask()
        elsewhere = study.ask()  # a trial of a live worker elsewhere (no heartbeat record: never stale)
    hpo.suggest(elsewhere, cfg)
    monkeypatch.setattr(hpo, "run_stage", lambda tcfg, epoch_callback: {"accuracy": 0.7})
    result: list[int] = []
    worker = threading.Thread(target=lambda: result.append(hpo.run_worker(cfg, hpo.open_study(cfg))))
    worker.start()
    deadline = time.time() + 60
    while not any(t.state == COMPLETE for t in study.get_trials()):
        assert time.time() < deadline and worker.is_alive(), "the worker did not run its trial"
        time.sleep(0.2)
    time.sleep(3)  # longer than the worker's 2 s poll: it must still be waiting, not starting a third trial
    assert worker.is_alive() and len(study.get_trials()) == 2
    study.tell(elsewhere, 0.9)
    worker.join(timeout=30)
    assert not worker.is_alive() and result == [0]
    assert [t.state for t in study.get_trials()] == [COMPLETE, COMPLETE]


@pytest.mark.parametrize(("overrides", "key", "why"), [
    (["hpo.kind=classifier", "hpo.trial_epochs=1", "classifier.warmup_epochs=1"], "hpo.trial_epochs=1",
     "classifier.warmup_epochs"),
    (["hpo.kind=dual", "hpo.trial_epochs=1", "regression.warmup_epochs=1"], "hpo.trial_epochs=1",
     "regression.warmup_epochs"),
    (["hpo.kind=dual", "hpo.trial_epochs=2"], "hpo.unfreeze_schedules", "[1, 2]"),  # tiny's [[1, 2], [0, 2]]
    (["hpo.kind=dual", "hpo.attention_types=[cross]", "hpo.fusion_dims=[16,30]"], "hpo.fusion_dims", "30"),
    (["hpo.kind=classifier", "hpo.classifier_model_sizes=[tiny,small]", "data.img_size=24"],
     "hpo.classifier_model_sizes", "small"),
    # a grace period not above the heartbeat interval would fail live trials as dead
    (["hpo.kind=classifier", "hpo.heartbeat_interval=5", "hpo.grace_period=5"], "hpo.grace_period",
     "hpo.heartbeat_interval"),
])
def test_a_search_space_or_setting_no_trial_could_run_is_refused_before_the_study_starts(data_args, tmp_path, capsys,
                                                                              overrides, key, why):
    assert hpo.main(["--config", TINY, *data_args, f"run.out_dir={tmp_path}", *overrides]) == 2
    err = capsys.readouterr().err.strip()
    assert key in err and why in err and "Traceback" not in err and len(err.splitlines()) == 1
    assert not (tmp_path / "tiny" / "hpo").exists()  # no study, no trial folder


def test_joining_a_study_of_the_other_direction_is_refused(tmp_path):
    hpo.open_study(_cfg(tmp_path, "hpo.study_name=shared"))  # classifier: maximize
    dual = load_config(ImplantConfig, TINY, [f"run.out_dir={tmp_path}", "hpo.kind=dual", "hpo.study_name=shared"])
    with pytest.raises(UserError, match="hpo.storage=.*'shared' exists with direction maximize.*minimize"):
        hpo.open_study(dual)


def test_the_search_space_check_passes_every_shipped_config():
    for name in ("tiny", "sample", "base"):
        for kind in ("classifier", "dual"):
            cfg = load_config(ImplantConfig, str(ROOT / "configs" / "implant_dims" / f"{name}.yaml"), [f"hpo.kind={kind}"])
            hpo.check_search_space(cfg)  # raises UserError naming the key otherwise


def _check_ranking(sdir: Path, study: optuna.Study, maximize: bool) -> None:
    with open(sdir / "best_trials.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    complete = {t.number: t for t in study.get_trials() if t.state == COMPLETE}
    assert len(rows) == min(10, len(complete)) and rows
    values = [float(r["value"]) for r in rows]
    assert values == sorted(values, reverse=maximize)
    for row in rows:
        t = complete[int(row["number"])]
        assert float(row["value"]) == pytest.approx(t.value)
        assert all(str(value) == row[name] for name, value in t.params.items())
    assert int(rows[0]["number"]) == study.best_trial.number
    assert f"| {rows[0]['number']} |" in (sdir / "best_trials.md").read_text()


def _check_importances(sdir: Path, tuned: set[str]) -> None:
    imp = json.loads((sdir / "param_importances.json").read_text())
    if imp["importances"] is None:
        assert imp["reason"]
    else:
        assert set(imp["importances"]) <= tuned and sum(imp["importances"].values()) == pytest.approx(1.0)
    for name in ("param_importances.png", "optimization_history.png"):
        assert (sdir / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_analyze_tuning_results_ranks_trials_and_explains_the_objective(classifier_study):
    run_dir = classifier_study["run_dir"]
    assert analyze_tuning_results.main(classifier_study["args"]) == 0
    sdir = run_dir / "hpo" / "implant_classifier_company"
    study = load_study(run_dir, "implant_classifier_company")
    _check_ranking(sdir, study, maximize=True)
    _check_importances(sdir, {"classifier.lr", "classifier.batch_size"})  # model_size has one choice: not tuned
    summary = json.loads((sdir / "summary.json").read_text())
    assert summary["direction"] == "maximize" and summary["counts"]["COMPLETE"] + summary["counts"]["PRUNED"] == 4
    assert summary["best"]["number"] == study.best_trial.number and summary["best"]["value"] == study.best_value


def test_dual_study_on_trained_classifiers(data_args, tmp_path, capsys):
    base = ["--config", TINY, *data_args, f"run.out_dir={tmp_path}"]
    assert hpo.main([*base, "hpo.kind=dual"]) == 2  # no classifiers yet: refused before any trial
    assert "train_classifier" in capsys.readouterr().err
    assert not (tmp_path / "tiny" / "hpo").exists()

    for target in ("company", "model_type"):
        assert train_classifier.main([*base, f"classifier.target={target}", "classifier.epochs=1"]) == 0
    assert hpo.main([*base, "hpo.kind=dual", "hpo.n_trials=2", "hpo.trial_epochs=3", "regression.mc_samples=0"]) == 0
    run_dir = tmp_path / "tiny"
    study = load_study(run_dir, "implant_dual")
    trials = study.get_trials()
    assert len(trials) == 2 and all(t.state == COMPLETE for t in trials)
    for t in trials:
        stage = Path(t.user_attrs["out_dir"]) / "dual"
        assert Path(t.user_attrs["out_dir"]) == run_dir / "hpo" / "implant_dual" / f"trial_{t.number}"
        results = json.loads((stage / "reports" / "results.json").read_text())
        assert t.value == pytest.approx(results["splits"]["val"]["mean_mae"])
        assert set(results["splits"]) == {"val"}
        config = yaml.safe_load((stage / "config.yaml").read_text())["regression"]
        half, full = (int(v) for v in t.params["regression.unfreeze_schedule"].split("/"))
        assert (config["unfreeze_half_epoch"], config["unfreeze_all_epoch"]) == (half, full)
        assert config["fusion_dim"] == t.params["regression.fusion_dim"]
        assert config["attention_type"] == t.params["regression.attention_type"]
        assert config["embedder_lr_mult"] == t.params["regression.embedder_lr_mult"] and config["epochs"] == 3  # copied
        assert config["company_checkpoint"].startswith(str(run_dir / "classifier_company" / "checkpoints"))
        assert config["model_checkpoint"].startswith(str(run_dir / "classifier_model_type" / "checkpoints"))
    best = json.loads((run_dir / "hpo" / "implant_dual" / "best.json").read_text())
    assert best["value"] == min(t.value for t in trials) and best["direction"] == "minimize"  # copied value

    assert analyze_tuning_results.main([*base, "hpo.kind=dual"]) == 0
    sdir = run_dir / "hpo" / "implant_dual"
    _check_ranking(sdir, study, maximize=False)
    _check_importances(sdir, {"regression.fusion_dim", "regression.attention_type", "regression.unfreeze_schedule",
                              "regression.lr", "regression.embedder_lr_mult"})


def test_analyzing_a_missing_study_is_an_input_error_naming_the_storage(data_args, tmp_path, capsys):
    args = ["--config", TINY, *data_args, f"run.out_dir={tmp_path}", "hpo.kind=dual"]
    assert analyze_tuning_results.main(args) == 2
    err = capsys.readouterr().err
    assert f"sqlite:///{tmp_path / 'tiny' / 'hpo' / 'optuna.db'}" in err and "'implant_dual'" in err
    assert "python -m implant_dims.hpo" in err
    assert not (tmp_path / "tiny" / "hpo" / "optuna.db").exists()  # looking did not create a database

    storage = f"sqlite:///{tmp_path / 'other.db'}"
    optuna.create_study(study_name="someone_else", storage=storage)
    assert analyze_tuning_results.main([*args, f"hpo.storage={storage}"]) == 2
    assert storage in capsys.readouterr().err
