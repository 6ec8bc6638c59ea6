"""UCB1 over difficulty bands: which band the negatives of the next batch come from.

    bandit = UCB1Bandit(n_arms=3, exploration=1.0)
    band = bandit.select()            # every arm once, then argmax mean + c * sqrt(2 ln t / n_arm)
    bandit.update(band, reward)       # reward in [0, 1]
    state = bandit.state_dict()       # lists of ints / floats: part of the resumable train state

The reward the trainer feeds it is learning progress (see `learning_progress`): how much one optimizer step on a batch
lowered that batch's own triplet loss, relative to the loss before the step. A band whose triplets are all satisfied
(too easy) or that the head cannot improve on (noise) earns little; a band the head is learning from earns most.
"""

from __future__ import annotations

import math
from typing import Any


class UCB1Bandit:
    """UCB1 (Auer et al., 2002) with an exploration constant. Deterministic: ties go to the lowest arm."""

    def __init__(self, n_arms: int, exploration: float = 1.0) -> None:
        if n_arms < 1:
            raise ValueError(f"n_arms must be >= 1, got {n_arms}")
        self.exploration = exploration
        self.counts = [0] * n_arms
        self.reward_sums = [0.0] * n_arms

    @property
    def n_arms(self) -> int:
        return len(self.counts)

    @property
    def total(self) -> int:
        return sum(self.counts)

    def scores(self) -> list[float]:
        """Upper confidence bound of each arm (inf for an arm never pulled)."""
        log_t = math.log(max(self.total, 1))
        return [math.inf if n == 0 else s / n + self.exploration * math.sqrt(2.0 * log_t / n)
                for n, s in zip(self.counts, self.reward_sums)]

    def select(self) -> int:
        scores = self.scores()
        return max(range(self.n_arms), key=lambda arm: (scores[arm], -arm))

    def update(self, arm: int, reward: float) -> None:
        self.counts[arm] += 1
        self.reward_sums[arm] += float(reward)

    def means(self) -> list[float | None]:
        return [s / n if n else None for n, s in zip(self.counts, self.reward_sums)]

    def state_dict(self) -> dict[str, Any]:
        return {"counts": list(self.counts), "reward_sums": list(self.reward_sums), "exploration": self.exploration}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if len(state["counts"]) != self.n_arms:
            raise ValueError(f"bandit state has {len(state['counts'])} arms, this run has {self.n_arms}")
        self.counts = [int(n) for n in state["counts"]]
        self.reward_sums = [float(s) for s in state["reward_sums"]]


def learning_progress(loss_before: float, loss_after: float) -> float:
    """Reward in [0, 1]: (loss_before - loss_after) / loss_before, clipped; 0 when the batch had no loss left."""
    if loss_before <= 1e-12:
        return 0.0
    return min(1.0, max(0.0, (loss_before - loss_after) / loss_before))
