"""One epoch over 75,000 x (768 + 1027) samples: in-memory index batching (price_fusion) vs a per-item
`Dataset` + `DataLoader` (the named baseline), side by side in one process, same model, same batch size.

    python benchmarks/price_fusion_epoch.py                  # 75k samples, data-only and full training epochs
    python benchmarks/price_fusion_epoch.py --n 5000 --threads 1

Prints the table and writes it to --out (default runs/benchmarks/price_fusion_epoch.json).

Two measurements, each the best of --repeats:
  data   : produce every batch of an epoch (shuffled), no model: the cost the batching design removes;
  train  : a full training epoch (forward, backward, AdamW step) of TwoBranchFusionModel at the original sizes.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from common.io import write_json
from price_fusion.batching import FusionTensors, epoch_batches
from price_fusion.model import TwoBranchFusionModel

REPO = Path(__file__).resolve().parents[1]
IMAGE_DIM, TEXT_DIM, STRUCT_DIM = 768, 1024, 3


class PerItemDataset(Dataset):
    """The baseline: one product per __getitem__, converted to tensors there, stacked by the default collate."""

    def __init__(self, image: np.ndarray, has_image: np.ndarray, text: np.ndarray, struct: np.ndarray, log_price: np.ndarray):
        self.image, self.has_image, self.text, self.struct, self.log_price = image, has_image, text, struct, log_price

    def __len__(self) -> int:
        return len(self.log_price)

    def __getitem__(self, i: int):
        return (torch.from_numpy(self.image[i]), torch.tensor(self.has_image[i]), torch.from_numpy(self.text[i]),
                torch.from_numpy(self.struct[i]), torch.tensor(self.log_price[i]))


def make_arrays(n: int, seed: int = 0) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((n, IMAGE_DIM), dtype=np.float32), np.ones(n, dtype=bool),
            rng.standard_normal((n, TEXT_DIM), dtype=np.float32), rng.standard_normal((n, STRUCT_DIM), dtype=np.float32),
            rng.normal(3.0, 1.0, n).astype(np.float32))


def tensor_batches(data: FusionTensors, batch_size: int, epoch: int):
    for rows in epoch_batches(len(data), batch_size, seed=0, epoch=epoch):
        yield (*data.inputs(rows), data.target(rows))


def loader_batches(loader: DataLoader, epoch: int):
    torch.manual_seed(epoch)
    yield from loader


def run_epoch(batches, model=None, optimizer=None) -> int:
    n = 0
    for image, has_image, text, struct, target in batches:
        if model is not None:
            loss = torch.nn.functional.l1_loss(model(image, has_image, text, struct), target)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        n += len(target)
    return n


def best_time(fn, repeats: int) -> float:
    times = []
    for r in range(repeats):
        start = time.perf_counter()
        fn(r)
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=75_000)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--skip-train", action="store_true", help="only the data-only comparison")
    parser.add_argument("--out", default=str(REPO / "runs" / "benchmarks" / "price_fusion_epoch.json"))
    args = parser.parse_args()
    report = {"n": args.n, "batch_size": args.batch_size, "threads": args.threads, "repeats": args.repeats}
    torch.set_num_threads(args.threads)
    image, has_image, text, struct, log_price = make_arrays(args.n)
    data = FusionTensors(np.arange(args.n).astype(str), torch.from_numpy(image), torch.from_numpy(has_image),
                         torch.from_numpy(text), torch.from_numpy(struct), torch.from_numpy(log_price))
    loader = DataLoader(PerItemDataset(image, has_image, text, struct, log_price), batch_size=args.batch_size, shuffle=True)
    print(f"{args.n} samples x ({IMAGE_DIM} + {TEXT_DIM} + {STRUCT_DIM}), batch {args.batch_size}, "
          f"{args.threads} torch thread(s)")

    ours = best_time(lambda r: run_epoch(tensor_batches(data, args.batch_size, r)), args.repeats)
    base = best_time(lambda r: run_epoch(loader_batches(loader, r)), args.repeats)
    print(f"data only   in-memory batching {ours:8.3f} s   Dataset+DataLoader {base:8.3f} s   "
          f"speed-up {base / ours:6.1f}x")
    report["data_only_s"] = {"in_memory": ours, "dataloader": base, "speedup": base / ours}
    if not args.skip_train:
        report["train_epoch_s"] = train_epochs(data, loader, args.batch_size)
    write_json(args.out, report)
    print(f"-> {args.out}")


def train_epochs(data: FusionTensors, loader: DataLoader, batch_size: int) -> dict:
    """One full training epoch (forward, backward, AdamW) of the original-size model, each way."""
    results = {}
    for name, make in (("in-memory batching", lambda r: tensor_batches(data, batch_size, r)),
                       ("Dataset+DataLoader", lambda r: loader_batches(loader, r))):
        torch.manual_seed(0)
        model = TwoBranchFusionModel(IMAGE_DIM, TEXT_DIM, STRUCT_DIM)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        results[name] = best_time(lambda r, m=model, o=optimizer, mk=make: run_epoch(mk(r), m, o), 1)
    ours, base = results["in-memory batching"], results["Dataset+DataLoader"]
    print(f"train epoch in-memory batching {ours:8.3f} s   Dataset+DataLoader {base:8.3f} s   "
          f"speed-up {base / ours:6.2f}x")
    return {"in_memory": ours, "dataloader": base, "speedup": base / ours}


if __name__ == "__main__":
    main()
