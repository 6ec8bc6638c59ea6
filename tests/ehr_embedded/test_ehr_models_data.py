"""Models (shapes, masking, causality, the original loading API, dimension checks) and batching."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from common.errors import UserError
from ehr_embedded.data import EventSequenceDataset, LengthBucketBatchSampler, collate, kept_indices
from ehr_embedded.models import TransformerDecoderEmbedded, TransformerEncoderEmbedded, build_model
from ehr_embedded.storage import load_dataset_table, open_split

CONFIG = {"type": "transformer_encoder_embedded", "embedding_dim": 384, "model_dim": 32, "n_heads": 4,
          "n_layers": 2, "dropout": 0.1, "max_length": 16, "num_classes": 2}


def random_batch(batch=3, length=10, dim=384, vocab=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    pad = torch.zeros(batch, length, dtype=torch.bool)
    pad[0, 6:] = True
    return {"token_ids": torch.randint(2, vocab, (batch, length), generator=g).masked_fill(pad, 0),
            "value_z": torch.randn(batch, length, generator=g), "has_value": (torch.rand(batch, length, generator=g)
                                                                               > 0.5).float(),
            "hours_since_prev": torch.rand(batch, length, generator=g) * 5,
            "hours_before_pred": torch.rand(batch, length, generator=g) * 50, "padding_mask": pad}


def test_original_loading_api_encoder():
    """The original's README snippet: config dict with embedding_dim, batch of embeddings + padding_mask."""
    torch.manual_seed(0)
    model = TransformerEncoderEmbedded(CONFIG).eval()
    embeddings = torch.randn(12, 384)
    padding_mask = torch.zeros(12, dtype=torch.bool)
    with torch.no_grad():
        logits = model({"embeddings": embeddings.unsqueeze(0), "padding_mask": padding_mask.unsqueeze(0)})
        # the same patient padded with garbage rows (padding_mask True) scores the same; other events score otherwise
        padded = torch.cat([embeddings, 100 * torch.randn(4, 384)]).unsqueeze(0)
        mask = torch.cat([padding_mask, torch.ones(4, dtype=torch.bool)]).unsqueeze(0)
        again = model({"embeddings": padded, "padding_mask": mask})
        other = model({"embeddings": torch.randn(1, 12, 384), "padding_mask": padding_mask.unsqueeze(0)})
    assert logits.shape == (1, 2)
    assert torch.allclose(logits, again, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(logits, other, rtol=1e-5, atol=1e-3)


def test_gather_by_token_id_equals_explicit_embeddings():
    torch.manual_seed(0)
    table = torch.randn(20, 384)
    model = TransformerEncoderEmbedded({**CONFIG, "embedding_dim": None}, code_embeddings=table).eval()
    batch = random_batch()
    explicit = {**batch, "embeddings": table[batch["token_ids"]]}
    with torch.no_grad():
        assert torch.allclose(model(batch), model(explicit), rtol=1e-5, atol=1e-6)
    # the table is a frozen, non-persistent buffer: not trained, not in checkpoints
    assert "event_embedding.code_embeddings" not in model.state_dict()
    assert all(p is not table for p in model.parameters())


def test_projection_reads_table_width_and_rejects_disagreement():
    small = TransformerEncoderEmbedded({**CONFIG, "embedding_dim": None}, code_embeddings=torch.randn(9, 24))
    assert small.event_embedding.projection.in_features == 24
    with pytest.raises(ValueError, match="768"):
        TransformerEncoderEmbedded({**CONFIG, "embedding_dim": 768}, code_embeddings=torch.randn(9, 384))
    with pytest.raises(UserError, match="embedding_dim"):
        build_model({**CONFIG, "embedding_dim": 768}, torch.randn(9, 384), lm_vocab_size=9)


def test_encoder_ignores_padding():
    torch.manual_seed(0)
    table = torch.randn(20, 384)
    model = TransformerEncoderEmbedded({**CONFIG, "embedding_dim": None}, code_embeddings=table).eval()
    batch = random_batch()
    changed = {k: v.clone() for k, v in batch.items()}
    changed["token_ids"][0, 6:] = 7  # contents under padding
    changed["value_z"][0, 6:] = 99.0
    with torch.no_grad():
        assert torch.allclose(model(batch), model(changed), rtol=1e-5, atol=1e-5)
        unpadded = {k: v[:1, :6] for k, v in batch.items()}
        assert torch.allclose(model(batch)[:1], model(unpadded), rtol=1e-5, atol=1e-5)


def test_decoder_is_causal_and_has_both_heads():
    torch.manual_seed(0)
    table = torch.randn(20, 384)
    config = {**CONFIG, "type": "transformer_decoder_embedded", "embedding_dim": None, "vocab_size": 15}
    model = TransformerDecoderEmbedded(config, code_embeddings=table).eval()
    batch = random_batch()
    later = {k: v.clone() for k, v in batch.items()}
    later["token_ids"][1, 7] = 3
    later["value_z"][1, 7] = 5.0
    with torch.no_grad():
        a, b = model(batch, task="autoregressive"), model(later, task="autoregressive")
        assert a.shape == (3, 10, 15)
        assert torch.allclose(a[1, :7], b[1, :7], rtol=1e-5, atol=1e-5)  # positions before 7 cannot see event 7
        assert not torch.allclose(a[1, 7:], b[1, 7:], rtol=1e-5, atol=1e-4)
        assert model(batch).shape == (3, 2)  # classification by default
        assert torch.allclose(model(batch)[0], model({k: v[:1, :6] for k, v in batch.items()})[0], rtol=1e-5, atol=1e-5)


def test_length_over_max_length_is_an_error():
    model = TransformerEncoderEmbedded(CONFIG)
    with pytest.raises(ValueError, match="max_length"):
        model({"embeddings": torch.randn(1, 17, 384)})


def test_bucket_sampler_is_a_seeded_permutation_per_epoch():
    lengths = np.random.default_rng(0).integers(1, 200, size=103)
    sampler = LengthBucketBatchSampler(lengths, batch_size=8, seed=3, pool_batches=4)
    sampler.set_epoch(1)
    first = sampler.batches()
    assert sorted(i for b in first for i in b) == list(range(103))
    assert first == sampler.batches()  # same epoch, same order (what resume relies on)
    sampler.set_epoch(2)
    assert first != sampler.batches()
    bucketed_pad = sum(len(b) * lengths[b].max() - lengths[b].sum() for b in first)
    random = LengthBucketBatchSampler(lengths, batch_size=8, seed=3, bucket=False)
    random.set_epoch(1)
    random_pad = sum(len(b) * lengths[b].max() - lengths[b].sum() for b in random.batches())
    assert bucketed_pad < random_pad / 2


def test_dataset_items_and_collate(built):
    table = load_dataset_table(built.store)
    store = open_split(built.store, "train")
    ds = EventSequenceDataset(store, table, max_length=8)
    item = ds[0]
    stored = np.asarray(store[0]["token_ids"])
    n_static = store[0]["n_static"]
    assert n_static == 1 and len(stored) > 8  # the sample's GENDER event is static
    # a model with a shorter max_length still sees the static events, then the most recent ones
    np.testing.assert_array_equal(item["token_ids"], np.concatenate([stored[:1], stored[-7:]]))
    assert item["hours_before_pred"][-1] == pytest.approx(store.hours_to_prediction[0])
    assert np.all(np.diff(item["hours_before_pred"]) <= 1e-4)  # later events are closer to prediction_time
    assert set(np.unique(item["has_value"])) <= {0.0, 1.0}
    assert np.all(np.abs(item["value_z"]) <= 10)
    batch = collate([ds[0], ds[1]], pad_to=12)
    assert batch["token_ids"].shape == (2, 12)
    assert batch["padding_mask"].sum(1).tolist() == [12 - len(ds[0]["token_ids"]), 12 - len(ds[1]["token_ids"])]
    assert (batch["token_ids"][batch["padding_mask"]] == 0).all()


def test_kept_indices_keep_static_then_recent():
    assert kept_indices(5, 2, 10).tolist() == [0, 1, 2, 3, 4]
    assert kept_indices(10, 2, 5).tolist() == [0, 1, 7, 8, 9]
    assert kept_indices(10, 0, 3).tolist() == [7, 8, 9]
    assert kept_indices(10, 6, 4).tolist() == [0, 1, 2, 3]
    assert kept_indices(10, 2, None).tolist() == list(range(10))
