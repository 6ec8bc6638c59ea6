"""Preprocessing at hospital scale: streaming, vectorised `create_embeddings` against the former per-subject loop
(`studies.ehr_embedded.create_embeddings_loop`) on a generated MEDS set.

    OMP_NUM_THREADS=1 python benchmarks/ehr_preprocess.py                 # 20,000 subjects, 20 M events, 8 shards
    python benchmarks/ehr_preprocess.py --subjects 2000 --events 2000000  # a quick look
    # writes runs/benchmarks/ehr_preprocess.json (--out)

Generation (seeded, vectorised, into --workdir): canonical MEDS shards sorted by (subject, time), 2 static events per
subject, timed events over 1-5 years drawn Zipf-like from a vocabulary of --codes codes (lab codes carry a numeric
value), labels with 1-3 prediction times per subject, an 80/10/10 splits file, and a synthetic code table (random
16-d embeddings: the text encoder is not what is measured; every code is in the vocabulary, so nothing is embedded
from descriptions on either side).

Measured, each stage in a fresh child process (wall time and peak resident memory, `ru_maxrss` of the child and of
its own worker processes): ours on the whole set; ours and the loop on the first --baseline-shards shards (the same
input; their stores are compared byte for byte), and ours on that subset with a small `sequences.chunk_events`
(the shard read in groups of subjects: the memory bound is the setting). Events per second = MEDS events in the
input shards / seconds of the stage call (imports excluded; `process_seconds` in the JSON includes them).
Also measured: the peak of a child that only imports the modules (torch among them), the floor under both.
Goals: at least 10x the loop, peak memory under 2 GiB whatever the total size.
"""

from __future__ import annotations

import argparse
import filecmp
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common.io import write_json  # noqa: E402

US_PER_DAY = 86_400_000_000
STATIC_CODES = ["SEX//F", "SEX//M", *[f"RACE//{i}" for i in range(6)]]


def vocabulary(n_codes: int) -> list[str]:
    n_lab = n_codes // 3
    n_dx = n_codes // 3
    return ([f"LAB//{50000 + i}//mg/dL" for i in range(n_lab)] + [f"DIAGNOSIS//ICD10//X{i:05d}" for i in range(n_dx)]
            + [f"MEDICATION//{i:05d}" for i in range(n_codes - n_lab - n_dx)])


