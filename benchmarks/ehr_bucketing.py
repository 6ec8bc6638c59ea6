"""Padding-aware batching: training sequences/s with length buckets against padding every batch to max_length
(the original's behaviour) and against random batches padded to their longest sequence.

    python benchmarks/ehr_bucketing.py                       # MIMIC-IV demo store if built, else sample data
    python benchmarks/ehr_bucketing.py --store runs/ehr_embedded/mimic/long_stay --max-length 512 --epochs 1
    python benchmarks/ehr_bucketing.py --synthetic-lengths 400        # long-tailed lengths, same code table

Same encoder, same sequences, same number of optimizer steps; each mode runs forward + backward + AdamW step over
`--epochs` full epochs of the train split. Also prints the fraction of padded positions each mode computes on.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.io import write_json  # noqa: E402
from ehr_embedded.data import EventSequenceDataset, make_loader  # noqa: E402
from ehr_embedded.models import build_model  # noqa: E402
from ehr_embedded.storage import SequenceStore, load_dataset_table, open_split, write_split  # noqa: E402

MIMIC_STORE = Path("runs/ehr_embedded/mimic/long_stay")
MODES = {"length buckets": {"bucket": True, "pad_to_max": False},
         "random, pad to longest": {"bucket": False, "pad_to_max": False},
         "pad to max_length (original)": {"bucket": False, "pad_to_max": True}}


def synthetic_store(directory: Path, table, n: int, max_length: int) -> SequenceStore:
    """`n` sequences of random training-vocabulary rows with log-normal lengths (median ~60, capped at max_length),
    the long-tailed shape of event counts per patient."""
    rng = np.random.default_rng(0)
    lengths = np.clip(rng.lognormal(mean=np.log(60), sigma=1.0, size=n).astype(int), 5, max_length)
    ids = [rng.integers(2, table.lm_vocab_size, size=k).astype(np.int32) for k in lengths]
    seqs = pd.DataFrame({"subject_id": np.arange(n), "prediction_time": pd.Timestamp("2020-01-01"),
                         "label": rng.integers(0, 2, size=n), "n_events_before_cut": lengths,
                         "hours_last_event_to_prediction": np.ones(n, np.float32)})
    write_split(directory, seqs, ids, [np.full(k, np.nan, np.float32) for k in lengths],
                [np.ones(k, np.float32) for k in lengths])
    return SequenceStore(directory)


def run_mode(dataset, table, max_length: int, batch_size: int, epochs: int, bucket: bool, pad_to_max: bool):
    torch.manual_seed(0)
    model = build_model({"type": "transformer_encoder_embedded", "model_dim": 64, "n_heads": 4, "n_layers": 2,
                         "dropout": 0.1, "max_length": max_length, "num_classes": 2},
                        torch.from_numpy(np.asarray(table.embeddings, np.float32)), table.lm_vocab_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loader = make_loader(dataset, batch_size, shuffle=True, seed=0, bucket=bucket,
                         pad_to=max_length if pad_to_max else None)
    warm = next(iter(loader))  # one untimed step: first-call allocations should not count against a mode
    torch.nn.functional.cross_entropy(model(warm), warm["labels"]).backward()
    seen, positions, real = 0, 0, 0
    started = time.perf_counter()
    for epoch in range(epochs):
        loader.batch_sampler.set_epoch(epoch)
        for batch in loader:
            loss = torch.nn.functional.cross_entropy(model(batch), batch["labels"])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            seen += len(batch["labels"])
            positions += batch["padding_mask"].numel()
            real += int((~batch["padding_mask"]).sum())
    return seen / (time.perf_counter() - started), 1 - real / positions


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", type=Path, default=None)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--synthetic-lengths", type=int, default=0, metavar="N",
                        help="replace the train split by N sequences with log-normal lengths (the table stays real)")
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON written with the results (default runs/ehr_embedded/benchmarks/ehr_bucketing"
                             "[_synthetic].json)")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    store_dir = args.store or MIMIC_STORE
    if not (store_dir / "train").is_dir():
        raise SystemExit(f"{store_dir}: no store; build it with create_embeddings (see ehr_embedded/README.md)")
    table = load_dataset_table(store_dir)
    store = open_split(store_dir, "train")
    if args.synthetic_lengths:
        work = tempfile.TemporaryDirectory(prefix="ehr_bucketing_")  # removed when the process ends
        store = synthetic_store(Path(work.name) / "train", table, args.synthetic_lengths, args.max_length)
        print(f"synthetic store: {args.synthetic_lengths} sequences of real code-table rows, log-normal lengths")
    dataset = EventSequenceDataset(store, table, args.max_length)
    lengths = dataset.lengths
    print(f"{store_dir} train: {len(dataset)} sequences, length min/median/max {lengths.min()}/"
          f"{int(np.median(lengths))}/{lengths.max()}, max_length {args.max_length}, batch {args.batch_size}, "
          f"{args.threads} thread(s)")
    results, padding = {}, {}
    for name, mode in MODES.items():
        rate, pad = run_mode(dataset, table, args.max_length, args.batch_size, args.epochs, **mode)
        results[name], padding[name] = rate, pad
        print(f"{name:32s} {rate:8.1f} sequences/s   padded positions {100 * pad:5.1f}%")
    base = results["pad to max_length (original)"]
    print(f"speed-up of length buckets: {results['length buckets'] / base:.2f}x vs pad to max_length, "
          f"{results['length buckets'] / results['random, pad to longest']:.2f}x vs random batches")
    out = args.out or Path("runs/ehr_embedded/benchmarks/ehr_bucketing"
                           f"{'_synthetic' if args.synthetic_lengths else ''}.json")
    write_json(out, {"store": str(store_dir), "synthetic_lengths": args.synthetic_lengths,
                     "max_length": args.max_length, "batch_size": args.batch_size, "threads": args.threads,
                     "sequences_per_second": results, "padded_fraction": padding,
                     "speedup_vs_pad_to_max_length": results["length buckets"] / base})
    print(f"written: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
