"""What the publish stages share: Auto-class registration, loading a published directory, head shapes, and the
float32 embeddings parquet they write.

    from building_embed.publish.hub import load_published
    model = load_published("published/")            # SpatialEmbeddingsModel in eval mode (trust_remote_code)
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from transformers import AutoConfig, AutoModel

from building_embed.publish.configuration_spatial_embeddings import SpatialEmbeddingsConfig
from building_embed.publish.modeling_spatial_embeddings import SpatialEmbeddingsModel
from common.errors import UserError

AutoConfig.register(SpatialEmbeddingsConfig.model_type, SpatialEmbeddingsConfig, exist_ok=True)
AutoModel.register(SpatialEmbeddingsConfig, SpatialEmbeddingsModel, exist_ok=True)

EMBEDDING = "embedding"
PUBLISH_META_KEY = b"building_embed_publish"
HEAD_KEYS = {"net.0.weight": ("input_dim",), "net.0.bias": ("input_dim",),
             "net.1.weight": ("hidden_dim", "input_dim"), "net.1.bias": ("hidden_dim",),
             "net.4.weight": ("output_dim", "hidden_dim"), "net.4.bias": ("output_dim",)}
"""The projection head's state dict: key -> the config width behind each axis of its shape."""


class IntermixedParser(argparse.ArgumentParser):
    """A parser whose positionals may come before and after options (`CKPT OUT --config F key=value`)."""

    def parse_args(self, args=None, namespace=None):  # type: ignore[override]
        return self.parse_intermixed_args(args, namespace)


def head_dims(shapes: dict[str, tuple[int, ...]], source: str) -> dict[str, int]:
    """{input_dim, hidden_dim, output_dim} read off a head state dict's tensor shapes; UserError when the keys are not
    a projection head's or the shapes contradict each other."""
    missing, extra = sorted(set(HEAD_KEYS) - set(shapes)), sorted(set(shapes) - set(HEAD_KEYS))
    if missing or extra:
        raise UserError(f"{source}: not a projection head state dict (missing {missing}, unexpected {extra[:5]}); "
                        "pass the trainer's checkpoints/best directory or its model.safetensors")
    dims: dict[str, int] = {}
    for key, names in HEAD_KEYS.items():
        if len(shapes[key]) != len(names):
            raise UserError(f"{source}: {key} has shape {list(shapes[key])}, expected {len(names)} axes")
        for name, size in zip(names, shapes[key]):
            if dims.setdefault(name, int(size)) != size:
                raise UserError(f"{source}: {key} has {name} {size} but other tensors say {dims[name]}")
    return dims


def load_published(model_dir: str | Path) -> SpatialEmbeddingsModel:
    """The published model in eval mode, loaded as a user would: AutoModel + trust_remote_code, local files only."""
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise UserError(f"{model_dir}: no config.json; pass a directory written by "
                        "python -m building_embed.publish.convert_to_hf")
    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    if config.get("model_type") != SpatialEmbeddingsConfig.model_type:
        raise UserError(f"{model_dir}/config.json: model_type {config.get('model_type')!r}, expected "
                        f"{SpatialEmbeddingsConfig.model_type!r}; pass a directory written by convert_to_hf")
    model = AutoModel.from_pretrained(str(model_dir), trust_remote_code=True, local_files_only=True)
    return model.eval()


@torch.inference_mode()
def apply_head(model: torch.nn.Module, embeddings: np.ndarray, batch_size: int = 4096) -> np.ndarray:
    """float32 [N, output_dim] head outputs of backbone embeddings [N, input_dim], in row order."""
    out = [model(torch.from_numpy(np.ascontiguousarray(embeddings[i:i + batch_size], np.float32))).embeddings.numpy()
           for i in range(0, len(embeddings), batch_size)]
    return np.concatenate(out) if out else np.zeros((0, model.config.output_dim), np.float32)


def require_width(embeddings: np.ndarray, expected: int, source: str | Path, model_dir: str | Path) -> None:
    """UserError naming both widths when stored embeddings do not fit the head's input_dim."""
    if embeddings.ndim != 2 or embeddings.shape[1] != expected:
        width = embeddings.shape[1] if embeddings.ndim == 2 else list(embeddings.shape)
        raise UserError(f"{source}: embeddings of width {width}, but the model in {model_dir} expects input_dim "
                        f"{expected}; embed with the backbone the head was trained on (its config.json names it)")


def embeddings_table(ids: pa.Table, embeddings: np.ndarray, metadata: dict) -> pa.Table:
    """ids + float32 [N, D] `embedding` column; the schema metadata `building_embed_publish` records `metadata`."""
    n, dim = embeddings.shape
    flat = pa.array(np.ascontiguousarray(embeddings, np.float32).reshape(-1), type=pa.float32())
    column = pa.FixedSizeListArray.from_arrays(flat, dim) if n else pa.array([], pa.list_(pa.float32(), dim))
    table = ids.append_column(EMBEDDING, column)
    return table.replace_schema_metadata({PUBLISH_META_KEY: json.dumps(metadata, sort_keys=True).encode()})


def read_output(path: str | Path) -> tuple[pa.Table, np.ndarray]:
    """(id columns, float32 [N, D]) of a parquet written by the publish stages."""
    table = pq.read_table(path)
    column = table.column(EMBEDDING).combine_chunks()
    values = column.flatten().to_numpy(zero_copy_only=False).astype(np.float32)
    return table.drop_columns([EMBEDDING]), values.reshape(len(table), column.type.list_size)
