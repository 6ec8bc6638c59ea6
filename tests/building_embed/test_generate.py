"""generate_embeddings: values against a direct forward pass, ids, metadata, resume byte for byte, bad input."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from conftest import TINY_MODEL

from building_embed.config import BuildingEmbedConfig
from building_embed.generate import backbone, generate_embeddings
from building_embed.generate.generate_embeddings import read_embeddings, shards_for_rank
from common.backbones import PACKAGED, EvalPreprocess
from common.config import load_config

REPO = Path(__file__).resolve().parents[2]
PACKAGED_LITE0 = ["embedding_model.random_init=false", "embedding_model.packaged=efficientnet_lite0",
                  "embedding_model.name=tf_efficientnet_lite0", "embedding_model.model_kwargs={}",
                  "embedding_model.img_size=224", "embedding_model.global_pool=avg"]


def _copy_inputs(pipeline: Path, root: Path) -> None:
    shutil.copytree(pipeline / "inter", root / "inter")


def test_embeddings_equal_a_direct_forward_pass_with_ids_in_shard_order(pipeline):
    shard = pipeline / "inter" / "region_1-00001.parquet"
    ids, values = read_embeddings(pipeline / "emb" / shard.name)
    source = pq.read_table(shard, columns=["image_key", "identity", "image_bytes"])
    assert ids.column("image_key").to_pylist() == source.column("image_key").to_pylist()
    assert ids.column("identity").to_pylist() == source.column("identity").to_pylist()
    cfg = load_config(BuildingEmbedConfig, None, TINY_MODEL)
    torch.manual_seed(cfg.global_.seed)
    model, preprocess, dim = backbone.build_backbone(cfg.embedding_model)
    images = source.column("image_bytes").to_pylist()[:5]
    with torch.no_grad():
        expected = model(torch.stack([preprocess(b) for b in images])).numpy()
    assert values.shape == (len(source), 24) and dim == 24
    # The stage ran these rows in a batch of 16, the test in a batch of 5: float32 results may differ by a few ulp, which
    # can move a value to the neighbouring float16 (a relative step of 2^-10 ~ 1e-3); 2e-3 allows that, not a bug.
    np.testing.assert_allclose(values[:5], expected.astype(np.float16).astype(np.float32), rtol=2e-3, atol=1e-5)
    assert pq.read_schema(pipeline / "emb" / shard.name).field("embedding").type.value_type == "halffloat"
    manifest = json.loads((pipeline / "emb" / "embeddings_manifest.json").read_text())
    assert manifest["embedding_dim"] == 24 and manifest["rows"] == 278 and len(manifest["shards"]) == 9


def test_preprocess_resizes_and_normalises():
    from PIL import Image

    from building_embed.sample_data import jpeg_bytes

    prep = backbone.ImagePreprocess(EvalPreprocess(8, 1.0, "bicubic", (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)))
    out = prep(jpeg_bytes(Image.new("L", (20, 12), 255), quality=100))  # grey JPEG -> 3 channels
    assert out.shape == (3, 8, 8) and out.dtype == torch.float32
    torch.testing.assert_close(out, torch.full((3, 8, 8), 2.0), atol=0.02, rtol=0)  # (1 - 0.5) / 0.25


def test_shards_split_by_rank_cover_everything_once():
    shards = [Path(f"s{i}") for i in range(7)]
    parts = [shards_for_rank(shards, r, 3) for r in range(3)]
    assert parts[0] == [Path("s0"), Path("s3"), Path("s6")]
    assert sorted(p for part in parts for p in part) == shards


def test_stopped_after_one_shard_resumes_to_identical_bytes(pipeline, tmp_path, stage_args):
    root = tmp_path / "w"
    _copy_inputs(pipeline, root)
    assert generate_embeddings.main(stage_args(root, "embedding_model.max_shards_this_run=1")) == 0
    assert [p.name for p in (root / "emb").glob("*.parquet")] == ["region_0-00000.parquet"]
    assert not (root / "emb" / "embeddings_manifest.json").exists()
    (root / "emb" / ".region_0-00001.parquet.abc.tmp").write_bytes(b"torn")  # a kill mid-write leaves this
    assert generate_embeddings.main(stage_args(root)) == 0
    names = sorted(p.name for p in (pipeline / "emb").glob("*.parquet"))
    assert sorted(p.name for p in (root / "emb").glob("*.parquet")) == names
    for name in names:
        assert (root / "emb" / name).read_bytes() == (pipeline / "emb" / name).read_bytes(), name
    assert not list((root / "emb").glob(".*.tmp"))


def test_sigkill_mid_run_then_resume_gives_identical_bytes(pipeline, tmp_path, stage_args):
    """A real SIGKILL once the first shard exists; the rerun completes the rest with the uninterrupted bytes."""
    root = tmp_path / "k"
    _copy_inputs(pipeline, root)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "building_embed.generate.generate_embeddings",
                             *stage_args(root, "embedding_model.batch_size=1")], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300  # the loop ends when the shard appears; 300 s allows a loaded 2-core machine
    while not (root / "emb" / "region_0-00000.parquet").exists() and time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    done_before = len(list((root / "emb").glob("*.parquet")))
    assert done_before < 9, "the run finished before the kill; the test proves nothing"
    assert generate_embeddings.main(stage_args(root, "embedding_model.batch_size=1")) == 0
    reference = tmp_path / "uninterrupted"
    _copy_inputs(pipeline, reference)
    assert generate_embeddings.main(stage_args(reference, "embedding_model.batch_size=1")) == 0
    names = sorted(p.name for p in (reference / "emb").glob("*"))
    assert sorted(p.name for p in (root / "emb").glob("*")) == names and len(names) == 10  # 9 shards + manifest
    for name in names:  # bit-exact: resumed vs uninterrupted, the same shards through the same batches
        assert (root / "emb" / name).read_bytes() == (reference / "emb" / name).read_bytes(), name


def test_changed_settings_under_a_resume_is_exit_2_naming_the_change(pipeline, tmp_path, stage_args, capsys):
    root = tmp_path / "w"
    _copy_inputs(pipeline, root)
    shutil.copytree(pipeline / "emb", root / "emb")
    before = (root / "emb" / "region_0-00000.parquet").read_bytes()
    assert generate_embeddings.main(stage_args(root, "embedding_model.img_size=42")) == 2
    err = capsys.readouterr().err
    assert "region_0-00000.parquet" in err and "settings.img_size: 28 -> 42" in err and "global.resume" in err
    assert (root / "emb" / "region_0-00000.parquet").read_bytes() == before


class _NanAtRow(torch.nn.Module):
    """Width-4 features, NaN in row 3 of the first batch."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x.mean(dim=(2, 3)).repeat(1, 2)[:, :4].clone()
        if len(out) > 3:
            out[3, 1] = float("nan")
        return out


