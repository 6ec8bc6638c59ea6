"""Publish (stage 7): the trained head as a Hugging Face model, and inference through it."""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from conftest import TINY_MODEL, read_parquets
from PIL import Image
from safetensors.torch import load_file

from building_embed.config import TrainingModelConfig
from building_embed.generate.generate_embeddings import read_embeddings
from building_embed.model import build_head
from building_embed.publish import (
    convert_to_hf,
    demo_usage,
    estimate_model_size,
    generate_embeddings_from_hf,
    generate_embeddings_from_parquet,
)
from building_embed.publish.configuration_spatial_embeddings import SpatialEmbeddingsConfig
from building_embed.publish.hub import read_output
from building_embed.publish.modeling_spatial_embeddings import SpatialEmbeddingsModel
from common.checkpoint import CheckpointManager

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parents[2]
DIMS = {"input_dim": 24, "hidden_dim": 16, "output_dim": 8}  # input 24: the tiny ViT of conftest.TINY_MODEL
HEAD_ARGS = [f"training_model.{k}={v}" for k, v in DIMS.items()] + TINY_MODEL


def trained_like_head(seed: int = 0) -> torch.nn.Module:
    """A randomly initialised head with every parameter moved off its default (LayerNorm 1 / 0 included)."""
    torch.manual_seed(seed)
    head = build_head(TrainingModelConfig(**DIMS, dropout=0.3))
    with torch.no_grad():
        for p in head.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return head.eval()


@pytest.fixture(scope="module")
def published(tmp_path_factory) -> tuple[Path, Path, torch.nn.Module]:
    """(published dir, checkpoint dir, the head it holds) via `convert_to_hf RUN OUT`."""
    root = tmp_path_factory.mktemp("publish")
    head = trained_like_head()
    CheckpointManager(root / "run" / "checkpoints").save(head, {"epoch": 3}, epoch=3, is_best=True)
    out = root / "hf"
    assert convert_to_hf.main([str(root / "run"), str(out), *HEAD_ARGS, "training_model.dropout=0.3"]) == 0
    return out, root / "run" / "checkpoints" / "best", head


def test_hf_module_has_the_projection_heads_parameter_names_and_shapes():
    head = build_head(TrainingModelConfig(**DIMS))
    model = SpatialEmbeddingsModel(SpatialEmbeddingsConfig(**DIMS))
    ours = {k: tuple(v.shape) for k, v in head.state_dict().items()}
    theirs = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert ours == theirs
    assert set(ours) == {"net.0.weight", "net.0.bias", "net.1.weight", "net.1.bias", "net.4.weight", "net.4.bias"}


def test_published_dir_loads_with_automodel_and_equals_the_trained_head(published):
    from transformers import AutoConfig, AutoModel

    out, ckpt, head = published
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "configuration_spatial_embeddings.py",
                                                    "model.safetensors", "modeling_spatial_embeddings.py"]
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "spatial_embeddings"
    assert config["auto_map"] == {"AutoConfig": "configuration_spatial_embeddings.SpatialEmbeddingsConfig",
                                  "AutoModel": "modeling_spatial_embeddings.SpatialEmbeddingsModel"}
    assert {k: config[k] for k in DIMS} == DIMS and config["dropout"] == 0.3
    assert (config["backbone_name"], config["img_size"], config["global_pool"]) == ("vit_small_patch14_dinov2", 28, "avg")
    assert config["backbone_kwargs"] == {"depth": 1, "embed_dim": 24, "num_heads": 2}
    weights_sha = hashlib.sha256((ckpt / "model.safetensors").read_bytes()).hexdigest()
    assert config["training_info"] == {"epoch": 3, "source_weights_sha256": weights_sha}
    assert AutoConfig.from_pretrained(out, trust_remote_code=True).output_dim == 8
    model = AutoModel.from_pretrained(out, trust_remote_code=True)
    assert not model.training  # dropout off: outputs are deterministic
    x = torch.randn(32, 24, generator=torch.Generator().manual_seed(1)) * 5 + 2
    with torch.no_grad():
        z, expected = model(x).embeddings, head(x)
    # bit-exact: the HF model is ProjectionHead's layers and forward (same modules, same weights, same x)
    assert torch.equal(z, expected)
    assert torch.allclose(z.norm(dim=1), torch.ones(32), atol=1e-6)
    assert torch.equal(model(x.half()).embeddings, head(x.half()))  # float16 input, as stored embeddings are


