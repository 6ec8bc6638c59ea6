"""Unit tests of the trainer's parts: the UCB1 bandit, the panorama-excluding retrieval protocol, P x K batches."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from building_embed.train.bandit import UCB1Bandit, learning_progress
from building_embed.train.data import BandNegatives, IdentityIndex, anchor_schedule, pk_batch
from building_embed.train.retrieval import retrieval_metrics

torch.set_num_threads(1)


def test_bandit_pulls_the_band_with_the_higher_reward_most():
    rng = np.random.default_rng(0)
    success = [0.2, 0.7, 0.4]  # Bernoulli reward of each band
    bandit = UCB1Bandit(3, exploration=1.0)
    for _ in range(3000):
        arm = bandit.select()
        bandit.update(arm, float(rng.random() < success[arm]))
    assert bandit.counts[1] > 0.75 * 3000, bandit.counts
    assert bandit.counts[1] > bandit.counts[2] > bandit.counts[0]
    assert abs(bandit.means()[1] - 0.7) < 0.03


def test_bandit_tries_every_band_first_and_its_state_round_trips():
    bandit = UCB1Bandit(3, exploration=0.1)
    first = []
    for reward in (0.1, 0.5, 0.2):
        first.append(bandit.select())
        bandit.update(first[-1], reward)
    assert first == [0, 1, 2]
    assert bandit.select() == 1
    copy = UCB1Bandit(3, exploration=0.1)
    copy.load_state_dict(bandit.state_dict())
    for reward in (0.0, 0.3, 0.9, 0.1):
        a, b = bandit.select(), copy.select()
        assert a == b
        bandit.update(a, reward)
        copy.update(b, reward)
    assert copy.state_dict() == bandit.state_dict()  # bit-exact: the same updates in the same order on both
    with pytest.raises(ValueError, match="3 arms, this run has 2"):
        UCB1Bandit(2).load_state_dict(bandit.state_dict())


def test_learning_progress_is_the_clipped_relative_loss_decrease():
    assert learning_progress(0.5, 0.4) == pytest.approx(0.2)
    # exact: clipped to the bounds 0 and 1
    assert learning_progress(0.5, 0.6) == 0.0
    assert learning_progress(0.0, 0.0) == 0.0
    assert learning_progress(1.0, -1.0) == 1.0


# Identity A: images 0, 1 (one panorama) and 2 (another); identity B: images 3, 4 (two panoramas).
HAND_EMBEDDINGS = torch.tensor([[1.0, 0.0], [1.0, 0.01], [0.0, 1.0], [0.9, 0.5], [0.8, 0.6]])
HAND_IDENTITY = np.array([0, 0, 0, 1, 1])


def test_protocol_leaves_the_query_panorama_out_of_the_gallery():
    scores = retrieval_metrics(HAND_EMBEDDINGS, HAND_IDENTITY, np.array([0, 0, 1, 2, 3]))
    # Queries 0 and 1 may not use each other (same panorama): their nearest gallery image is B's image 3, a miss;
    # query 2's nearest is image 4 (B), a miss; B's two images find each other. recall@1 = 2 / 5, and with one or two
    # relevant images each, mAP@R = (0 + 0 + 0 + 1 + 1) / 5.
    assert scores["queries"] == 5 and scores["lone_queries"] == 0
    assert scores["recall@1"] == pytest.approx(0.4)
    assert scores["precision@1"] == pytest.approx(0.4)
    assert scores["map@r"] == pytest.approx(0.4)
    assert scores["recall@5"] == pytest.approx(1.0)
    # The same images with a panorama each: queries 0 and 1 now find each other (recall@1 4 / 5).
    assert retrieval_metrics(HAND_EMBEDDINGS, HAND_IDENTITY, np.arange(5))["recall@1"] == pytest.approx(0.8)


def test_a_query_with_only_same_panorama_positives_is_lone():
    scores = retrieval_metrics(HAND_EMBEDDINGS[[0, 1, 3, 4]], np.array([0, 0, 1, 1]), np.array([0, 0, 2, 3]))
    assert scores["queries"] == 2 and scores["lone_queries"] == 2
    assert scores["recall@1"] == pytest.approx(1.0) and scores["map@r"] == pytest.approx(1.0)


def test_pk_batch_takes_its_negatives_from_the_chosen_band():
    identity = np.repeat(np.arange(10), 3)  # 10 identities x 3 images
    index = IdentityIndex(identity)
    by_band = [[np.array([(i + 1) % 10]) for i in range(10)],  # band 0: the next identity
               [np.array([(i + 5) % 10, (i + 6) % 10]) for i in range(10)],
               [np.empty(0, np.int64) for _ in range(10)]]  # band 2: nothing (rank past neighbors_k)
    negatives = BandNegatives(by_band, n_bands=3)
    rng = np.random.default_rng(0)
    rows = pk_batch(index, negatives, 0, np.array([0, 2]), n_negative=2, views=4, rng=rng)
    ids = identity[rows].reshape(4, 4)
    assert (ids == ids[:, :1]).all()  # K views of one identity per block
    assert ids[:2, 0].tolist() == [0, 2] and sorted(ids[2:, 0].tolist()) == [1, 3]  # band 0 of 0 and 2
    rows = pk_batch(index, negatives, 1, np.array([0]), n_negative=2, views=2, rng=rng)
    assert set(identity[rows][2:].tolist()) == {5, 6}
    rows = pk_batch(index, negatives, 2, np.array([0]), n_negative=3, views=2, rng=rng)  # empty band: random fill
    assert len(set(identity[rows][2:].tolist()) - {0}) == 3
    schedule = anchor_schedule(index, 3, 4, seed=1, epoch=1)
    assert sorted(np.concatenate(schedule)[:10].tolist()) == list(range(10))  # every identity anchors once per pass
    assert [a.tolist() for a in schedule] == [a.tolist() for a in anchor_schedule(index, 3, 4, seed=1, epoch=1)]