def test_non_finite_embeddings_are_exit_2_naming_shard_and_image(pipeline, tmp_path, stage_args, capsys,
                                                                monkeypatch):
    root = tmp_path / "w"
    _copy_inputs(pipeline, root)
    prep = backbone.ImagePreprocess(EvalPreprocess(28, 1.0, "bicubic", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)))
    monkeypatch.setattr(generate_embeddings, "build_backbone", lambda cfg: (_NanAtRow(), prep, 4))
    assert generate_embeddings.main(stage_args(root)) == 2
    err = capsys.readouterr().err
    fourth = pq.read_table(root / "inter" / "region_0-00000.parquet", columns=["image_key"]).column(0)[3].as_py()
    assert "region_0-00000.parquet" in err and "row 3" in err and fourth in err
    assert not list((root / "emb").glob("*.parquet"))


def test_missing_weights_are_exit_2_saying_what_to_provide(pipeline, tmp_path, stage_args, capsys):
    root = tmp_path / "w"
    _copy_inputs(pipeline, root)
    assert generate_embeddings.main(stage_args(root, "embedding_model.random_init=false")) == 2
    assert "embedding_model.weights" in capsys.readouterr().err
    missing = tmp_path / "nope.safetensors"
    assert generate_embeddings.main(stage_args(root, f"embedding_model.weights={missing}")) == 2
    assert str(missing) in capsys.readouterr().err