def test_save_pretrained_round_trips_bit_for_bit(published, tmp_path):
    from transformers import AutoModel

    out, _, _ = published
    first = AutoModel.from_pretrained(out, trust_remote_code=True)
    first.save_pretrained(tmp_path / "again")
    second = AutoModel.from_pretrained(tmp_path / "again", trust_remote_code=True)
    second.save_pretrained(tmp_path / "third")
    a, b = load_file(out / "model.safetensors"), load_file(tmp_path / "third" / "model.safetensors")
    # bit-exact: weights saved and loaded back, no arithmetic
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)
    for name in ("model.safetensors", "config.json", "modeling_spatial_embeddings.py",
                 "configuration_spatial_embeddings.py"):
        assert (out / name).read_bytes() == (tmp_path / "again" / name).read_bytes() \
            == (tmp_path / "third" / name).read_bytes(), name
    for key, value in second.state_dict().items():
        assert torch.equal(value, first.state_dict()[key])


_REMOTE_LOAD = r'''
import sys
sys.modules["building_embed"] = None  # the published files must not need the package that wrote them
import numpy as np, torch
from transformers import AutoModel
model = AutoModel.from_pretrained(sys.argv[1], trust_remote_code=True, local_files_only=True)
assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
x = torch.from_numpy(np.load(sys.argv[2]))
with torch.no_grad():
    np.save(sys.argv[3], model(x).embeddings.numpy())
'''


def test_remote_code_works_without_building_embed(published, tmp_path):
    out, _, head = published
    x = np.random.default_rng(2).standard_normal((6, 24)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", _REMOTE_LOAD, str(out), str(tmp_path / "x.npy"),
                           str(tmp_path / "z.npy")], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    with torch.no_grad():
        expected = head(torch.from_numpy(x)).numpy()
    # another process (its own thread settings) running the copied modeling file: float32, a few ulp allowed
    np.testing.assert_allclose(np.load(tmp_path / "z.npy"), expected, rtol=1e-5, atol=1e-6)


def test_convert_refuses_a_checkpoint_that_does_not_fit_the_config(published, tmp_path, capsys):
    _, ckpt, _ = published
    code = convert_to_hf.main([str(ckpt), str(tmp_path / "out"), *HEAD_ARGS, "training_model.hidden_dim=32"])
    err = capsys.readouterr().err
    assert code == 2 and "training_model.hidden_dim 32 (checkpoint: 16)" in err and str(ckpt) in err
    assert "input_dim" not in err.split("does not fit")[1]  # only the key that differs is named as differing
    assert not (tmp_path / "out").exists()
    # a safetensors file that is not a head, given directly as a file
    from safetensors.torch import save_file

    save_file({"encoder.weight": torch.zeros(2, 2)}, str(tmp_path / "other.safetensors"))
    assert convert_to_hf.main([str(tmp_path / "other.safetensors"), str(tmp_path / "out"), *HEAD_ARGS]) == 2
    assert "not a projection head" in capsys.readouterr().err
    assert convert_to_hf.main([str(tmp_path / "missing"), str(tmp_path / "out"), *HEAD_ARGS]) == 2


def test_convert_refuses_a_non_empty_output_unless_forced(published, tmp_path, capsys):
    _, ckpt, _ = published
    target = tmp_path / "out"
    target.mkdir()
    (target / "keep.txt").write_text("x")
    assert convert_to_hf.main([str(ckpt / "model.safetensors"), str(target), *HEAD_ARGS]) == 2
    assert "--force" in capsys.readouterr().err and (target / "keep.txt").exists()
    assert convert_to_hf.main([str(ckpt / "model.safetensors"), str(target), "--force", *HEAD_ARGS]) == 0
    assert not (target / "keep.txt").exists() and (target / "model.safetensors").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left


def test_generate_from_parquet_applies_the_head_to_every_stored_row(published, pipeline, tmp_path):
    out, _, head = published
    assert generate_embeddings_from_parquet.main([str(out), str(pipeline / "emb"), str(tmp_path / "z")]) == 0
    inputs = sorted((pipeline / "emb").glob("*.parquet"))
    assert sorted(p.name for p in (tmp_path / "z").iterdir()) == [p.name for p in inputs]
    for path in inputs:
        ids_in, x = read_embeddings(path)
        ids_out, z = read_output(tmp_path / "z" / path.name)
        assert ids_out.equals(ids_in)  # every id column, same order
        with torch.no_grad():  # bit-exact: the shard (40 rows) is one forward of the same layers, stored float32
            np.testing.assert_array_equal(z, head(torch.from_numpy(x)).numpy())
        assert z.shape == (len(x), 8)
    # a merged split keeps its metadata columns too
    assert generate_embeddings_from_parquet.main([str(out), str(pipeline / "merged" / "test.parquet"),
                                                  str(tmp_path / "m")]) == 0
    merged = pq.read_table(pipeline / "merged" / "test.parquet")
    assert pq.read_table(tmp_path / "m" / "test.parquet").drop_columns(["embedding"]).equals(
        merged.drop_columns(["embedding"]))
    assert len(merged.column_names) > 5  # more than the ids: split metadata columns survive