def generate(out: Path, subjects: int, events: int, shards: int, n_codes: int, seed: int) -> dict:
    """Write the MEDS set and the code table under `out`; returns counts."""
    rng = np.random.default_rng(seed)
    shutil.rmtree(out, ignore_errors=True)
    (out / "meds" / "data").mkdir(parents=True)
    (out / "meds" / "metadata").mkdir()
    (out / "meds" / "labels").mkdir()
    codes = vocabulary(n_codes)
    n_lab = n_codes // 3
    weights = 1.0 / (np.arange(n_codes) + 10.0)
    weights /= weights.sum()
    subject_ids = np.arange(1_000_000, 1_000_000 + subjects, dtype=np.int64)
    per_subject = rng.lognormal(0.0, 0.8, subjects)
    timed = np.maximum(5, np.round(per_subject / per_subject.sum() * (events - 2 * subjects))).astype(np.int64)
    start = (np.datetime64("2010-01-01", "us").astype(np.int64)
             + rng.integers(0, 3650, subjects) * US_PER_DAY + rng.integers(0, US_PER_DAY, subjects))
    span = rng.integers(365, 5 * 365, subjects) * US_PER_DAY
    bounds = np.linspace(0, subjects, shards + 1).astype(np.int64)
    total = 0
    for k in range(shards):
        lo, hi = bounds[k], bounds[k + 1]
        n = timed[lo:hi]
        local = np.repeat(np.arange(hi - lo), n)
        frac = np.sort(local + rng.random(len(local)))  # sorted within each subject
        times = start[lo:hi][local] + ((frac - local) * span[lo:hi][local]).astype(np.int64)
        code_idx = rng.choice(n_codes, size=len(local), p=weights)
        values = np.where(code_idx < n_lab, rng.normal(1.0, 0.5, len(local)), np.nan).astype(np.float32)
        static_sid = np.repeat(subject_ids[lo:hi], 2)
        static_code = np.column_stack([rng.integers(0, 2, hi - lo), rng.integers(2, len(STATIC_CODES), hi - lo)])
        all_codes = np.array(codes + STATIC_CODES, dtype=object)
        sid = np.concatenate([static_sid, subject_ids[lo:hi][local]])
        order = np.argsort(sid, kind="stable")  # static events first within each subject
        code_col = np.concatenate([static_code.ravel() + n_codes, code_idx])[order]
        table = pa.table({
            "subject_id": pa.array(sid[order], pa.int64()),
            "time": pa.array(np.concatenate([np.full(len(static_sid), np.iinfo(np.int64).min), times])[order]
                             .astype("datetime64[us]"), pa.timestamp("us"),
                             mask=np.concatenate([np.ones(len(static_sid), bool), np.zeros(len(times), bool)])[order]),
            "code": pa.DictionaryArray.from_arrays(pa.array(code_col.astype(np.int32)),
                                                   pa.array(list(all_codes), pa.string())).cast(pa.string()),
            "numeric_value": pa.array(np.concatenate([np.full(len(static_sid), np.nan, np.float32), values])[order],
                                      pa.float32(), from_pandas=True)})
        pq.write_table(table, out / "meds" / "data" / f"{k}.parquet", row_group_size=1 << 20)
        total += table.num_rows
        del table
    n_labels = rng.integers(1, 4, subjects)
    lab_sid = np.repeat(np.arange(subjects), n_labels)
    pred = start[lab_sid] + (rng.uniform(0.2, 1.0, len(lab_sid)) * span[lab_sid]).astype(np.int64)
    pred = (pred // 1_000_000) * 1_000_000
    labels = pa.table({"subject_id": pa.array(subject_ids[lab_sid], pa.int64()),
                       "prediction_time": pa.array(pred.astype("datetime64[us]"), pa.timestamp("us")),
                       "boolean_value": pa.array(rng.random(len(lab_sid)) < 0.2, pa.bool_())})
    pq.write_table(labels, out / "meds" / "labels" / "task.parquet")
    split = rng.choice(["train", "tuning", "held_out"], size=subjects, p=[0.8, 0.1, 0.1])
    pq.write_table(pa.table({"subject_id": subject_ids, "split": split}),
                   out / "meds" / "metadata" / "subject_splits.parquet")
    write_code_table(out / "vocab", codes + STATIC_CODES, n_lab, rng)
    return {"subjects": subjects, "events": int(total), "shards": shards, "labels": int(len(lab_sid)),
            "codes": n_codes + len(STATIC_CODES)}


def write_code_table(path: Path, codes: list[str], n_lab: int, rng: np.random.Generator) -> None:
    from ehr_embedded.storage import PAD_TOKEN, UNK_TOKEN, CodeTable

    names = [PAD_TOKEN, UNK_TOKEN, *codes]
    n = len(names)
    is_lab = np.zeros(n, bool)
    is_lab[2:2 + n_lab] = True
    vocab = pd.DataFrame({"token_id": np.arange(n, dtype=np.int32), "code": names, "description": names,
                          "description_source": "codes", "train_count": np.ones(n, np.int64),
                          "value_mean": np.where(is_lab, 1.0, np.nan).astype(np.float32),
                          "value_std": np.where(is_lab, 0.5, np.nan).astype(np.float32),
                          "in_lm_vocab": np.ones(n, bool)})
    embeddings = rng.normal(size=(n, 16)).astype(np.float32)
    embeddings[0] = 0
    CodeTable(vocab, embeddings, {"model_name": "synthetic", "normalize": False}).save(path)


def subset(meds: Path, out: Path, shards: int) -> Path:
    """A MEDS root holding the first `shards` shards (links) and the same metadata."""
    shutil.rmtree(out, ignore_errors=True)
    (out / "data").mkdir(parents=True)
    for f in sorted((meds / "data").glob("*.parquet"), key=lambda p: int(p.stem))[:shards]:
        os.symlink(f.resolve(), out / "data" / f.name)
    shutil.copytree(meds / "metadata", out / "metadata")
    return out


def shard_events(meds: Path) -> int:
    return sum(pq.ParquetFile(f).metadata.num_rows for f in (meds / "data").glob("*.parquet"))


def measure(kind: str, work: Path, meds: Path, store: Path, extra: list[str]) -> dict:
    """Run one stage in a fresh child process; its wall time and peak RSS (child and its workers)."""
    overrides = [f"data.data_dir={meds}", f"data.labels_filepath={work}/meds/labels/task.parquet",
                 f"data.splits_filepath={work}/meds/metadata/subject_splits.parquet",
                 f"data.vocab_embedding_path={work}/vocab", f"data.embedding_output_dir={store}", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    started = time.time()
    proc = subprocess.run([sys.executable, __file__, "--child", kind, "--", *overrides], env=env,
                          capture_output=True, text=True)
    wall = time.time() - started
    if proc.returncode:
        raise SystemExit(f"{kind} failed:\n{proc.stderr[-3000:]}")
    child = json.loads(proc.stdout.strip().splitlines()[-1])
    events = shard_events(meds)
    return {"stage_seconds": round(child["seconds"], 2), "process_seconds": round(wall, 2), "input_events": events,
            "events_per_second": round(events / child["seconds"]), "peak_rss_mib": child["peak_rss_mib"],
            "overrides": extra}


def child(kind: str, overrides: list[str]) -> None:
    from common.config import load_config
    from common.logs import setup_logging
    from ehr_embedded.config import Stage1Config

    setup_logging()
    cfg = load_config(Stage1Config, None, overrides)
    if kind == "imports":  # the floor: the modules both stages import (torch among them), no work
        import ehr_embedded.create_embeddings  # noqa: F401
        import studies.ehr_embedded.create_embeddings_loop  # noqa: F401
        print(json.dumps({"seconds": 1.0, "peak_rss_mib": round(
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}))
        return
    if kind == "loop":
        from studies.ehr_embedded.create_embeddings_loop import create_embeddings_loop as stage
    else:
        from ehr_embedded.create_embeddings import create_embeddings as stage
    started = time.time()
    stage(cfg)
    seconds = time.time() - started
    peak_kib = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                   resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
    print(json.dumps({"seconds": seconds, "peak_rss_mib": round(peak_kib / 1024, 1)}))


def same_store(a: Path, b: Path) -> bool:
    """Every file of store `a` is byte-identical in `b` (report.json aside: it holds the run time)."""
    files = [f for f in a.rglob("*") if f.is_file() and f.name != "report.json"]
    return all(filecmp.cmp(f, b / f.relative_to(a), shallow=False) for f in files)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--subjects", type=int, default=20_000)
    parser.add_argument("--events", type=int, default=20_000_000)
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--codes", type=int, default=3000)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--baseline-shards", type=int, default=1)
    parser.add_argument("--small-chunk", type=int, default=400_000,
                        help="also run ours on the subset with sequences.chunk_events this small (memory bound)")
    parser.add_argument("--workers", type=int, default=2, help="also time ours with this many processes (0: skip)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/ehr_preprocess_bench"))
    parser.add_argument("--reuse", action="store_true", help="reuse the generated set in --workdir if present")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "benchmarks" / "ehr_preprocess.json")
    parser.add_argument("--child", choices=["new", "loop", "imports"], help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.overrides)
        return 0

    work = args.workdir
    started = time.time()
    if args.reuse and (work / "dataset.json").is_file():
        dataset = json.loads((work / "dataset.json").read_text())
    else:
        dataset = generate(work, args.subjects, args.events, args.shards, args.codes, args.seed)
        dataset["generate_seconds"] = round(time.time() - started, 1)
        write_json(work / "dataset.json", dataset)
    print(f"dataset: {dataset}", flush=True)
    common = [f"sequences.max_length={args.max_length}"]
    floor = measure("imports", work, work / "meds", work / "unused", common)["peak_rss_mib"]
    print(f"peak RSS of the imports alone: {floor} MiB", flush=True)
    part = subset(work / "meds", work / "subset", args.baseline_shards)
    loop = measure("loop", work, part, work / "store_loop", common)
    print(f"loop, {args.baseline_shards} shard(s): {loop}", flush=True)
    ours_subset = measure("new", work, part, work / "store_subset", common)
    print(f"ours, same shard(s): {ours_subset}", flush=True)
    identical = same_store(work / "store_loop", work / "store_subset")
    small_chunks = measure("new", work, part, work / "store_chunks", [*common, f"sequences.chunk_events={args.small_chunk}"])
    small_chunks["store_byte_identical"] = same_store(work / "store_subset", work / "store_chunks")
    print(f"ours, same shard(s), chunk_events={args.small_chunk}: {small_chunks}", flush=True)
    ours_full = measure("new", work, work / "meds", work / "store_full", common)
    print(f"ours, all {dataset['shards']} shards: {ours_full}", flush=True)
    result = {
        "command": "OMP_NUM_THREADS=1 python benchmarks/ehr_preprocess.py " + " ".join(sys.argv[1:]),
        "dataset": dataset, "max_length": args.max_length, "peak_rss_imports_only_mib": floor,
        "loop_subset": loop, "ours_subset": ours_subset, "ours_subset_small_chunks": small_chunks, "ours_full": ours_full,
        "subset_stores_byte_identical": identical,
        "speedup_same_input": round(ours_subset["events_per_second"] / loop["events_per_second"], 1),
        "speedup_full_vs_loop": round(ours_full["events_per_second"] / loop["events_per_second"], 1),
    }
    if args.workers > 1:
        ours_workers = measure("new", work, work / "meds", work / "store_workers",
                               [*common, f"sequences.num_workers={args.workers}"])
        ours_workers["workers_store_byte_identical"] = same_store(work / "store_full", work / "store_workers")
        print(f"ours, {args.workers} workers: {ours_workers}", flush=True)
        result["ours_full_workers"] = ours_workers
    peaks = [result[k]["peak_rss_mib"] for k in ("ours_subset", "ours_full", "ours_full_workers") if k in result]
    result["goals"] = {"speedup_at_least_10x": result["speedup_same_input"] >= 10,
                       "peak_under_2_gib": max(peaks) < 2048}
    write_json(args.out, result)
    print(json.dumps({k: result[k] for k in ("speedup_same_input", "speedup_full_vs_loop",
                                             "subset_stores_byte_identical", "goals")}))
    print(f"-> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