def test_local_weights_file_is_loaded(pipeline, tmp_path, stage_args):
    """timm weights from a local safetensors file through pretrained_cfg_overlay reproduce that model's output."""
    from safetensors.torch import save_file

    cfg = load_config(BuildingEmbedConfig, None, TINY_MODEL)
    torch.manual_seed(123)
    model, prep, _ = backbone.build_backbone(cfg.embedding_model)
    weights = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, weights)
    cfg.embedding_model.random_init, cfg.embedding_model.weights = False, str(weights)
    loaded, _, _ = backbone.build_backbone(cfg.embedding_model)
    x = torch.randn(2, 3, 28, 28)
    with torch.no_grad():  # bit-exact: the same timm class and weights, one forward each on the same x
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)


@pytest.mark.slow
def test_torchrun_two_ranks_split_the_shards_and_match_one_process(pipeline, tmp_path, stage_args):
    root = tmp_path / "ddp"
    _copy_inputs(pipeline, root)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    torchrun = Path(sys.executable).with_name("torchrun")
    proc = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node=2", "-m",
                           "building_embed.generate.generate_embeddings", *stage_args(root)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)  # ~30 s idle
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = proc.stderr
    assert "region_0-00000.parquet: 40 embeddings" in log  # rank 0 logs its shards; rank 1 logs warnings only
    assert "region_0-00001.parquet: 40 embeddings" not in log
    # bit-exact: each rank embeds whole shards with the same batches and one thread, as the single process did
    for path in sorted((pipeline / "emb").glob("*")):
        assert (root / "emb" / path.name).read_bytes() == path.read_bytes(), path.name


def test_transformers_backend_loads_a_local_dinov2_directory(tmp_path):
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    reference = Dinov2Model(Dinov2Config(hidden_size=24, num_hidden_layers=1, num_attention_heads=2,
                                         intermediate_size=48, image_size=28, patch_size=14)).eval()
    reference.save_pretrained(tmp_path / "tiny_dinov2")
    cfg = load_config(BuildingEmbedConfig, None, ["embedding_model.backend=transformers", "embedding_model.img_size=28",
                                                  f"embedding_model.weights={tmp_path / 'tiny_dinov2'}"])
    model, _, dim = backbone.build_backbone(cfg.embedding_model)
    x = torch.randn(3, 3, 28, 28)
    # Loaded through AutoModel.from_pretrained, which may pick another attention implementation than the directly
    # built reference: float32 with a few ulp of difference allowed; wrong pooling differs by far more.
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(pixel_values=x).pooler_output, rtol=1e-5, atol=1e-6)
    assert dim == 24


def test_decoding_workers_give_the_same_embeddings(pipeline):
    cfg = load_config(BuildingEmbedConfig, None, TINY_MODEL)
    torch.manual_seed(0)
    model, prep, _ = backbone.build_backbone(cfg.embedding_model)
    images = pq.read_table(pipeline / "inter" / "region_0-00001.parquet", columns=["image_bytes"]).column(0)
    images = images.to_pylist()[:12]
    cpu = torch.device("cpu")
    in_process = generate_embeddings.embed_shard(model, prep, images, 5, 0, cpu, None)
    workers = generate_embeddings.embed_shard(model, prep, images, 5, 2, cpu, None)
    assert in_process.shape == (12, 24)
    # bit-exact: the same batches of 5 through the same model; only the process that decodes the JPEGs differs
    np.testing.assert_array_equal(workers, in_process)


