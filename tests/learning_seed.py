"""How a learning test takes the suite's learning seed (the `learning_seed` fixture in tests/conftest.py).

    from learning_seed import seed_args
    args = [*base_args, *seed_args("train.seed", learning_seed)]
"""

from __future__ import annotations


def seed_args(key: str, seed: int | None) -> list[str]:
    """`[f"{key}={seed}"]`, or `[]` when seed is None (the test's own seed stands)."""
    return [] if seed is None else [f"{key}={seed}"]