def _write_embeddings(path: Path, x: np.ndarray) -> None:
    from building_embed.generate.generate_embeddings import embeddings_table

    keys = [f"t.tar:{i}.jpg" for i in range(len(x))]
    ids = {"image_key": keys, "identity": ["1_1"] * len(x), "dataset_id": [1] * len(x), "target_id": [1] * len(x)}
    pq.write_table(embeddings_table(ids, x, {"embedding_dim": x.shape[1]}), path)


def test_generate_from_parquet_refuses_wrong_width_and_non_finite_rows(published, tmp_path, capsys):
    out, _, _ = published
    (tmp_path / "in").mkdir()
    x = np.random.default_rng(0).standard_normal((5, 24)).astype(np.float32)
    _write_embeddings(tmp_path / "in" / "a.parquet", x)
    _write_embeddings(tmp_path / "in" / "b.parquet", np.zeros((3, 16), np.float32))
    assert generate_embeddings_from_parquet.main([str(out), str(tmp_path / "in"), str(tmp_path / "z")]) == 2
    err = capsys.readouterr().err
    assert "b.parquet" in err and "width 16" in err and "input_dim 24" in err
    assert not (tmp_path / "z").exists()  # checked before a.parquet was written
    x[3, 5] = np.nan
    _write_embeddings(tmp_path / "in" / "b.parquet", x)
    assert generate_embeddings_from_parquet.main([str(out), str(tmp_path / "in" / "b.parquet"), str(tmp_path / "z")]) == 2
    err = capsys.readouterr().err
    assert "row 3" in err and "t.tar:3.jpg" in err and not (tmp_path / "z").exists()


def test_generate_from_hf_equals_backbone_then_head(published, pipeline, tmp_path, capsys):
    out, _, head = published
    args = [f"global.seed={42}", *TINY_MODEL]
    assert generate_embeddings_from_hf.main([str(out), str(pipeline / "inter"), str(tmp_path / "z"), *args]) == 0
    z = read_parquets(tmp_path / "z")
    stored = read_parquets(pipeline / "emb")  # generate_embeddings' float16 backbone output of the same images
    assert z["image_key"].tolist() == stored["image_key"].tolist()
    assert z["identity"].tolist() == stored["identity"].tolist()
    with torch.no_grad():
        via_stored = head(torch.from_numpy(np.stack(stored["embedding"]).astype(np.float32))).numpy()
    ours = np.stack(z["embedding"])
    # the only difference: the stored backbone output was rounded to float16
    assert np.abs(ours - via_stored).max() < 2e-2 and (ours * via_stored).sum(1).min() > 0.999
    # an image folder: image_key = file name; a different backbone size is refused naming the key
    shard = sorted((pipeline / "inter").glob("*.parquet"))[0]
    table = pq.read_table(shard, columns=["image_key", "image_bytes"]).slice(0, 3)
    (tmp_path / "photos").mkdir()
    for i, data in enumerate(table.column("image_bytes").to_pylist()):
        (tmp_path / "photos" / f"{i}.jpg").write_bytes(data)
    assert generate_embeddings_from_hf.main([str(out), str(tmp_path / "photos"), str(tmp_path / "p"), *args]) == 0
    photos = read_parquets(tmp_path / "p")
    assert photos["image_key"].tolist() == ["0.jpg", "1.jpg", "2.jpg"]
    rows = z.set_index("image_key").loc[table.column("image_key").to_pylist(), "embedding"]
    np.testing.assert_allclose(np.stack(photos["embedding"]), np.stack(rows), atol=1e-5)
    assert generate_embeddings_from_hf.main([str(out), str(tmp_path / "photos"), str(tmp_path / "q"), *args,
                                             "embedding_model.img_size=42"]) == 2
    err = capsys.readouterr().err
    assert "embedding_model.img_size is 42" in err and "28" in err
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, "JPEG")
    (tmp_path / "photos" / "3.jpg").write_bytes(buffer.getvalue()[:40])
    assert generate_embeddings_from_hf.main([str(out), str(tmp_path / "photos"), str(tmp_path / "q"), *args]) == 2
    assert "3.jpg" in capsys.readouterr().err and not (tmp_path / "q").exists()