# ------------------------------------------------------------------------------ packaged backbone, photos as taken


def _jpeg(image, **kwargs) -> bytes:
    import io

    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=95, **kwargs)
    return buffer.getvalue()


def _write_shard(path: Path, images: list[bytes]) -> None:
    import pyarrow as pa

    n = len(images)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"image_key": [f"t.tar:{i}.jpg" for i in range(n)],
                             "identity": [f"id{i}" for i in range(n)],
                             "dataset_id": [0] * n, "target_id": list(range(n)),
                             "image_bytes": pa.array(images, pa.binary())}), path)


def test_packaged_backbone_embeds_an_exif_rotated_photo_like_the_upright_one(real_data_dir):
    """A phone stores a portrait photo as landscape pixels + EXIF orientation 6. Read as people see it, it embeds as
    the upright photo; read ignoring EXIF (the code before common.images) it is a different picture."""
    from PIL import Image

    face = Image.open(real_data_dir / "faces_orl_att" / "s1" / "1.pgm").convert("RGB")
    exif = Image.Exif()
    exif[0x0112] = 6
    upright, sideways = _jpeg(face), _jpeg(face.transpose(Image.ROTATE_90), exif=exif)
    cfg = load_config(BuildingEmbedConfig, None, PACKAGED_LITE0)
    model, prep, dim = backbone.build_backbone(cfg.embedding_model)
    import io

    ignoring_exif = prep.transform(Image.open(io.BytesIO(sideways)))
    with torch.no_grad():
        e = torch.nn.functional.normalize(model(torch.stack([prep(upright), prep(sideways), ignoring_exif])), dim=1)
    fixed, before = float(e[0] @ e[1]), float(e[0] @ e[2])
    print(f"cosine to the upright photo: EXIF applied {fixed:.3f}, EXIF ignored {before:.3f}")
    assert dim == 1280
    assert fixed > 0.95  # measured 0.99+: two JPEG encodes of one picture
    assert before < 0.8  # measured 0.52: the face lying on its side


def test_a_24_mp_photo_is_downscaled_not_skipped_and_counted(tmp_path, stage_args):
    from PIL import Image

    root = tmp_path / "w"
    rng = np.random.default_rng(0)
    big = Image.fromarray(rng.integers(0, 256, (8, 12, 3), dtype=np.uint8)).resize((6000, 4000), Image.BILINEAR)
    small = Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8))  # short side 20 < 28: not reduced
    _write_shard(root / "inter" / "a.parquet", [_jpeg(big), _jpeg(small)])
    assert generate_embeddings.main(stage_args(root)) == 0
    manifest = json.loads((root / "emb" / "embeddings_manifest.json").read_text())
    assert manifest["rows"] == 2 and manifest["downscaled"] == 1
    _, values = read_embeddings(root / "emb" / "a.parquet")
    assert values.shape == (2, 24) and np.isfinite(values).all()
    # a later resume with the same settings keeps the shard (the count is not a setting)
    assert generate_embeddings.main(stage_args(root)) == 0


def test_image_beyond_max_image_pixels_is_exit_2_naming_shard_and_image(tmp_path, stage_args, capsys):
    from PIL import Image

    root = tmp_path / "w"
    _write_shard(root / "inter" / "a.parquet", [_jpeg(Image.new("RGB", (40, 40))), _jpeg(Image.new("RGB", (300, 200)))])
    assert generate_embeddings.main(stage_args(root, "embedding_model.max_image_pixels=10000")) == 2
    err = capsys.readouterr().err
    assert "a.parquet" in err and "t.tar:1.jpg" in err and "300 x 200" in err
    assert not list((root / "emb").glob("*.parquet"))


