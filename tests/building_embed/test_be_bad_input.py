"""Bad input and scale (issue 22, section 4): splits without positive pairs, re-run process_tar after a tar was cut,
garbage or wrong-schema parquet and weights files, the blocked retrieval evaluation, progress lines in logs."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import read_json, read_parquets, stage_args
from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator
from torch.nn import functional as F

from building_embed.generate import generate_embeddings
from building_embed.generate.generate_embeddings import embeddings_table
from building_embed.preprocess import fix_intermediate_schema, merge_and_split, process_tar
from building_embed.preprocess.schema import IDENTITY, IMAGE_KEY
from building_embed.progress import ProgressLog
from building_embed.publish import convert_to_hf
from building_embed.train import train as train_stage
from building_embed.train.data import IdentityIndex, anchor_schedule
from building_embed.train.retrieval import DEFAULT_MEMORY_MB, query_block_size, retrieval_metrics

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parents[2]


# ---------------------------------------------------------------- item 4: blocked evaluation

def full_matrix_reference(embeddings: torch.Tensor, identity: np.ndarray, panorama: np.ndarray) -> dict[str, float]:
    """The evaluation as it was before blocks: the whole masked N x N matrix, stable argsort, and mAP@R /
    precision@1 from pytorch-metric-learning's AccuracyCalculator fed those neighbour lists."""
    unit = F.normalize(embeddings.float(), dim=-1)
    pano, ident = torch.as_tensor(panorama), torch.as_tensor(identity)
    sims = (unit @ unit.T).masked_fill(pano[:, None] == pano[None, :], float("-inf"))
    order = torch.argsort(-sims, dim=1, stable=True)
    sims = torch.gather(sims, 1, order)
    relevant = (ident[order] == ident[:, None]) & (pano[order] != pano[:, None]) & torch.isfinite(sims)
    has_positive = relevant.any(dim=1)
    out = {"queries": int(has_positive.sum())}
    for k in (1, 5, 10):
        out[f"recall@{k}"] = float(relevant[has_positive, :k].any(dim=1).float().mean())

    def knn(query, k, reference, ref_includes_query):  # noqa: ARG001 - AccuracyCalculator's signature
        return sims[:, :k], order[:, :k]

    def same_building_other_panorama(query, gallery):
        return (query[..., 0] == gallery[..., 0]) & (query[..., 1] != gallery[..., 1])

    labels = torch.stack([ident, pano], dim=1)
    calculator = AccuracyCalculator(include=("precision_at_1", "mean_average_precision_at_r"), k="max_bin_count",
                                    knn_func=knn, label_comparison_fn=same_building_other_panorama,
                                    device=torch.device("cpu"))
    scores = calculator.get_accuracy(unit, labels, unit, labels, ref_includes_query=False)
    return {**out, "precision@1": scores["precision_at_1"], "map@r": scores["mean_average_precision_at_r"]}


def retrieval_case(n_identities: int, seed: int, tied: bool) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
    """Identities of 1-12 images over 1-4 panoramas, near their identity's centre. `tied`: every vector is 16 signs
    of 0.25 (unit length, dot products exact multiples of 1/16), so similarities tie often and exactly."""
    rng = np.random.default_rng(seed)
    sizes = rng.integers(1, 13, n_identities)
    identity = np.repeat(np.arange(n_identities), sizes)
    panorama = identity * 10 + rng.integers(0, 4, len(identity))
    if tied:
        centres = rng.choice([-1.0, 1.0], (n_identities, 16))
        flips = rng.random((len(identity), 16)) < 0.1
        x = np.where(flips, -centres[identity], centres[identity]) * 0.25
    else:
        x = rng.normal(size=(n_identities, 32))[identity] + 1.2 * rng.normal(size=(len(identity), 32))
    return torch.tensor(x, dtype=torch.float32), identity, panorama


