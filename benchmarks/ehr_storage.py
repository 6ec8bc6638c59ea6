"""Storage and loading: the compact store (token ids + values + time gaps, memory-mapped) against the original's
per-patient .pt files ({'embeddings': (N, D), 'token_ids': (N,), 'label'}) holding the same sequences.

    python benchmarks/ehr_storage.py                                   # the MIMIC-IV demo store if built, else sample
    python benchmarks/ehr_storage.py --store runs/ehr_embedded/mimic/long_stay --split train
    # prints the table and writes it to --out (default runs/ehr_embedded/benchmarks/ehr_storage.json)

Both loaders produce the same model input per batch of 32: padded `[B, T, D]` float32 embeddings (ours gathers
them from the code table by token id) plus labels. Also timed: what our training loop really loads (token ids,
values, time features; the model gathers embeddings from its buffer), and a cold-cache epoch (our files evicted
from the page cache with posix_fadvise before each epoch). Timing: best of `--repeats` epochs.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.io import write_json  # noqa: E402
from ehr_embedded.data import EventSequenceDataset, collate  # noqa: E402
from ehr_embedded.storage import export_pt, load_dataset_table, open_split  # noqa: E402

BATCH = 32
MIMIC_STORE = Path("runs/ehr_embedded/mimic/long_stay")


def build_sample_store(workdir: Path, subjects: int) -> Path:
    from common.config import load_config
    from ehr_embedded.config import Stage1Config
    from ehr_embedded.create_embeddings import create_embeddings
    from ehr_embedded.create_vocab_embeddings import create_vocab_embeddings
    from ehr_embedded.sample_data import write_sample

    write_sample(workdir / "meds", n_subjects=subjects)
    cfg = load_config(Stage1Config, None, [f"data.data_dir={workdir}/meds",
                                           f"data.labels_filepath={workdir}/meds/labels/infection",
                                           f"data.vocab_embedding_path={workdir}/vocab",
                                           f"data.embedding_output_dir={workdir}/store"])
    create_vocab_embeddings(cfg)
    create_embeddings(cfg)
    return workdir / "store"


def epoch_compact(dataset: EventSequenceDataset, table: torch.Tensor) -> int:
    n = 0
    for start in range(0, len(dataset), BATCH):
        batch = collate([dataset[i] for i in range(start, min(start + BATCH, len(dataset)))])
        embeddings = table[batch["token_ids"]]  # [B, T, D], what the model's buffer gather produces
        n += embeddings.shape[0]
    return n


def epoch_compact_ids(dataset: EventSequenceDataset) -> int:
    """What our training loop actually loads: token ids, values, time features (the model gathers embeddings)."""
    n = 0
    for start in range(0, len(dataset), BATCH):
        n += collate([dataset[i] for i in range(start, min(start + BATCH, len(dataset)))])["token_ids"].shape[0]
    return n


def evict(paths: list[Path]) -> None:
    """Drop these files (only ours) from the page cache, so the next read comes from disk."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)  # dirty pages cannot be dropped
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def epoch_pt(files: list[Path]) -> int:
    n = 0
    for start in range(0, len(files), BATCH):
        items = [torch.load(f, weights_only=True) for f in files[start:start + BATCH]]
        width = max(len(it["token_ids"]) for it in items)
        embeddings = torch.zeros(len(items), width, items[0]["embeddings"].shape[1])
        for row, it in enumerate(items):
            embeddings[row, :len(it["token_ids"])] = it["embeddings"]
        torch.stack([it["label"] for it in items])
        n += embeddings.shape[0]
    return n