def test_random_init_with_token_pooling_is_exit_2_before_any_work(pipeline, tmp_path, stage_args, capsys):
    root = tmp_path / "w"
    _copy_inputs(pipeline, root)
    assert generate_embeddings.main(stage_args(root, "embedding_model.global_pool=token")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "random_init=true" in err[0] and "global_pool=token" in err[0]
    assert not (root / "emb").exists()


def test_altered_packaged_weights_are_exit_2(pipeline, tmp_path, stage_args, capsys, monkeypatch):
    import dataclasses

    source = PACKAGED["efficientnet_lite0"]
    altered = tmp_path / "lite0.pth"
    data = bytearray(source.locate().read_bytes())
    data[-100] ^= 0x01
    altered.write_bytes(bytes(data))
    monkeypatch.setitem(PACKAGED, "efficientnet_lite0", dataclasses.replace(source, locate=lambda: altered))
    root = tmp_path / "w"
    _copy_inputs(pipeline, root)
    assert generate_embeddings.main(stage_args(root, *PACKAGED_LITE0)) == 2
    err = capsys.readouterr().err
    assert "embedding_model.packaged=efficientnet_lite0" in err and "SHA-256" in err and str(altered) in err
    assert not list((root / "emb").glob("*.parquet"))


def test_transformers_preprocessing_comes_from_the_directorys_image_processor(tmp_path):
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({
        "image_mean": [0.5, 0.4, 0.3], "image_std": [0.2, 0.2, 0.25], "resample": 3, "do_center_crop": True,
        "size": {"shortest_edge": 256}, "crop_size": {"height": 224, "width": 224}}))
    transform = backbone.transformers_transform(tmp_path, 112)
    assert (transform.size, transform.crop_pct, transform.interpolation) == (112, 0.875, "bicubic")
    np.testing.assert_allclose(transform.mean.ravel(), [0.5, 0.4, 0.3])
    np.testing.assert_allclose(transform.std.ravel(), [0.2, 0.2, 0.25])


def test_a_20_mp_phone_photo_goes_through_process_tar_and_generate(sample, tmp_path, stage_args):
    """A 20 MP photo with GPS EXIF, stored sideways (orientation 6): process_tar keeps it (the old default
    max_image_pixels of 16.8 MP dropped it as oversized_image) and stores it without GPS but with its orientation;
    generate downscales it (counted in the manifest)."""
    import io
    import tarfile

    from PIL import Image

    from building_embed.preprocess import process_tar

    stem = "0101_0000002_0000201_001"
    with tarfile.open(sample[0] / "tars" / "region_0.tar") as tar:
        metadata = tar.extractfile(f"{stem}.txt").read()
    exif = Image.Exif()
    exif[0x0112] = 6
    exif.get_ifd(0x8825).update({1: "N", 2: (52.0, 22.0, 1.5), 3: "E", 4: (4.0, 53.0, 2.0)})
    rng = np.random.default_rng(0)
    photo = Image.fromarray(rng.integers(0, 256, (8, 12, 3), dtype=np.uint8)).resize((5472, 3648), Image.BILINEAR)
    root = tmp_path / "w"
    (root / "tars").mkdir(parents=True)
    with tarfile.open(root / "tars" / "phone.tar", "w") as tar:
        for name, data in ((f"{stem}.jpg", _jpeg(photo, exif=exif)), (f"{stem}.txt", metadata)):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    assert process_tar.main(stage_args(root)) == 0
    report = json.loads((root / "inter" / "process_report.json").read_text())
    assert report["rows"] == 1 and not report["skipped"], report["skipped"]
    stored = pq.read_table(sorted((root / "inter").glob("*.parquet"))[0]).column("image_bytes")[0].as_py()
    with Image.open(io.BytesIO(stored)) as image:
        assert image.size == (5472, 3648) and dict(image.getexif()) == {0x0112: 6}  # GPS and maker gone
    assert generate_embeddings.main(stage_args(root)) == 0
    manifest = json.loads((root / "emb" / "embeddings_manifest.json").read_text())
    assert manifest["rows"] == 1 and manifest["downscaled"] == 1
