"""A toy training run built only from `common`, used by the kill-and-resume and torchrun tests.

    python tests/common/toy_train.py --config toy.yaml run_dir=/tmp/toy epochs=12

Dropout, shuffling and AdamW make the result depend on every piece of state a resume must restore.
Setting TOY_SLOW_CHECKPOINT=<seconds> sleeps inside each checkpoint write (after the weights, before the
training state) and first touches `<run_dir>/writing_epoch_<N>`, so a test can kill the process mid-write.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from common import checkpoint as ckpt_mod  # noqa: E402
from common.checkpoint import CheckpointManager, capture_train_state, resume_from_checkpoint  # noqa: E402
from common.cli import config_main  # noqa: E402
from common.config import to_dict  # noqa: E402
from common.distributed import (  # noqa: E402
    all_reduce_mean,
    cleanup_distributed,
    distributed_sampler,
    setup_distributed,
    wrap_ddp,
)
from common.fingerprint import make_fingerprint  # noqa: E402
from common.logs import MetricsWriter  # noqa: E402
from common.runs import open_run  # noqa: E402
from common.seed import seed_everything  # noqa: E402
from common.training import EarlyStopping, cosine_with_warmup, param_groups  # noqa: E402


@dataclasses.dataclass
class ToyConfig:
    run_dir: str = "runs/toy"
    epochs: int = 12
    batch_size: int = 16
    lr: float = 0.01
    seed: int = 7
    resume: str | bool = "auto"
    every_n_epochs: int = 3
    patience: int = 100
    epoch_sleep: float = 0.0


def toy_data(n: int = 256) -> torch.utils.data.TensorDataset:
    gen = torch.Generator().manual_seed(123)
    x = torch.randn(n, 8, generator=gen)
    y = (x[:, :4].sum(1, keepdim=True) - x[:, 4:].prod(1, keepdim=True)).tanh()
    return torch.utils.data.TensorDataset(x, y)


def build_model() -> nn.Module:
    return nn.Sequential(nn.Linear(8, 32), nn.LayerNorm(32), nn.ReLU(), nn.Dropout(0.2), nn.Linear(32, 1))


def _slow_checkpoints(run_dir: Path, delay: float) -> None:
    original = ckpt_mod.save_file

    def slow_save_file(tensors, filename, *args, **kwargs):  # type: ignore[no-untyped-def]
        original(tensors, filename, *args, **kwargs)
        marker = run_dir / f"writing_{Path(filename).parent.name}"
        marker.touch()
        time.sleep(delay)
        marker.unlink()

    ckpt_mod.save_file = slow_save_file


def train(cfg: ToyConfig) -> int:
    torch.set_num_threads(1)
    info = setup_distributed()
    run_dir = Path(cfg.run_dir)
    if os.environ.get("TOY_SLOW_CHECKPOINT"):
        _slow_checkpoints(run_dir, float(os.environ["TOY_SLOW_CHECKPOINT"]))
    seed_everything(cfg.seed)
    model = build_model()
    dataset = toy_data()
    sampler = distributed_sampler(dataset, shuffle=True, seed=cfg.seed)
    loader = torch.utils.data.DataLoader(dataset, batch_size=cfg.batch_size, sampler=sampler)
    ddp_model = wrap_ddp(model, info)
    optimizer = torch.optim.AdamW(param_groups(model, weight_decay=0.01, base_lr=cfg.lr))
    scheduler = cosine_with_warmup(optimizer, warmup_steps=5, total_steps=cfg.epochs * len(loader))
    stopper = EarlyStopping(patience=cfg.patience, mode="min")
    fingerprint = make_fingerprint(to_dict(cfg), volatile=["epoch_sleep", "every_n_epochs"])
    start = open_run(run_dir, cfg, resume=cfg.resume, checkpoint_dirs=[run_dir / "checkpoints"],
                     fingerprint=fingerprint, is_main=info.is_main)
    manager = CheckpointManager(run_dir / "checkpoints", keep_last_n=2, every_n_epochs=cfg.every_n_epochs,
                                fingerprint=start.fingerprint)
    resumed = resume_from_checkpoint(manager, start.resume, model, optimizer, scheduler, stopper)
    start_epoch = resumed["epoch"] + 1 if resumed else 0
    metrics = MetricsWriter(run_dir / "metrics.jsonl", resume_epoch=resumed["epoch"] if resumed else None,
                            first_epoch=0)
    for epoch in range(start_epoch, cfg.epochs):
        sampler.set_epoch(epoch)
        ddp_model.train()
        total = 0.0
        for b, (x, y) in enumerate(loader):
            loss = nn.functional.mse_loss(ddp_model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
            step_loss = loss.item()
            total += step_loss
            metrics.step(epoch, b, len(loader), {"train_loss": step_loss, "lr": scheduler.get_last_lr()[0]})
        mean_loss = float(all_reduce_mean(total / len(loader)))
        improved = stopper.step(mean_loss)
        metrics.write({"epoch": epoch, "loss": mean_loss})
        manager.save(model, capture_train_state(epoch, optimizer, scheduler, stopper), epoch=epoch, is_best=improved)
        time.sleep(cfg.epoch_sleep)
        if stopper.should_stop:
            break
    metrics.close()
    cleanup_distributed()
    return 0


main = config_main(ToyConfig, train, __doc__)

if __name__ == "__main__":
    sys.exit(main())
