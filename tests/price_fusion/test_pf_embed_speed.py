"""embed speed options: chunked resume (byte-identical, done chunks never re-encoded, a changed input re-encodes),
images through DataLoader workers, max_seq_length, device and precision resolution."""

from __future__ import annotations

import logging
import shutil

import numpy as np
import pandas as pd
import pytest

from price_fusion import embed
from price_fusion.embedding_store import load_embeddings

CHUNK_ROWS = 64  # the 240-product sample train split -> 4 chunks (64, 64, 64, 48)
STORE_FILES = ("sample_ids.npy", "image.npy", "has_image.npy", "text.npy", "struct.npy")


def _args(sample_env, tmp_path, emb_dir, *extra):
    return sample_env["args"](tmp_path / "runs", f"data.embeddings_dir={emb_dir}", "embed.splits=[train]",
                              f"embed.chunk_rows={CHUNK_ROWS}", "embed.num_workers=0", *extra)


def _count_chunks(monkeypatch, fail_on_call: int | None = None) -> list[int]:
    """Wrap embed.encode_chunk: record each chunk's row count; raise KeyboardInterrupt (a kill) on call `fail_on_call`."""
    calls: list[int] = []
    real = embed.encode_chunk

    def counted(image_encoder, text_encoder, paths, texts):
        calls.append(len(texts))
        if fail_on_call is not None and len(calls) == fail_on_call:
            raise KeyboardInterrupt
        return real(image_encoder, text_encoder, paths, texts)

    monkeypatch.setattr(embed, "encode_chunk", counted)
    return calls


def _interrupted(sample_env, tmp_path, monkeypatch, emb_dir, *extra) -> None:
    """Run embed until it is killed while encoding the third chunk: two chunks saved, no final store."""
    calls = _count_chunks(monkeypatch, fail_on_call=3)
    assert embed.main(_args(sample_env, tmp_path, emb_dir, *extra)) == 130
    assert calls == [64, 64, 64]
    partial = emb_dir / "train.partial"
    assert sorted(p.name for p in partial.glob("chunk_*.npz")) == ["chunk_00000.npz", "chunk_00001.npz"]
    assert not (emb_dir / "train").exists()


def test_killed_embed_resumes_by_chunk_to_the_same_bytes(sample_env, tmp_path, monkeypatch):
    whole = tmp_path / "whole"
    calls = _count_chunks(monkeypatch)
    assert embed.main(_args(sample_env, tmp_path, whole)) == 0
    assert calls == [64, 64, 64, 48] and not (whole / "train.partial").exists()

    resumed = tmp_path / "resumed"
    _interrupted(sample_env, tmp_path, monkeypatch, resumed)
    calls = _count_chunks(monkeypatch)
    assert embed.main(_args(sample_env, tmp_path, resumed)) == 0
    assert calls == [64, 48]  # only chunks 2 and 3: the two saved ones were read back, not encoded again
    assert not (resumed / "train.partial").exists()
    # the resumed chunks are the same calls on the same rows as the uninterrupted run's: bit-exact is right
    for name in STORE_FILES:
        assert (resumed / "train" / name).read_bytes() == (whole / "train" / name).read_bytes(), name
    manifest = load_embeddings(resumed / "train").manifest
    drawn = np.array([(sample_env["image_dir"] / f"{sid}.png").is_file()
                      for sid in pd.read_csv(sample_env["train_csv"], dtype={"sample_id": str}).sample_id])
    # counts summed over the chunks, as one uninterrupted pass counts them
    assert manifest["image_encoder"]["n_absent"] == (~drawn).sum() and manifest["image_encoder"]["n_unreadable"] == 0
    assert manifest["image_encoder"]["device"] == "cpu" and manifest["image_encoder"]["precision"] == "fp32"