@pytest.mark.parametrize("tied", [False, True])
def test_blocked_evaluation_equals_the_full_matrix_and_pml(tied):
    embeddings, identity, panorama = retrieval_case(70, seed=3, tied=tied)
    reference = full_matrix_reference(embeddings, identity, panorama)
    assert 0.05 < reference["map@r"] < 0.95 and reference["queries"] < len(identity)  # informative, with lone queries
    # memory_mb 0.05: blocks of a few queries; 512: one block. Tolerance 1e-6: the reference's recall is a float32 mean
    # (tied=True: exact similarities, so any tie broken differently from gallery order would change the scores)
    for memory_mb in (0.05, 512):
        blocked = retrieval_metrics(embeddings, identity, panorama, memory_mb=memory_mb)
        for name, value in reference.items():
            assert blocked[name] == pytest.approx(value, abs=1e-6), (name, memory_mb)
    assert query_block_size(len(identity), 12, 0.05) < 40


def test_map_at_r_follows_its_definition_on_a_hand_case():
    # Query 0 (identity 0) has R = 2 relevant images (1 and 2); its ranking: 1 (hit), 3 (miss), 2 (hit) -> AP@R counts
    # only the first R = 2 ranks: (1/1) / 2 = 0.5 (a plain AP would also count the hit at rank 3).
    embeddings = torch.tensor([[1.0, 0.0], [0.99, 0.14], [0.6, 0.8], [0.9, 0.43]])
    scores = retrieval_metrics(embeddings[[0, 1, 2, 3]], np.array([0, 0, 0, 1]), np.arange(4), ks=(1,))
    reference = full_matrix_reference(embeddings, np.array([0, 0, 0, 1]), np.arange(4))
    assert scores["map@r"] == pytest.approx(reference["map@r"], abs=1e-12)
    # by hand: query 1 -> [0 hit, 3, 2 hit]: 0.5; query 2 -> [3, 1 hit, 0 hit]: (1/2) / 2 = 0.25; query 3 is lone.
    assert scores["queries"] == 3 and scores["map@r"] == pytest.approx((0.5 + 0.5 + 0.25) / 3, abs=1e-12)


MEMORY_SCRIPT = """
import json, sys
import numpy as np, torch
from torch.nn import functional as F
torch.set_num_threads(1)
from building_embed.train import retrieval as ev

def status(key):  # kB -> MiB; VmHWM is this process's peak (ru_maxrss would also count the parent it forked from)
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith(key + ":")) / 1024

n, dim, memory_mb, blocks = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])
x = torch.randn(n, dim, generator=torch.Generator().manual_seed(0))
identity, panorama = np.arange(n) // 4, np.arange(n) // 2
before = status("VmRSS")
if blocks == 0:
    out = ev.retrieval_metrics(x, identity, panorama, memory_mb=memory_mb)
else:  # the first blocks of the evaluation: each block's memory is the whole evaluation's peak
    size = ev.query_block_size(n, 10, memory_mb)
    it = ev.iter_query_blocks(F.normalize(x, dim=-1), torch.as_tensor(identity), torch.as_tensor(panorama),
                              torch.as_tensor(ev.relevant_counts(identity, panorama)), (1, 5, 10), size)
    out = {"rows": [next(it)[0].stop for _ in range(blocks)], "block": size}
print(json.dumps({"extra_mib": status("VmHWM") - before, **out}))
"""


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="measures resident memory through /proc (Linux)")
@pytest.mark.parametrize("n, memory_mb, blocks", [(8_000, 64, 0), (50_000, DEFAULT_MEMORY_MB, 2)])
def test_evaluation_memory_stays_under_its_setting(n, memory_mb, blocks):
    """Peak resident memory beyond the inputs, measured in a fresh process. The full N x N evaluation needed > 2 GiB
    at N = 8k (similarities, their argsort and gathers) and ~10 GiB per matrix at 50k; blocked it is the setting
    plus < 64 MiB of fixed cost (measured: 86 MiB at 8k / 64 MiB, 385 MiB at 50k / 512 MiB)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, str(n), "256", str(memory_mb), str(blocks)],
                          capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    print(result)
    assert result["extra_mib"] < memory_mb + 64
    assert result["extra_mib"] < 1024
    if blocks:
        assert result["rows"] == [result["block"] * (b + 1) for b in range(blocks)]
    else:
        assert result["queries"] == n


# ---------------------------------------------------------------- item 1: splits without positive pairs

def write_split(path: Path, identity: list[int], panorama: list[int], dim: int = 8, seed: int = 0) -> None:
    """A merged split as merge_and_split writes it (the columns training reads, float16 embeddings)."""
    keys = [f"t.tar:{path.stem}_{i}.jpg" for i in range(len(identity))]
    values = np.random.default_rng(seed).normal(size=(len(identity), dim)).astype(np.float32)
    ids = {IMAGE_KEY: keys, IDENTITY: [f"1_{i}" for i in identity], "street_view_id": list(panorama)}
    table = embeddings_table(ids, values, {"embedding_dim": dim, "dtype": "float16"})
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)


def write_difficulty(path: Path, n_train: int, train_keys: list[str]) -> None:
    """A difficulty file for the train rows: each row's neighbour is the next row, in band 0."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"split": ["train"] * n_train, "row": list(range(n_train)), IMAGE_KEY: train_keys,
                             "neighbor_rows": [[(i + 1) % n_train] for i in range(n_train)],
                             "neighbor_band": [[0] for _ in range(n_train)]}), path)


