"""Streaming, vectorised create_embeddings: the same bytes as the former per-subject loop (sample data, shuffled
shards, subject groups, pretraining windows, [UNK] mapping, the MIMIC-IV demo), resumable by shard, identical with
worker processes; time windows and admission context on hand-built timelines."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from ehr_helpers import stage1_config

from common.config import load_config
from ehr_embedded import create_embeddings as stage
from ehr_embedded.config import ConvertConfig, Stage1Config
from ehr_embedded.create_embeddings import STATIC_TIME, ChunkEvents, Plan, create_embeddings, cut_chunk
from ehr_embedded.storage import US_PER_HOUR, CodeTable
from studies.ehr_embedded.create_embeddings_loop import create_embeddings_loop

H = US_PER_HOUR


def store_files(store: Path) -> dict[str, bytes]:
    """Every file of a store but report.json (it holds the run time), as bytes."""
    return {str(f.relative_to(store)): f.read_bytes() for f in sorted(store.rglob("*"))
            if f.is_file() and f.name != "report.json"}


def assert_same_store(a: Path, b: Path) -> None:
    """Byte equality is right here: both builders copy the float32 values, compute each time gap and hour count by
    the same elementwise float64 division of int64 microseconds (no sums, no reordering) and take description rows
    from the same _extension_table; two worker / rank / resumed runs are the same code on the same shards."""
    fa, fb = store_files(a), store_files(b)
    assert fa.keys() == fb.keys()
    different = [name for name in fa if fa[name] != fb[name]]
    assert not different, different
    ra, rb = (json.loads((s / "report.json").read_text()) for s in (a, b))
    for r in (ra, rb):
        r.pop("seconds"), r.pop("sequences", None), r.pop("data_dir"), r.pop("vocab_embedding_path")
    assert ra == rb


def shuffled_copy(meds: Path, dst: Path, seed: int = 0) -> Path:
    """The MEDS set with every shard's rows in random order (the streaming path must sort them itself)."""
    shutil.copytree(meds, dst)
    rng = np.random.default_rng(seed)
    for shard in sorted((dst / "data").rglob("*.parquet")):
        table = pq.read_table(shard)
        pq.write_table(table.take(rng.permutation(table.num_rows)), shard, row_group_size=97)  # many small batches
    return dst


@pytest.mark.parametrize("extra", [
    [],
    ["sequences.max_length=5", "sequences.pretrain_windows=true", "sequences.chunk_events=300"],
    ["sequences.max_length=3", "sequences.embed_unseen_codes=false", "sequences.pretrain_windows=true"],
], ids=["default", "windows-groups", "unk"])
def test_streaming_store_is_byte_identical_to_the_per_subject_loop(built, tmp_path, extra):
    meds = shuffled_copy(built.meds, tmp_path / "meds") if extra else built.meds
    vocab = f"data.vocab_embedding_path={built.vocab}"
    new = create_embeddings(stage1_config(meds, tmp_path / "new", vocab, *extra))
    old = create_embeddings_loop(stage1_config(meds, tmp_path / "old", vocab, *extra))
    assert_same_store(tmp_path / "new" / "store", tmp_path / "old" / "store")
    assert new["counts"] == old["counts"] and new["counts"]["sequences_written"] == 160
    if "sequences.chunk_events=300" in extra:  # the groups really split each shard
        assert new["counts"]["sequences_truncated"] > 0 and new["counts"]["pretrain_windows"] > 160
    if "sequences.embed_unseen_codes=false" in extra:
        assert new["counts"]["events_mapped_to_unk"] > 0
    assert not (tmp_path / "new" / "store.parts").exists()  # parts removed once the store is written


