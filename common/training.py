"""Small training building blocks: early stopping, cosine-with-warmup schedule, parameter groups."""

from __future__ import annotations

import math
from typing import Any

from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


class EarlyStopping:
    """Stop after `patience` evaluations without an improvement larger than `min_delta`.

    `step(value)` returns True when `value` is a new best. State round-trips through `state_dict()`, so a resumed
    run counts patience exactly as the uninterrupted one.
    """

    def __init__(self, patience: int, mode: str = "min", min_delta: float = 0.0) -> None:
        if mode not in ("min", "max"):
            raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
        if patience < 1:
            raise ValueError(f"patience must be >= 1, got {patience}")
        self.patience = patience
        self.mode = mode
        self.min_delta = min_delta
        self.best: float | None = None
        self.bad_epochs = 0

    def is_improvement(self, value: float) -> bool:
        if self.best is None:
            return not math.isnan(value)
        if self.mode == "min":
            return value < self.best - self.min_delta
        return value > self.best + self.min_delta

    def step(self, value: float) -> bool:
        value = float(value)
        if self.is_improvement(value):
            self.best = value
            self.bad_epochs = 0
            return True
        self.bad_epochs += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.bad_epochs >= self.patience

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "bad_epochs": self.bad_epochs, "patience": self.patience, "mode": self.mode}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best = state["best"]
        self.bad_epochs = int(state["bad_epochs"])


def cosine_with_warmup(optimizer: Optimizer, warmup_steps: int, total_steps: int,
                       min_lr_ratio: float = 0.0) -> LambdaLR:
    """Linear warmup then cosine decay to `min_lr_ratio * base_lr`; call `.step()` once per optimizer step.

    lr multiplier: linear 0 -> 1 over `warmup_steps`, then cosine 1 -> `min_lr_ratio` at `total_steps`. The multiplier
    is a plain function on purpose: LambdaLR's state_dict then records only the step count, so a resumed run follows
    the schedule of *its* config. Raising the epochs of a finished run stretches the schedule to the new length
    instead of continuing at the old final lr (every other setting is pinned by the resume fingerprint).
    """
    if total_steps < 1 or warmup_steps < 0 or warmup_steps > total_steps:
        raise ValueError(f"need 0 <= warmup_steps ({warmup_steps}) <= total_steps ({total_steps}) and total >= 1")

    def multiplier(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        span = max(1, total_steps - warmup_steps)
        progress = min(1.0, (step - warmup_steps) / span)
        return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return LambdaLR(optimizer, multiplier)


_NO_DECAY_TYPES = (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.Embedding)


def param_groups(model: nn.Module, weight_decay: float, base_lr: float,
                 lr_mults: dict[str, float] | None = None) -> list[dict[str, Any]]:
    """Optimizer parameter groups: no weight decay on biases, norms and embeddings; lr multipliers by name prefix.

    `lr_mults={"encoder": 0.1}` trains parameters whose name starts with `encoder` at `0.1 * base_lr`; the longest
    matching prefix wins. Frozen parameters (`requires_grad=False`) are left out.
    """
    lr_mults = lr_mults or {}
    no_decay_names = set()
    for module_name, module in model.named_modules():
        for pname, _ in module.named_parameters(recurse=False):
            full = f"{module_name}.{pname}" if module_name else pname
            if pname.endswith("bias") or isinstance(module, _NO_DECAY_TYPES):
                no_decay_names.add(full)
    groups: dict[tuple[float, bool], list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        matches = [p for p in lr_mults if name == p or name.startswith(p + ".")]
        mult = lr_mults[max(matches, key=len)] if matches else 1.0
        groups.setdefault((mult, name in no_decay_names), []).append(param)
    return [{"params": params, "lr": base_lr * mult, "weight_decay": 0.0 if no_decay else weight_decay,
             "lr_mult": mult}
            for (mult, no_decay), params in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1]))]