def test_demo_usage_prints_neighbours_and_both_shares(published, pipeline, capsys):
    out, _, head = published
    result = demo_usage.demo(out, pipeline / "merged" / "test.parquet", queries=2, k=3)
    printed = capsys.readouterr().out
    frame = pq.read_table(pipeline / "merged" / "test.parquet").to_pandas()
    assert result["rows"] == len(frame) and printed.count("query ") == 2
    assert frame["image_key"][0] in printed and frame["image_key"][1] in printed
    x = np.stack(frame["embedding"]).astype(np.float32)
    identity = frame["identity"].to_numpy()
    for name, values in (("backbone", x), ("head", head(torch.from_numpy(x)).detach().numpy())):
        unit = values / np.linalg.norm(values, axis=1, keepdims=True)
        sims = unit @ unit.T
        np.fill_diagonal(sims, -np.inf)
        share = float(np.mean(identity[sims.argmax(1)] == identity))
        assert result["first_neighbor_same_identity"][name] == pytest.approx(share)
    assert demo_usage.main([str(out), str(pipeline / "merged" / "fingerprints.parquet")]) == 2


def test_estimate_model_size_equals_the_hand_count(published, tmp_path, capsys):
    out, _, _ = published
    # LayerNorm 2*24 + Linear 24*16 + 16 + Linear 16*8 + 8
    hand = 48 + 384 + 16 + 128 + 8
    assert hand == 584
    assert estimate_model_size.main([str(out), "--json", str(tmp_path / "size.json")]) == 0
    report = json.loads((tmp_path / "size.json").read_text())
    assert report["parameters"] == hand and report["bytes_fp32"] == 4 * hand and report["bytes_fp16"] == 2 * hand
    assert report["safetensors_file_bytes"] == (out / "model.safetensors").stat().st_size
    assert 0 < report["safetensors_header_bytes"] < 1024
    assert sum(report["parameters_by_tensor"].values()) == hand
    assert "584" in capsys.readouterr().out
    assert estimate_model_size.head_parameter_count(768, 512, 256) == 768 * 2 + 768 * 512 + 512 + 512 * 256 + 256


def test_publish_stages_are_listed_and_help_works(capsys):
    from building_embed.publish import STAGES, main

    assert main([]) == 0
    listed = capsys.readouterr().out
    for stage in STAGES:
        assert f"python -m building_embed.publish.{stage}" in listed
    with pytest.raises(SystemExit) as exc:
        convert_to_hf.main(["--help"])
    assert exc.value.code == 0 and "training_model.input_dim" in capsys.readouterr().out


def test_generate_from_hf_reads_photos_as_taken(published, tmp_path, caplog):
    """An image folder: a photo stored sideways with EXIF orientation 6 embeds exactly as the upright one (PNG, so
    the turn is lossless), and a 24 MP JPEG is downscaled (counted in the log), not refused."""
    out, _, _ = published
    rng = np.random.default_rng(0)
    upright = Image.fromarray(rng.integers(0, 256, (30, 20, 3), dtype=np.uint8))  # 20 x 30: below 28 px, not reduced
    exif = Image.Exif()
    exif[0x0112] = 6
    folder = tmp_path / "photos"
    folder.mkdir()
    upright.save(folder / "a_upright.png")
    upright.transpose(Image.ROTATE_90).save(folder / "b_sideways.png", exif=exif)
    big = Image.fromarray(rng.integers(0, 256, (8, 12, 3), dtype=np.uint8)).resize((6000, 4000), Image.BILINEAR)
    big.save(folder / "c_big.jpg", quality=90)
    with caplog.at_level("INFO"):
        assert generate_embeddings_from_hf.main([str(out), str(folder), str(tmp_path / "z"), *TINY_MODEL]) == 0
    z = read_parquets(tmp_path / "z")
    assert z["image_key"].tolist() == ["a_upright.png", "b_sideways.png", "c_big.jpg"]
    embeddings = np.stack(z["embedding"])
    # bit-exact: the same pixels after the turn, through the same model in one batch
    np.testing.assert_array_equal(embeddings[1], embeddings[0])
    assert np.isfinite(embeddings).all()
    assert "3 images (1 downscaled before the transform)" in caplog.text