def test_resume_skips_finished_shards(built, tmp_path, monkeypatch):
    """A crash after shard 1 leaves two finished parts; the re-run builds only shard 2 and writes the same store.
    A changed setting changes the fingerprint: then nothing is reused."""
    built_shards = []
    real_build = stage.build_part

    def crash_after_two(path, plan, part_dir):
        if len(built_shards) == 2:
            raise RuntimeError("killed")
        real_build(path, plan, part_dir)
        built_shards.append(Path(path).parent.name)

    monkeypatch.setattr(stage, "build_part", crash_after_two)
    cfg = stage1_config(built.meds, tmp_path, f"data.vocab_embedding_path={built.vocab}")
    with pytest.raises(RuntimeError, match="killed"):
        create_embeddings(cfg)
    parts = tmp_path / "store.parts"
    assert sorted(p.name for p in parts.iterdir()) == ["shard_00000", "shard_00001"]
    assert not (tmp_path / "store").exists()

    def counting(path, plan, part_dir):
        real_build(path, plan, part_dir)
        built_shards.append(Path(path).parent.name)

    built_shards.clear()
    monkeypatch.setattr(stage, "build_part", counting)
    create_embeddings(cfg)
    shards = [p.parent.name for p in sorted((built.meds / "data").rglob("*.parquet"))]
    assert built_shards == [shards[2]]  # the two finished shards were not processed again
    assert_same_store(tmp_path / "store", built.store)

    built_shards.clear()  # a failed run with other settings leaves parts a later run must not trust
    monkeypatch.setattr(stage, "build_part", crash_after_two)
    with pytest.raises(RuntimeError):
        create_embeddings(stage1_config(built.meds, tmp_path, f"data.vocab_embedding_path={built.vocab}",
                                        "sequences.max_length=7"))
    built_shards.clear()
    monkeypatch.setattr(stage, "build_part", counting)
    create_embeddings(cfg)
    assert built_shards == shards  # fingerprints differ: every shard rebuilt
    assert_same_store(tmp_path / "store", built.store)


def test_two_workers_equal_one(built, tmp_path):
    cfg = stage1_config(built.meds, tmp_path, f"data.vocab_embedding_path={built.vocab}", "sequences.num_workers=2")
    create_embeddings(cfg)
    assert_same_store(tmp_path / "store", built.store)


def test_rank_world_size_parts_then_one_merge(built, tmp_path, monkeypatch):
    """Two array tasks each build their shards' parts (0 and 2 / 1) and stop; the final plain run builds nothing and
    writes the same store."""
    base = [f"data.vocab_embedding_path={built.vocab}", "sequences.shard_world_size=2"]
    first = create_embeddings(stage1_config(built.meds, tmp_path, *base, "sequences.shard_rank=0"))
    assert first["parts_built"] == 2 and first["parts_done"] == 2 and not (tmp_path / "store").exists()
    second = create_embeddings(stage1_config(built.meds, tmp_path, *base, "sequences.shard_rank=1"))
    assert second["parts_built"] == 1 and second["parts_done"] == 3
    monkeypatch.setattr(stage, "build_part", lambda *a: pytest.fail("a finished part was built again"))
    create_embeddings(stage1_config(built.meds, tmp_path, f"data.vocab_embedding_path={built.vocab}"))
    assert_same_store(tmp_path / "store", built.store)


def test_subject_in_two_shards_exit_2(built, tmp_path, capsys):
    meds = tmp_path / "meds"
    shutil.copytree(built.meds, meds)
    train, tuning = meds / "data" / "train" / "0.parquet", meds / "data" / "tuning" / "0.parquet"
    events = pq.read_table(train)
    labelled = set(pd.read_parquet(meds / "labels" / "infection")["subject_id"])
    subject = next(s for s in events.column("subject_id").to_pylist() if s in labelled)
    moved = events.filter(pc.equal(events.column("subject_id"), subject))
    pq.write_table(pa.concat_tables([pq.read_table(tuning), moved.cast(pq.read_table(tuning).schema)]), tuning)
    args = [f"data.data_dir={meds}", f"data.labels_filepath={meds}/labels/infection",
            f"data.vocab_embedding_path={built.vocab}", f"data.embedding_output_dir={tmp_path}/store"]
    assert stage.main(args) == 2
    err = capsys.readouterr().err
    assert f"{tuning}: subject {subject} also appears in an earlier shard" in err
    assert not (tmp_path / "store").exists()


# --------------------------------------------------------------------------------------------- time windows


