"""common.backbones: the packaged EfficientNet-Lite0 weights (strict, SHA-256 checked, every tensor mapped), real
features on real faces, preprocessing equal to timm's own eval transform, meaningless settings refused."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from common import backbones
from common.backbones import PACKAGED, EvalPreprocess, build_timm_backbone, lukemelas_efficientnet_to_timm
from common.errors import UserError

LITE0 = dict(name="tf_efficientnet_lite0", packaged="efficientnet_lite0", global_pool="avg")


@pytest.fixture(scope="module")
def lite0():
    torch.set_num_threads(1)
    return build_timm_backbone(LITE0["name"], packaged=LITE0["packaged"], global_pool="avg")


def test_key_map_covers_every_packaged_tensor_one_to_one():
    import timm

    raw = torch.load(PACKAGED["efficientnet_lite0"].locate(), map_location="cpu", weights_only=True)
    converted = lukemelas_efficientnet_to_timm(raw)
    target = timm.create_model("tf_efficientnet_lite0", pretrained=False).state_dict()
    assert len(raw) == 296 and len(converted) == 296  # no two source keys mapped onto one name
    assert set(converted) == set(target)  # every timm tensor filled, nothing left over (the strict load's condition)
    assert all(converted[k].shape == target[k].shape for k in target)


def test_packaged_file_with_one_byte_changed_is_refused(tmp_path, monkeypatch):
    source = PACKAGED["efficientnet_lite0"]
    altered = tmp_path / "efficientnet-lite0.pth"
    shutil.copyfile(source.locate(), altered)
    data = bytearray(altered.read_bytes())
    data[len(data) // 2] ^= 0x01
    altered.write_bytes(bytes(data))
    monkeypatch.setitem(PACKAGED, "efficientnet_lite0", dataclasses.replace(source, locate=lambda: altered))
    with pytest.raises(UserError, match=r"embedding_model\.packaged=efficientnet_lite0: .* SHA-256"):
        build_timm_backbone("tf_efficientnet_lite0", packaged="efficientnet_lite0", global_pool="avg",
                            key_prefix="embedding_model.")


def test_packaged_weights_are_loaded_strictly(monkeypatch):
    """A state dict missing one tensor is refused, not loaded with that tensor left random."""
    source = PACKAGED["efficientnet_lite0"]

    def drop_one(state):
        out = source.convert(state)
        out.pop("blocks.3.0.conv_pw.weight")
        return out

    monkeypatch.setitem(PACKAGED, "efficientnet_lite0", dataclasses.replace(source, convert=drop_one))
    with pytest.raises(UserError, match="does not fit tf_efficientnet_lite0"):
        build_timm_backbone("tf_efficientnet_lite0", packaged="efficientnet_lite0", global_pool="avg")


def test_real_features_flipped_face_close_other_people_far(lite0, real_data_dir):
    """ImageNet features: a mirrored copy of a face stays close, faces of other people do not. A random or wrongly
    mapped network fails this (random weights give every pair a cosine of 0.95+)."""
    model, data_config = lite0
    prep = EvalPreprocess.from_data_config(data_config)
    faces = real_data_dir / "faces_orl_att"
    people = [Image.open(faces / f"s{i}" / "1.pgm") for i in (1, 2, 3)]
    batch = torch.stack([prep(people[0]), prep(ImageOps.mirror(people[0])), prep(people[1]), prep(people[2])])
    with torch.no_grad():
        features = torch.nn.functional.normalize(model(batch), dim=1)
    cosine = (features @ features[0]).tolist()
    print(f"cosine to s1/1.pgm: mirrored {cosine[1]:.3f}, s2 {cosine[2]:.3f}, s3 {cosine[3]:.3f}")
    assert features.shape == (4, 1280)
    # measured: mirrored 0.977, other people 0.69-0.74 (s2..s5)
    assert cosine[1] > 0.9
    assert max(cosine[2:]) < cosine[1] - 0.15


def test_preprocess_equals_timms_eval_transform_on_a_non_square_image(lite0):
    from timm.data import create_transform

    _, data_config = lite0
    rng = np.random.default_rng(0)
    # noise: a one-pixel shift in the resize or the crop changes values by far more than the tolerance
    for size in ((451, 300), (300, 451), (640, 257)):
        image = Image.fromarray((rng.random((size[1], size[0], 3)) * 255).astype(np.uint8))
        ours = EvalPreprocess.from_data_config(data_config)(image)
        theirs = create_transform(**data_config)(image)
        assert ours.shape == theirs.shape == (3, 224, 224)
        # the same Pillow resize and crop; 1e-6 allows float32 rounding of the normalisation only
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)


def test_random_init_with_token_pooling_is_refused_before_building():
    with pytest.raises(UserError, match="global_pool=token gives every image the same embedding"):
        build_timm_backbone("vit_small_patch14_dinov2", random_init=True, global_pool="token", img_size=28,
                            depth=1, embed_dim=24, num_heads=2)


def test_exactly_one_weight_source(tmp_path):
    with pytest.raises(UserError, match="exactly one weight source"):
        build_timm_backbone("tf_efficientnet_lite0", packaged="efficientnet_lite0", random_init=True)
    with pytest.raises(UserError, match="exactly one weight source"):
        build_timm_backbone("tf_efficientnet_lite0")


def test_img_size_sets_a_cnns_input_size_and_token_pooling_on_a_cnn_is_refused(lite0):
    model, data_config = build_timm_backbone("tf_efficientnet_lite0", packaged="efficientnet_lite0",
                                             global_pool="avg", img_size=160)
    assert data_config["input_size"] == (3, 160, 160)
    assert EvalPreprocess.from_data_config(data_config).resize_short_side == 182  # floor(160 / 0.875)
    with torch.no_grad():  # the same weights as the 224 px model: only the input size differs
        x = torch.randn(2, 3, 160, 160)
        torch.testing.assert_close(model(x), lite0[0](x), rtol=0, atol=0)
    with pytest.raises(UserError, match="global_pool=avg"):
        build_timm_backbone("tf_efficientnet_lite0", packaged="efficientnet_lite0", global_pool="token")


def test_wrong_architecture_for_packaged_weights_names_the_right_one():
    with pytest.raises(UserError, match="set name=tf_efficientnet_lite0"):
        build_timm_backbone("efficientnet_lite0", packaged="efficientnet_lite0", global_pool="avg")


def test_packaged_file_is_in_the_installed_wheel():
    path = backbones.PACKAGED["efficientnet_lite0"].locate()
    assert isinstance(path, Path) and path.name == "efficientnet-lite0-57934424.pth"


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_a_garbage_local_weights_file_is_one_line_naming_it(tmp_path, suffix):
    garbage = tmp_path / f"weights{suffix}"
    garbage.write_bytes(b"not a weights file at all" * 10)
    with pytest.raises(UserError, match=r"embedding_model\.weights: .*weights") as info:
        build_timm_backbone("tf_efficientnet_lite0", weights=garbage, key_prefix="embedding_model.")
    assert str(garbage) in str(info.value) and "\n" not in str(info.value)
