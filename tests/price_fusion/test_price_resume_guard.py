"""The resume guard: resume=auto never continues a run whose config or data changed; non-finite inputs stop early."""

from __future__ import annotations

import hashlib
import json
import pickle
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from common.logs import read_metrics
from price_fusion import embed, ensemble, train
from price_fusion.embedding_store import load_embeddings, write_embeddings
from price_fusion.prediction_files import write_predictions

RUN = ["run_name=g", "train.resume=auto", "train.patience=50"]


def tree_digest(root: Path) -> dict[str, str]:
    """SHA-256 of every file under `root` (train.log, config.yaml and checkpoints included), by relative path."""
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "checkpoints" / "latest" / "model.safetensors")


def epochs_in(run_dir: Path) -> list[int]:
    return [r["epoch"] for r in read_metrics(run_dir / "metrics.jsonl")]


@pytest.fixture
def finished(sample_env, tmp_path):
    """A run finished by its epoch limit (2 epochs), and a function giving the args of a rerun of it."""
    args = lambda *extra: sample_env["args"](tmp_path, *RUN, "train.epochs=2", *extra)  # noqa: E731
    assert train.main(args()) == 0
    return tmp_path / "g", args


def test_changed_config_is_refused_naming_each_key_and_nothing_is_written(finished, capsys):
    run_dir, args = finished
    before = tree_digest(run_dir)
    assert {"config.yaml", "split.json", "train.log", "metrics.jsonl", "checkpoints/latest/meta.json"} <= set(before)
    capsys.readouterr()
    # the case: today this resumed, "finished", rewrote config.yaml and split.json and scored old weights
    assert train.main(args("train.loss=mae", "train.lr=0.1", "data.split_seed=7")) == 2
    err = capsys.readouterr().err
    for change in ("train.loss: 'weighted_smape' -> 'mae'", "train.lr: 0.003 -> 0.1", "data.split_seed: 42 -> 7"):
        assert change in err, err
    assert "run name" in err and "resume=false" in err and "resume=force" in err
    assert len(err.strip().splitlines()) == 1  # one line, no traceback
    # switching a finished single-split run to K-fold is a different run too
    assert train.main(args("train.kfold=3")) == 2
    assert "train.kfold: 0 -> 3" in capsys.readouterr().err
    assert tree_digest(run_dir) == before  # byte-identical: no log line, no config.yaml, no split.json


def test_changed_data_file_is_refused_naming_it_but_a_moved_copy_resumes(finished, sample_env, tmp_path, capsys):
    run_dir, args = finished
    before = tree_digest(run_dir)
    frame = pd.read_csv(sample_env["train_csv"], dtype={"sample_id": str})
    frame.loc[7, "price"] = frame.loc[7, "price"] * 3
    changed_csv = tmp_path / "changed" / "train.csv"
    changed_csv.parent.mkdir()
    frame.to_csv(changed_csv, index=False)
    capsys.readouterr()
    assert train.main(args(f"data.train_csv={changed_csv}")) == 2
    err = capsys.readouterr().err
    assert f"data 'train_csv' changed: {changed_csv}" in err and "train.lr" not in err

    emb = load_embeddings(sample_env["embeddings"] / "train")
    text = np.array(emb.text)
    text[3, 0] += 0.5
    write_embeddings(tmp_path / "emb2" / "train", emb.sample_ids, emb.image, emb.has_image, text, emb.struct,
                     dict(emb.manifest))  # manifest.json byte-identical: only text.npy differs
    assert train.main(args(f"data.embeddings_dir={tmp_path / 'emb2'}")) == 2
    err = capsys.readouterr().err
    assert f"data 'train_embeddings' changed: {tmp_path / 'emb2' / 'train'}" in err
    assert "train_embedding_ids" not in err  # same ids in the same order: only the vectors changed
    assert tree_digest(run_dir) == before

    # the data file's identity is its content, not its path: a byte-identical copy elsewhere is the same run
    same_csv = tmp_path / "moved" / "train.csv"
    same_csv.parent.mkdir()
    same_csv.write_bytes(Path(sample_env["train_csv"]).read_bytes())
    assert train.main(args(f"data.train_csv={same_csv}")) == 0


