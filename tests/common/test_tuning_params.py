"""common.tuning.apply_params: a trial's dotted parameters onto a dataclass config, re-validated, on a deep copy."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from common.errors import UserError
from common.tuning import apply_params


@dataclass
class Model:
    dim: int = 8
    heads: int = 2

    def __post_init__(self) -> None:
        if self.dim % self.heads:
            raise ValueError(f"model.dim {self.dim} is not divisible by model.heads {self.heads}")


@dataclass
class Run:
    name: str = "run"
    tags: list[str] = field(default_factory=list)


@dataclass
class Config:
    model: Model = field(default_factory=Model)
    global_: Run = field(default_factory=Run)


def test_parameters_are_set_on_a_copy_that_shares_nothing_with_the_original():
    cfg = Config()
    out = apply_params(cfg, {"model.dim": 12, "model.heads": 3}, "toy")
    assert (out.model.dim, out.model.heads) == (12, 3)
    assert (cfg.model.dim, cfg.model.heads) == (8, 2)
    out.global_.name = "trial_0001"  # callers set per-trial fields on untouched sections
    out.global_.tags.append("x")
    assert cfg.global_.name == "run" and cfg.global_.tags == []


def test_a_section_name_can_map_to_another_attribute():
    out = apply_params(Config(), {"global.name": "b"}, "toy", attribute=lambda s: "global_" if s == "global" else s)
    assert out.global_.name == "b"


def test_unknown_keys_and_refused_values_are_user_errors():
    with pytest.raises(UserError, match="'model.depth' is not a toy config key"):
        apply_params(Config(), {"model.depth": 3}, "toy")
    with pytest.raises(UserError, match="'nope.dim' is not a toy config key"):
        apply_params(Config(), {"nope.dim": 3}, "toy")
    # the section's own validation runs again on the new values
    with pytest.raises(UserError, match="model.dim 9 is not divisible by model.heads 2"):
        apply_params(Config(), {"model.dim": 9}, "toy")