def hand_plan(max_length: int, labels_us: list[int], history_hours: float | None = None,
              context: tuple[str, ...] = ()) -> Plan:
    n = len(labels_us)
    return Plan(pa.array([], pa.string()), np.zeros(0, np.int32), np.full(n, 7, np.int64), np.array(labels_us),
                np.arange(n, dtype=np.int64), np.full(n, 2, np.int8), np.array([7]), np.zeros(0, np.int64),
                max_length, True, False, None if history_hours is None else int(history_hours * H), context, 10**6, "x")


def hand_events() -> ChunkEvents:
    """Subject 7: two static events (tokens 2, 3), an admission at 0 h (token 10, context class 0), then hourly
    events at 1..40 h (tokens 101..140), a second admission at 41 h (token 11), events at 42..45 h (142..145)."""
    times = [STATIC_TIME, STATIC_TIME, 0, *[h * H for h in range(1, 41)], 41 * H, *[h * H for h in range(42, 46)]]
    tokens = [2, 3, 10, *range(101, 141), 11, *range(142, 146)]
    context = [-1, -1, 0, *[-1] * 40, 0, *[-1] * 4]
    n = len(times)
    return ChunkEvents(np.full(n, 7, np.int64), np.array(times, np.int64), np.array(tokens, np.int32),
                       np.arange(n, dtype=np.float32), np.array(context, np.int8))


def cut_tokens(plan: Plan) -> tuple[list[list[int]], dict]:
    ev = hand_events()
    out, counts, _ = cut_chunk(ev, plan)
    if "held_out" not in out:
        return [], dict(counts)
    part = out["held_out"]
    offsets = np.concatenate([[0], np.cumsum(part["lengths"])])
    tokens = ev.token_id[part["index"]]
    return [tokens[offsets[i]:offsets[i + 1]].tolist() for i in range(len(offsets) - 1)], {**part["rows"], **counts}


def test_history_window_by_time_keeps_static_events():
    # prediction at 30.5 h: the count window (max_length 20) would reach back to 13 h; the last 5 h stop at 25.5 h
    seqs, rows = cut_tokens(hand_plan(20, [int(30.5 * H), int(0.5 * H)], history_hours=5))
    assert seqs[0] == [2, 3, 126, 127, 128, 129, 130]  # events at 26..30 h
    assert seqs[1] == [2, 3, 10]
    assert rows["n_events_before_cut"].tolist() == [33, 3]  # static included, as before
    assert rows["hours_last_event_to_prediction"].tolist() == [0.5, 0.5]
    # a window with no event in it is a skipped label, not a sequence of static events
    seqs, rows = cut_tokens(hand_plan(20, [int(41.5 * H) + 10 * H], history_hours=1))
    assert seqs == [] and rows["skipped_no_events_before_prediction"] == 1


def test_context_codes_keep_the_latest_admission():
    # prediction at 40.5 h, max_length 6: count window = 2 static + 4 recent; the admission at 0 h is kept in place of
    # the oldest of them, right after the static events
    seqs, rows = cut_tokens(hand_plan(6, [int(40.5 * H)], context=("ADMISSION",)))
    assert seqs == [[2, 3, 10, 138, 139, 140]]
    assert rows["n_static"].tolist() == [2]
    # after the second admission (41 h) that one is the latest; it is already inside the window: nothing added
    seqs, _ = cut_tokens(hand_plan(6, [int(44.5 * H)], context=("ADMISSION",)))
    assert seqs == [[2, 3, 11, 142, 143, 144]]
    # with a time window too, the admission survives outside it
    seqs, _ = cut_tokens(hand_plan(50, [int(40.5 * H)], history_hours=2.0, context=("ADMISSION",)))
    assert seqs == [[2, 3, 10, 139, 140]]
    # without context codes the admission is gone
    seqs, _ = cut_tokens(hand_plan(6, [int(40.5 * H)]))
    assert seqs == [[2, 3, 137, 138, 139, 140]]