def test_raising_epochs_continues_a_finished_run_to_the_weights_of_a_longer_one(finished, sample_env, tmp_path):
    run_dir, args = finished
    after_two = weights(run_dir)
    config, split = (run_dir / "config.yaml").read_bytes(), (run_dir / "split.json").read_bytes()
    assert json.loads((run_dir / "done.json").read_text())["epochs"] == 2
    assert train.main(args("train.epochs=4")) == 0
    assert epochs_in(run_dir) == [1, 2, 3, 4]
    assert json.loads((run_dir / "done.json").read_text())["epochs"] == 4
    continued = weights(run_dir)
    assert any(not torch.equal(after_two[k], continued[k]) for k in continued)  # it trained
    # and exactly as a run started with 4 epochs (same shuffles, scheduler, RNG streams): resume, so bit-exact
    assert train.main(sample_env["args"](tmp_path / "straight", *RUN, "train.epochs=4")) == 0
    straight = weights(tmp_path / "straight" / "g")
    assert all(torch.equal(straight[k], continued[k]) for k in straight)
    # a resumed run keeps the config and split it was started with
    assert (run_dir / "config.yaml").read_bytes() == config and (run_dir / "split.json").read_bytes() == split


def test_resume_force_continues_and_logs_what_changed(finished):
    run_dir, args = finished
    config = (run_dir / "config.yaml").read_bytes()
    assert train.main(args("train.resume=force", "train.lr=0.01", "train.epochs=3")) == 0
    log_text = (run_dir / "train.log").read_text()
    assert "resume=force" in log_text and "train.lr: 0.003 -> 0.01" in log_text
    assert epochs_in(run_dir) == [1, 2, 3]
    meta = json.loads((run_dir / "checkpoints" / "latest" / "meta.json").read_text())
    assert meta["epoch"] == 3 and meta["fingerprint"]["config"]["train.lr"] == 0.01  # the new inputs are recorded
    assert (run_dir / "config.yaml").read_bytes() == config


def test_resume_false_starts_over_with_the_new_config(finished):
    run_dir, args = finished
    assert train.main(args("train.resume=false", "data.split_seed=7")) == 0
    assert "split_seed: 7" in (run_dir / "config.yaml").read_text()
    assert epochs_in(run_dir) == [1, 2]


def test_non_finite_embedding_row_is_named_before_training(sample_env, tmp_path, capsys):
    emb = load_embeddings(sample_env["embeddings"] / "train")
    text = np.array(emb.text)
    text[5, 2] = np.nan
    write_embeddings(tmp_path / "emb" / "train", emb.sample_ids, emb.image, emb.has_image, text, emb.struct, {})
    assert train.main(sample_env["args"](tmp_path / "runs", "run_name=n", "train.epochs=1",
                                         f"data.embeddings_dir={tmp_path / 'emb'}")) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'emb' / 'train' / 'text.npy'}: row 5 (id '{emb.sample_ids[5]}') holds NaN or inf" in err
    assert not (tmp_path / "runs" / "n").exists()  # refused before the run directory was made


def test_non_finite_imported_vectors_and_oof_predictions_are_named(sample_env, tmp_path, capsys):
    ids = pd.read_csv(sample_env["train_csv"], dtype={"sample_id": str}).sample_id.tolist()
    vectors = {sid: np.ones(387, dtype=np.float32) for sid in ids}
    vectors[ids[4]][10] = np.inf
    with open(tmp_path / "qwen_train.pkl", "wb") as fh:
        pickle.dump(vectors, fh)
    assert embed.main(sample_env["args"](tmp_path / "runs", f"data.embeddings_dir={tmp_path / 'emb'}",
                                         "embed.splits=[train]", "embed.clip_model=",
                                         f"embed.import_qwen_pickle={tmp_path / 'qwen_{split}.pkl'}")) == 2
    assert f"qwen_train.pkl: row 4 (id '{ids[4]}') holds NaN or inf" in capsys.readouterr().err

    good = tmp_path / "good.csv"
    write_predictions(good, np.array(ids[:3]), np.array([1.0, 2.0, 3.0]))
    (tmp_path / "bad.csv").write_text(f"sample_id,price\n{ids[0]},1.0\n{ids[1]},inf\n{ids[2]},3.0\n")
    argv = sample_env["args"](tmp_path / "runs", f"ensemble.inputs=[{good},{good}]", "ensemble.method=fitted",
                              f"ensemble.oof_inputs=[{good},{tmp_path / 'bad.csv'}]",
                              f"ensemble.output={tmp_path / 'out.csv'}")
    assert ensemble.main(argv) == 2
    assert f"bad.csv: row 1 (id '{ids[1]}') holds NaN or inf" in capsys.readouterr().err
    assert not (tmp_path / "out.csv").exists()