def train_argv(root: Path) -> list[str]:
    return [f"paths.merged_dir={root / 'merged'}", f"paths.difficulty_dir={root / 'difficulty'}",
            f"paths.runs_dir={root / 'runs'}", "global.run_name=r", "training_model.input_dim=8",
            "training_model.hidden_dim=16", "training_model.output_dim=8", "training.epochs=1",
            "training.batches_per_epoch=2", "infrastructure.device=cpu", "infrastructure.num_threads=1"]


def make_splits(root: Path, train: tuple[list[int], list[int]], val: tuple[list[int], list[int]]) -> None:
    for name, (identity, panorama) in (("train", train), ("val", val), ("test", val)):
        write_split(root / "merged" / f"{name}.parquet", identity, panorama)
    keys = pq.read_table(root / "merged" / "train.parquet", columns=[IMAGE_KEY]).column(IMAGE_KEY).to_pylist()
    write_difficulty(root / "difficulty" / "difficulty_metadata.parquet", len(keys), keys)


@pytest.mark.timeout(120)  # before the fix this looped forever looking for an identity with two images
def test_a_train_split_without_pairs_is_exit_2_naming_it(tmp_path, capsys):
    make_splits(tmp_path, train=(list(range(12)), list(range(12))),  # 12 identities, one image each
                val=([0, 0, 1, 1], [0, 1, 2, 3]))
    assert train_stage.main(train_argv(tmp_path)) == 2
    err = capsys.readouterr().err.strip()
    assert str(tmp_path / "merged" / "train.parquet") in err and "two images" in err and "\n" not in err
    assert not (tmp_path / "runs").exists()  # refused before anything was written


