"""The embedding store, id alignment, the original's import formats, and the embed stage's output."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pandas as pd
import pytest

from common.errors import UserError
from price_fusion import embed
from price_fusion.embedding_store import (
    align_to_ids,
    import_clip_dir,
    import_qwen_pickle,
    load_embeddings,
    write_embeddings,
)


def _write(tmp_path, n=4, name="train"):
    rng = np.random.default_rng(0)
    ids = np.array([f"id{i}" for i in range(n)])
    out = write_embeddings(tmp_path / name, ids, rng.normal(size=(n, 5)), np.arange(n) % 2 == 0,
                           rng.normal(size=(n, 7)), rng.normal(size=(n, 3)), {"text_encoder": {"name": "t"}})
    return out, ids


def test_round_trip_is_memory_mapped_and_leaves_no_temporary_files(tmp_path):
    out, ids = _write(tmp_path)
    emb = load_embeddings(out)
    assert isinstance(emb.text, np.memmap) and emb.text.dtype == np.float32
    assert emb.sample_ids.tolist() == ids.tolist() and emb.image_dim == 5 and emb.text_dim == 7
    assert emb.manifest["n_missing_images"] == 2 and emb.manifest["text_encoder"]["name"] == "t"
    _write(tmp_path)  # overwrite in place
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train"]


def test_alignment_reorders_by_id_and_names_missing_ids(tmp_path):
    out, ids = _write(tmp_path)
    emb = load_embeddings(out)
    rows = align_to_ids(emb, np.array(["id3", "id0"]), "train.csv")
    assert rows.tolist() == [3, 0]
    with pytest.raises(UserError, match=r"1 of 2 sample ids have no embedding, first \['zzz'\]"):
        align_to_ids(emb, np.array(["id1", "zzz"]), "train.csv")


def test_store_written_before_the_has_image_rename_still_loads(tmp_path):
    out, _ = _write(tmp_path)
    written = np.load(out / "has_image.npy")
    (out / "has_image.npy").rename(out / "image_mask.npy")  # the format-1 file name
    np.testing.assert_array_equal(load_embeddings(out).has_image, written)
    assert not written.all() and written.any()  # both values present, so a wrong file would show


def test_truncated_store_is_reported(tmp_path):
    out, _ = _write(tmp_path)
    np.save(out / "text.npy", np.zeros((2, 7), dtype=np.float32))
    with pytest.raises(UserError, match="text.npy: 2 rows but manifest.json says 4"):
        load_embeddings(out)
    with pytest.raises(UserError, match="no manifest.json"):
        load_embeddings(tmp_path / "absent")


def test_original_formats_import(tmp_path):
    per_item = tmp_path / "clip_items"
    per_item.mkdir()
    for sid in ("7", "3"):
        np.save(per_item / f"{sid}.npy", np.full(4, float(sid), dtype=np.float32))
    ids, vectors = import_clip_dir(per_item)
    assert ids.tolist() == ["3", "7"] and vectors[:, 0].tolist() == [3.0, 7.0]  # written, read back: exact
    stacked = tmp_path / "clip_stacked"
    stacked.mkdir()
    np.save(stacked / "embeddings.npy", np.eye(2, dtype=np.float32))
    (stacked / "sample_ids.txt").write_text("a\nb\n")
    assert import_clip_dir(stacked)[0].tolist() == ["a", "b"]
    for obj in ({"x": np.ones(5), "y": np.zeros(5)}, {"sample_ids": ["x", "y"], "embeddings": np.ones((2, 5))},
                pd.DataFrame({"sample_id": ["x", "y"], "embedding": [np.ones(5), np.ones(5)]})):
        with open(tmp_path / "q.pkl", "wb") as fh:
            pickle.dump(obj, fh)
        ids, vectors = import_qwen_pickle(tmp_path / "q.pkl")
        assert ids.tolist() == ["x", "y"] and vectors.shape == (2, 5)


def test_embed_stage_output(sample_env):
    train = load_embeddings(sample_env["embeddings"] / "train")
    csv = pd.read_csv(sample_env["train_csv"], dtype={"sample_id": str})
    assert train.sample_ids.tolist() == csv.sample_id.tolist()
    # data.structural=quantities (the default): 13 quantity columns + one column per unit of the vocabulary (4)
    assert train.image_dim == 16 and train.text_dim == 384 and train.struct.shape[1] == 13 + 4
    # products whose PNG was never drawn are masked, with zero vectors, and counted in the manifest
    drawn = np.array([(sample_env["image_dir"] / f"{sid}.png").is_file() for sid in csv.sample_id])
    assert (~drawn).sum() > 0 and np.array_equal(train.has_image, drawn)
    assert np.all(train.image[~drawn] == 0) and train.manifest["image_encoder"]["n_absent"] == (~drawn).sum()
    vocab = json.loads((sample_env["embeddings"] / "unit_vocab.json").read_text())["units"]
    assert set(vocab[1:]) == {"ounce", "fl oz", "count"}
    test = load_embeddings(sample_env["embeddings"] / "test")
    assert len(test) == 60 and test.manifest["unit_vocab_size"] == len(vocab)


def test_corrupt_image_is_masked_not_a_crash(sample_env, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    (images / "a.png").write_bytes(b"not a png")
    from PIL import Image

    Image.new("RGB", (32, 32), (10, 200, 30)).save(images / "b.png")
    vectors, mask, info = embed.encode_images([images / "a.png", images / "b.png", None],
                                              str(sample_env["clip_model"]), batch_size=2)
    assert mask.tolist() == [False, True, False] and info["n_unreadable"] == 1 and info["n_absent"] == 1
    assert np.all(vectors[0] == 0) and np.all(vectors[2] == 0)
    alone, _, _ = embed.encode_images([images / "b.png"], str(sample_env["clip_model"]), batch_size=2)
    np.testing.assert_allclose(vectors[1], alone[0], rtol=1e-5, atol=1e-6)  # the readable image keeps its own row
    assert np.abs(alone[0]).sum() > 0


def test_embed_imports_the_original_files(sample_env, tmp_path):
    """embed.import_clip_dir + a 1027-style pickle (text + 3 struct columns) give the same arrays back; the 3 columns
    are the structural features under data.structural=legacy and are recomputed from the text under quantities."""
    train = load_embeddings(sample_env["embeddings"] / "train")
    clip_dir = tmp_path / "clip" / "train"
    clip_dir.mkdir(parents=True)
    np.save(clip_dir / "embeddings.npy", np.asarray(train.image)[::-1])  # reversed: rows are matched by id
    np.save(clip_dir / "sample_ids.npy", train.sample_ids[::-1])
    original_struct = np.random.default_rng(0).normal(size=(len(train), 3)).astype(np.float32)
    full = np.hstack([train.text, original_struct])
    with open(tmp_path / "qwen_train.pkl", "wb") as fh:
        pickle.dump({sid: vec for sid, vec in zip(train.sample_ids[::-1], full[::-1])}, fh)  # any order
    for structural, expected_struct in (("legacy", original_struct), ("quantities", train.struct)):
        args = sample_env["args"](tmp_path / "runs", f"data.embeddings_dir={tmp_path / structural}",
                                  "embed.splits=[train]", f"data.structural={structural}",
                                  f"embed.import_clip_dir={tmp_path / 'clip' / '{split}'}",
                                  f"embed.import_qwen_pickle={tmp_path / 'qwen_{split}.pkl'}")
        assert embed.main(args) == 0
        imported = load_embeddings(tmp_path / structural / "train")
        # imported vectors are copies of the arrays written above (and the same struct function on the same texts
        # for quantities): bit-exact is right
        np.testing.assert_array_equal(imported.text, train.text)
        np.testing.assert_array_equal(imported.struct, expected_struct)
        np.testing.assert_array_equal(imported.image, train.image)
        np.testing.assert_array_equal(imported.has_image, train.has_image)


def test_import_with_missing_ids_names_them(sample_env, tmp_path, capsys):
    with open(tmp_path / "qwen_train.pkl", "wb") as fh:
        pickle.dump({"nope": np.ones(387)}, fh)
    args = sample_env["args"](tmp_path / "runs", f"data.embeddings_dir={tmp_path / 'emb'}", "embed.splits=[train]",
                              f"embed.import_qwen_pickle={tmp_path / 'qwen_{split}.pkl'}", "embed.clip_model=")
    assert embed.main(args) == 2
    err = capsys.readouterr().err
    assert "embeddings not aligned with the CSV" in err and "first ['100000'" in err
    assert not (tmp_path / "emb" / "train").exists()


def test_full_clip_model_checkpoint_uses_its_own_projection(tmp_path):
    """A saved CLIPModel (the usual openai/clip-vit-* layout) keeps its top-level projection_dim."""
    import torch
    from PIL import Image
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    torch.manual_seed(0)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32,
                  patch_size=8)
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=100)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=12)).eval()
    model.save_pretrained(tmp_path / "clip")
    Image.new("RGB", (40, 50), (200, 30, 90)).save(tmp_path / "a.png")
    vectors, mask, info = embed.encode_images([tmp_path / "a.png"], str(tmp_path / "clip"), batch_size=1)
    assert vectors.shape == (1, 12) and info["dim"] == 12 and mask.tolist() == [True]
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    pixels = processor(images=[Image.open(tmp_path / "a.png").convert("RGB")], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        expected = model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output)
    np.testing.assert_allclose(vectors, expected.numpy(), rtol=1e-4, atol=1e-5)


def test_test_split_alone_reuses_the_train_vocabulary(sample_env, copy_of, tmp_path):
    emb_dir = copy_of(sample_env["embeddings"], "emb")
    (emb_dir / "test" / "manifest.json").unlink()
    args = sample_env["args"](tmp_path / "runs", f"data.embeddings_dir={emb_dir}", "embed.splits=[test]")
    assert embed.main(args) == 0
    again, first = load_embeddings(emb_dir / "test"), load_embeddings(sample_env["embeddings"] / "test")
    np.testing.assert_array_equal(again.struct, first.struct)  # the same parse of the same texts: exact
    (emb_dir / "unit_vocab.json").unlink()
    assert embed.main(args) == 2  # no train vocabulary: a clear error, not a vocabulary fitted on test
