"""Hugging Face configuration of the published building embedding model (the projection head).

Self-contained on purpose: `convert_to_hf` copies this file into the published directory, and
`AutoConfig.from_pretrained(dir, trust_remote_code=True)` imports it from there, without building_embed installed.

    config = SpatialEmbeddingsConfig(input_dim=768, hidden_dim=512, output_dim=256,
                                     backbone_name="vit_base_patch14_dinov2", img_size=224, global_pool="token")
"""

from __future__ import annotations

from typing import Any

from transformers import PretrainedConfig


class SpatialEmbeddingsConfig(PretrainedConfig):
    """Widths of the projection head (backbone embedding [B, input_dim] -> unit-length [B, output_dim]) and, as
    metadata, the frozen backbone whose embeddings it expects (the head means nothing on any other backbone's)."""

    model_type = "spatial_embeddings"

    def __init__(self, input_dim: int = 768, hidden_dim: int = 512, output_dim: int = 256, dropout: float = 0.1,
                 backbone_backend: str = "timm", backbone_name: str = "vit_base_patch14_dinov2", img_size: int = 224,
                 global_pool: str = "token", backbone_kwargs: dict[str, Any] | None = None,
                 training_info: dict[str, Any] | None = None, **kwargs: Any) -> None:
        self.input_dim = int(input_dim)
        self.hidden_dim = int(hidden_dim)
        self.output_dim = int(output_dim)
        self.dropout = float(dropout)
        self.backbone_backend = backbone_backend
        """timm or transformers: how the backbone that produced input embeddings was built."""
        self.backbone_name = backbone_name
        """timm model name of the backbone (e.g. vit_base_patch14_dinov2)."""
        self.img_size = int(img_size)
        """Square image side the backbone was run at."""
        self.global_pool = global_pool
        """Backbone token pooling: token (CLS) or avg."""
        self.backbone_kwargs = dict(backbone_kwargs or {})
        """Extra timm builder arguments of the backbone (tiny test models)."""
        self.training_info = dict(training_info or {})
        """Where the weights came from (checkpoint file SHA-256, epoch)."""
        super().__init__(**kwargs)


SpatialEmbeddingsConfig.register_for_auto_class()