def best_time(fn, repeats: int, before=None) -> float:
    times = []
    for _ in range(repeats):
        if before is not None:
            before()
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return min(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", type=Path, default=None)
    parser.add_argument("--split", default="train")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sample-subjects", type=int, default=2000)
    parser.add_argument("--out", type=Path, default=Path("runs/ehr_embedded/benchmarks/ehr_storage.json"))
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="ehr_storage_"))
    try:
        store_dir = args.store or (MIMIC_STORE if (MIMIC_STORE / args.split).is_dir() else None)
        if store_dir is None:
            print(f"no store given and {MIMIC_STORE} absent: building one from {args.sample_subjects} sample subjects")
            store_dir = build_sample_store(work, args.sample_subjects)
        table = load_dataset_table(store_dir)
        store = open_split(store_dir, args.split)
        events = int(store.lengths.sum())
        ours = store.nbytes_on_disk()
        table_bytes = sum(f.stat().st_size for f in (store_dir / "code_table").iterdir())
        export_pt(store, table, work / "pt")
        files = sorted((work / "pt").glob("patient_*.pt"), key=lambda p: int(p.stem.split("_")[1]))
        pt_bytes = sum(f.stat().st_size for f in files)
        max_len = int(store.lengths.max())
        dataset = EventSequenceDataset(store, table, max_length=max_len)
        emb = torch.from_numpy(np.asarray(table.embeddings, np.float32))
        assert epoch_compact(dataset, emb) == epoch_pt(files) == len(store)
        t_ours = best_time(lambda: epoch_compact(dataset, emb), args.repeats)
        t_ids = best_time(lambda: epoch_compact_ids(dataset), args.repeats)
        t_pt = best_time(lambda: epoch_pt(files), args.repeats)
        ours_files = [f for f in store.directory.iterdir() if f.suffix == ".npy"]

        def reopen() -> EventSequenceDataset:
            evict(ours_files)  # and re-open the memory maps so no mapped page survives
            return EventSequenceDataset(open_split(store_dir, args.split), table, max_length=max_len)

        cold_ours = best_time(lambda: epoch_compact(reopen(), emb), args.repeats)
        cold_pt = best_time(lambda: epoch_pt(files), args.repeats, before=lambda: evict(files))
        print(f"store {store_dir} split {args.split}: {len(store)} sequences, {events} events, "
              f"{table.dim}-d code table of {len(table.vocab)} rows")
        print(f"bytes/event  compact store      {ours / events:10.1f}   ({ours / 1e6:.2f} MB)")
        print(f"bytes/event  + code table       {(ours + table_bytes) / events:10.1f}   (table {table_bytes / 1e6:.2f} "
              f"MB, shared by all splits and runs)")
        print(f"bytes/event  per-patient .pt    {pt_bytes / events:10.1f}   ({pt_bytes / 1e6:.2f} MB)")
        print(f"size ratio   .pt / compact      {pt_bytes / ours:10.1f}x   (with table: {pt_bytes / (ours + table_bytes):.1f}x)")
        print(f"epoch load, warm cache, same [B, T, D] output:  compact {t_ours:.3f} s   .pt {t_pt:.3f} s   "
              f"ratio {t_pt / t_ours:.1f}x")
        print(f"epoch load, warm cache, what training loads (ids, values, times; gather in the model): compact "
              f"{t_ids:.3f} s   ratio vs .pt {t_pt / t_ids:.1f}x")
        print(f"epoch load, cold cache (our files evicted), same output:  compact {cold_ours:.3f} s   .pt {cold_pt:.3f} s"
              f"   ratio {cold_pt / cold_ours:.1f}x")
        write_json(args.out, {"store": str(store_dir), "split": args.split, "sequences": len(store), "events": events,
                              "bytes_per_event": {"compact": ours / events, "compact_plus_table":
                                                  (ours + table_bytes) / events, "pt": pt_bytes / events},
                              "megabytes": {"compact": ours / 1e6, "table": table_bytes / 1e6, "pt": pt_bytes / 1e6},
                              "size_ratio_pt_over_compact": pt_bytes / ours,
                              "epoch_seconds": {"compact_same_output": t_ours, "compact_training_inputs": t_ids,
                                                "pt_warm": t_pt, "compact_cold": cold_ours, "pt_cold": cold_pt},
                              "speedup": {"training_inputs_vs_pt": t_pt / t_ids, "same_output_warm": t_pt / t_ours,
                                          "same_output_cold": cold_pt / cold_ours}})
        print(f"written: {args.out}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