def test_context_codes_through_the_stage(built, tmp_path):
    """End to end on the sample data with a 1-hour history window: every stored sequence equals an independent
    pandas derivation (static events, then the latest ADMIN event when it lies before the window, then the window);
    labels whose window is empty but that have an admission are kept."""
    from ehr_helpers import stored_codes

    from ehr_embedded import meds_io

    plain = create_embeddings(stage1_config(built.meds, tmp_path / "plain", f"data.vocab_embedding_path={built.vocab}",
                                            "sequences.max_history_hours=1"))
    report = create_embeddings(stage1_config(built.meds, tmp_path, f"data.vocab_embedding_path={built.vocab}",
                                             "sequences.max_history_hours=1", "sequences.context_codes=[ADMIN]"))
    assert report["counts"]["sequences_written"] > plain["counts"]["sequences_written"]
    events = meds_io.read_all_events(built.meds).to_pandas()
    got = stored_codes(tmp_path / "store")
    with_context = 0
    for lab in meds_io.read_labels(built.meds / "labels" / "infection").itertuples():
        ev = events[events["subject_id"] == lab.subject_id]
        static = list(ev.loc[ev["time"].isna(), "code"])
        timed = ev[ev["time"].notna() & (ev["time"] < lab.prediction_time)].sort_values("time", kind="stable")
        in_window = timed["time"] >= lab.prediction_time - pd.Timedelta(hours=1)
        admissions = np.flatnonzero(timed["code"].str.startswith("ADMIN").to_numpy())
        extra = [timed["code"].iloc[admissions[-1]]] if len(admissions) and not in_window.iloc[admissions[-1]] else []
        window = list(timed.loc[in_window, "code"])[-(64 - len(static) - len(extra)):]
        key = (lab.subject_id, pd.Timestamp(lab.prediction_time))
        if not extra and not window:
            assert key not in got
            continue
        assert got[key] == static + extra + window, key
        with_context += bool(extra)
    assert with_context > 10


# --------------------------------------------------------------------------------------------- real data


@pytest.mark.real_data
def test_mimic_demo_streaming_equals_loop(real_data_dir, tmp_path):
    """The MIMIC-IV demo (canonical MEDS via convert_mimic): same bytes as the loop, with half the training codes
    outside a synthetic vocabulary (mapped to [UNK]; no text model needed) and pretraining windows."""
    from ehr_embedded.convert_mimic import convert

    meds = tmp_path / "meds"
    convert(load_config(ConvertConfig, None, [
        f"events_filepath={real_data_dir}/ehr_mimic4demo_meds/mimic_iv_demo_meds_events.parquet",
        f"raw_dir={real_data_dir}/ehr_mimic4demo_raw", f"output_dir={meds}", "subjects_limit=40"]))
    codes = sorted(set(pq.read_table(meds / "data" / "train" / "0.parquet", columns=["code"]).column(0).to_pylist()))
    names = ["[PAD]", "[UNK]", *codes[::2]]
    vocab = pd.DataFrame({"token_id": np.arange(len(names), dtype=np.int32), "code": names, "description": names,
                          "description_source": "codes", "train_count": np.ones(len(names), np.int64),
                          "value_mean": np.nan, "value_std": np.nan, "in_lm_vocab": True})
    CodeTable(vocab, np.ones((len(names), 4), np.float32), {"model_name": "none"}).save(tmp_path / "vocab")
    args = [f"data.data_dir={meds}", f"data.labels_filepath={meds}/labels/long_stay",
            f"data.vocab_embedding_path={tmp_path}/vocab", "sequences.max_length=48",
            "sequences.embed_unseen_codes=false", "sequences.pretrain_windows=true"]
    new = create_embeddings(load_config(Stage1Config, None, [*args, f"data.embedding_output_dir={tmp_path}/new"]))
    old = create_embeddings_loop(load_config(Stage1Config, None, [*args, f"data.embedding_output_dir={tmp_path}/old"]))
    assert new["counts"] == old["counts"]
    assert new["counts"]["sequences_written"] > 10 and new["counts"]["events_mapped_to_unk"] > 0
    assert new["counts"]["pretrain_windows"] > new["train"]["sequences"]
    assert_same_store(tmp_path / "new", tmp_path / "old")