def test_a_val_split_without_a_positive_pair_is_exit_2_before_the_first_epoch(tmp_path, capsys, caplog):
    identity = [i // 3 for i in range(18)]
    # val: every identity's images come from one panorama, so no query has a gallery image of its own identity
    make_splits(tmp_path, train=(identity, list(range(18))), val=([0, 0, 1, 1, 2], [5, 5, 6, 6, 7]))
    assert train_stage.main(train_argv(tmp_path)) == 2
    err = capsys.readouterr().err.strip()
    assert str(tmp_path / "merged" / "val.parquet") in err and "two panoramas" in err and "\n" not in err
    assert not (tmp_path / "runs").exists()
    # the same data with a second panorama in val trains (the check refuses only what cannot be measured)
    make_splits(tmp_path, train=(identity, list(range(18))), val=([0, 0, 1, 1, 2], [5, 8, 6, 6, 7]))
    assert train_stage.main([*train_argv(tmp_path), "logging.progress_every=1"]) == 0
    assert (tmp_path / "runs" / "r" / "metrics.jsonl").is_file()
    # stderr is not a terminal here: a progress line per batch (item 5)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("epoch 1: ")]
    assert any(m.startswith("epoch 1: 2/2 batches (100%), ") and "batches/s" in m for m in lines), lines


def test_anchor_schedule_refuses_instead_of_looping():
    with pytest.raises(ValueError, match="two images"):
        anchor_schedule(IdentityIndex(np.arange(5)), 2, 3, seed=0, epoch=1)


# ---------------------------------------------------------------- item 2: process_tar re-run after a tar was cut

def test_rerun_after_a_tar_was_cut_keeps_the_good_shards(tmp_path, sample, stage_args, caplog):
    root = tmp_path / "w"
    (root / "tars").mkdir(parents=True)
    data = (sample[0] / "tars" / "region_1.tar").read_bytes()
    (root / "tars" / "r.tar").write_bytes(data)
    assert process_tar.main(stage_args(root)) == 0
    before = {p.name: p.read_bytes() for p in (root / "inter").glob("*.parquet")}
    assert len(read_parquets(root / "inter")) == 92
    (root / "tars" / "r.tar").write_bytes(data[: len(data) // 2])  # cut short after the good run
    caplog.clear()
    assert process_tar.main(stage_args(root)) == 0
    assert {p.name: p.read_bytes() for p in (root / "inter").glob("*.parquet")} == before  # nothing deleted
    assert read_json(root / "inter" / "process_report.json")["rows"] == 92
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("r.tar" in w and "92" in w and "cut short" in w for w in warnings), warnings
    assert not any(p.name.startswith(".") for p in (root / "inter").iterdir())  # staging removed
    # the complete tar again: read again (size changed), the same rows
    (root / "tars" / "r.tar").write_bytes(data)
    assert process_tar.main(stage_args(root)) == 0
    assert len(read_parquets(root / "inter")) == 92


def test_an_unreadable_tar_is_a_warning_and_no_rows_at_all_is_exit_2(tmp_path, sample, stage_args, caplog, capsys):
    root = tmp_path / "w"
    (root / "tars").mkdir(parents=True)
    (root / "tars" / "junk.tar").write_bytes(np.random.default_rng(0).bytes(5000))
    assert process_tar.main(stage_args(root)) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert str(root / "tars") in err and "no usable" in err
    assert any("junk.tar" in r.getMessage() for r in caplog.records if r.levelname == "WARNING")
    assert not list((root / "inter").glob("*.parquet"))
    # beside a good tar the junk one is only a warning
    (root / "tars" / "good.tar").write_bytes((sample[0] / "tars" / "region_1.tar").read_bytes())
    caplog.clear()
    assert process_tar.main(stage_args(root)) == 0
    assert len(read_parquets(root / "inter")) == 92
    report = read_json(root / "inter" / "process_report.json")
    assert report["per_tar"]["junk.tar"]["rows"] == 0 and report["skipped"]["corrupt_tar"] == 1


# ---------------------------------------------------------------- item 3: garbage and wrong-schema files

def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith("error: ") and not any("Traceback" in line for line in err), err
    return err[-1]


@pytest.fixture(scope="module")
def intermediates(sample, tmp_path_factory) -> Path:
    """process_tar run on one sample tar: (root with inter/ holding good shards)."""
    root = tmp_path_factory.mktemp("bad_input_inter")
    (root / "tars").mkdir()
    (root / "tars" / "r.tar").write_bytes((sample[0] / "tars" / "region_1.tar").read_bytes())
    assert process_tar.main(stage_args(root)) == 0
    return root


def copy_with_bad_shard(intermediates: Path, tmp_path: Path, kind: str) -> Path:
    """A copy of the intermediates whose first shard is garbage / lacks a column / holds text latitudes."""
    root = tmp_path / "w"
    shutil.copytree(intermediates / "inter", root / "inter")
    shard = sorted((root / "inter").glob("*.parquet"))[0]
    if kind == "garbage":
        shard.write_bytes(b"PAR1" + np.random.default_rng(1).bytes(3000))
    else:
        table = pq.read_table(shard)
        if kind == "missing_column":
            table = table.drop_columns([IDENTITY])
        else:
            table = table.set_column(table.schema.get_field_index("target_lat"), "target_lat",
                                     table.column("target_lat").cast(pa.string()))
        pq.write_table(table, shard)
    return shard


@pytest.mark.parametrize("kind, says", [("garbage", "not a readable parquet"), ("missing_column", "'identity'"),
                                        ("text_latitude", "fix_intermediate_schema")])
def test_merge_and_split_refuses_a_bad_intermediate_in_one_line(intermediates, tmp_path, stage_args, capsys,
                                                                 kind, says):
    shard = copy_with_bad_shard(intermediates, tmp_path, kind)
    assert merge_and_split.main(stage_args(tmp_path / "w")) == 2
    line = one_error_line(capsys)
    assert str(shard) in line and says in line, line
    assert not (tmp_path / "w" / "merged").exists()


def test_fix_intermediate_schema_refuses_a_garbage_parquet(intermediates, tmp_path, stage_args, capsys):
    shard = copy_with_bad_shard(intermediates, tmp_path, "garbage")
    assert fix_intermediate_schema.main(stage_args(tmp_path / "w")) == 2
    line = one_error_line(capsys)
    assert str(shard) in line and "not a readable parquet" in line


def test_generate_refuses_a_garbage_intermediate(intermediates, tmp_path, stage_args, capsys):
    shard = copy_with_bad_shard(intermediates, tmp_path, "garbage")
    assert generate_embeddings.main(stage_args(tmp_path / "w")) == 2
    line = one_error_line(capsys)
    assert str(shard) in line and "not a readable parquet" in line


@pytest.mark.parametrize("bad", ["val.parquet", "difficulty_metadata.parquet"])
def test_training_refuses_a_garbage_split_or_difficulty_file(tmp_path, capsys, bad):
    identity = [i // 3 for i in range(18)]
    make_splits(tmp_path, train=(identity, list(range(18))), val=([0, 0, 1, 1], [0, 1, 2, 3]))
    path = next(tmp_path.rglob(bad))
    path.write_bytes(np.random.default_rng(2).bytes(2000))
    assert train_stage.main(train_argv(tmp_path)) == 2
    line = one_error_line(capsys)
    assert str(path) in line and "parquet" in line


def test_garbage_weights_files_are_exit_2_in_one_line(tmp_path, capsys):
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(np.random.default_rng(3).bytes(5000))
    assert convert_to_hf.main([str(weights), str(tmp_path / "out")]) == 2
    line = one_error_line(capsys)
    assert str(weights) in line and "safetensors" in line and not (tmp_path / "out").exists()
    # training resumed from a garbage weights file
    make_splits(tmp_path, train=([i // 3 for i in range(18)], list(range(18))), val=([0, 0, 1, 1], [0, 1, 2, 3]))
    assert train_stage.main([*train_argv(tmp_path), f"global.resume={weights}"]) == 2
    assert str(tmp_path) in one_error_line(capsys)


# ---------------------------------------------------------------- item 5: progress lines when stderr is no terminal

def test_progress_log_writes_rate_and_eta_every_n_steps(caplog):
    now = [100.0]
    steps = ProgressLog("shard-7", total=10, every=4, clock=lambda: now[0])  # stderr is captured: not a terminal
    assert steps.enabled
    with caplog.at_level(logging.INFO, logger="building_embed.progress"):
        for _ in range(10):
            now[0] += 0.5  # 2 batches per second
            steps.step()
    lines = [r.getMessage() for r in caplog.records if r.name == "building_embed.progress"]
    # after 4 steps (2 s): 6 left at 2 per second = 3 s; after 8: 1 s; none at 10 (not another 4)
    assert lines == ["shard-7: 4/10 batches (40%), 2 batches/s, ETA 0:00:03",
                     "shard-7: 8/10 batches (80%), 2 batches/s, ETA 0:00:01"]
    assert not ProgressLog("x", 10, every=0).enabled and not ProgressLog("x", 10, enabled=False).enabled
    silent = ProgressLog("quiet", 10, every=1, enabled=False)
    with caplog.at_level(logging.INFO):
        silent.step(5)
    assert not any("quiet" in r.getMessage() for r in caplog.records)


def test_equal_embeddings_rank_in_gallery_order():
    # every similarity ties (a collapsed head): the gallery order decides, as in a stable sort of the full matrix
    identity, panorama = np.array([0, 1, 0, 1, 2, 2]), np.arange(6)
    embeddings = torch.ones(6, 4)
    scores = retrieval_metrics(embeddings, identity, panorama, memory_mb=1e-4)  # blocks of one query
    reference = full_matrix_reference(embeddings, identity, panorama)
    for name, value in reference.items():
        assert scores[name] == pytest.approx(value, abs=1e-6), name
    # each query's nearest is the first image of its gallery: image 0 (image 1 for query 0), so only query 2 (the
    # other image of identity 0) hits at rank 1
    assert scores["recall@1"] == pytest.approx(1 / 6)