def test_changed_input_discards_the_saved_chunks(sample_env, tmp_path, monkeypatch, caplog):
    csv = tmp_path / "train.csv"
    shutil.copy(sample_env["train_csv"], csv)
    emb_dir = tmp_path / "emb"
    _interrupted(sample_env, tmp_path, monkeypatch, emb_dir, f"data.train_csv={csv}")
    frame = pd.read_csv(csv, dtype={"sample_id": str})
    frame.loc[0, "catalog_content"] = frame.loc[0, "catalog_content"] + " (new formula)"
    frame.to_csv(csv, index=False)
    calls = _count_chunks(monkeypatch)
    with caplog.at_level(logging.INFO, logger="price_fusion.embed"):
        assert embed.main(_args(sample_env, tmp_path, emb_dir, f"data.train_csv={csv}")) == 0
    assert calls == [64, 64, 64, 48]  # every chunk again, the two saved ones included
    assert "discarding 2 finished chunks" in caplog.text and "data 'csv' changed" in caplog.text

    # a changed setting the vectors depend on is seen too
    _interrupted(sample_env, tmp_path, monkeypatch, tmp_path / "emb2")
    calls = _count_chunks(monkeypatch)
    assert embed.main(_args(sample_env, tmp_path, tmp_path / "emb2", "embed.max_seq_length=16")) == 0
    assert calls == [64, 64, 64, 48] and "max_seq_length: 0 -> 16" in caplog.text


def test_images_through_dataloader_workers_match_in_process(sample_env, tmp_path, monkeypatch):
    import os

    from PIL import Image

    readers = tmp_path / "readers.txt"
    real_getitem = embed.ImageFiles.__getitem__

    def logged(self, key):  # forked workers inherit the patch; each appends the pid that decoded the file
        with open(readers, "a") as fh:
            fh.write(f"{os.getpid()}\n")
        return real_getitem(self, key)

    monkeypatch.setattr(embed.ImageFiles, "__getitem__", logged)

    paths = sorted(sample_env["image_dir"].glob("*.png"))[:7]
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    Image.new("RGB", (48, 20), (250, 10, 10)).save(tmp_path / "wide.png")
    listed = [paths[0], bad, None, *paths[1:4], tmp_path / "wide.png", *paths[4:]]
    clip = str(sample_env["clip_model"])
    in_process = embed.encode_images(listed, clip, batch_size=3, num_workers=0)
    assert set(readers.read_text().split()) == {str(os.getpid())}
    readers.unlink()
    workers = embed.encode_images(listed, clip, batch_size=3, num_workers=2)
    pids = readers.read_text().split()
    assert len(pids) == 9 and str(os.getpid()) not in pids  # every present file decoded in a worker process
    # the same batches (the batch sampler is fixed), the same preprocessing function, the forward pass in this process
    # either way: only where the files are decoded differs, so bit-exact is right
    np.testing.assert_array_equal(workers[0], in_process[0])
    assert workers[1].tolist() == in_process[1].tolist() == [True, False, False] + [True] * 7
    assert workers[2]["n_unreadable"] == 1 and workers[2]["n_absent"] == 1
    assert np.all(workers[0][[1, 2]] == 0) and np.all(np.abs(workers[0][[0, 3, 6]]).sum(1) > 0)


def test_max_seq_length_truncates_the_text():
    short, long = "red mug", "stainless steel travel mug with a leak-proof lid, keeps drinks hot for 12 hours, 16 oz"
    full, info_full = embed.encode_texts([short, long], "minilm", batch_size=2)
    cut, info_cut = embed.encode_texts([short, long], "minilm", batch_size=2, max_seq_length=6)
    assert info_full["max_seq_length"] == 256 and info_cut["max_seq_length"] == 6
    np.testing.assert_allclose(cut[0], full[0], rtol=1e-5, atol=1e-6)  # 4 tokens + [CLS] [SEP]: unchanged
    assert np.abs(cut[1] - full[1]).max() > 1e-2
    assert cut.dtype == np.float32 and cut.shape == (2, 384)


def test_device_and_precision_resolution(sample_env, tmp_path, capsys):
    import torch

    cpu = torch.device("cpu")
    assert embed.resolve_precision("auto", cpu) == "fp32"
    assert embed.resolve_precision("auto", torch.device("cuda")) == "fp16"
    assert embed.resolve_precision("bf16", cpu) == "bf16"
    if not torch.cuda.is_available():
        assert embed.resolve_device("auto") == cpu
        with pytest.raises(embed.UserError, match="embed.device=cuda"):
            embed.resolve_device("cuda")
    assert embed.main(_args(sample_env, tmp_path, tmp_path / "emb", "embed.device=gpu")) == 2
    assert "embed.device" in capsys.readouterr().err
    assert not (tmp_path / "emb").exists()
