"""Two-branch fusion regressors of log price from a CLIP image embedding and a text embedding + structural features.

Both models take
    image      [B, D_img] float  CLIP image embedding (any values where the image is missing)
    has_image  [B] bool          True where the image exists; False routes a learned "missing image" vector instead
    text       [B, D_txt] float  sentence embedding of catalog_content
    struct     [B, S] float      structural features (data.structural: quantities, with the unit one-hot, or legacy)
and return log price [B] (natural log of dollars). Built by `build_model(cfg.model, ...)`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from common.errors import UserError

from .config import ModelConfig

# Initial value of the learnable scale that multiplies the L2-normalised embeddings: unit vectors have entries of
# size ~1/sqrt(D); a scale near sqrt(D)/2 puts them back on the ~unit scale the first Linear layer expects.
INIT_SCALE_FACTOR = 0.5


class ScaledL2Norm(nn.Module):
    """x -> scale * x / ||x||, with a learnable scalar `scale` (the embedding parts only, never the struct features)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(INIT_SCALE_FACTOR * dim ** 0.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * F.normalize(x, dim=-1, eps=1e-8)


def mlp(dims: list[int], dropout: float) -> nn.Sequential:
    """Linear -> LayerNorm -> GELU -> Dropout for each consecutive pair of `dims`."""
    layers: list[nn.Module] = []
    for d_in, d_out in zip(dims[:-1], dims[1:]):
        layers += [nn.Linear(d_in, d_out), nn.LayerNorm(d_out), nn.GELU(), nn.Dropout(dropout)]
    return nn.Sequential(*layers)


class FusionBranches(nn.Module):
    """Image branch (D_img -> H) and text branch (D_txt + S -> H); a missing image gets a learned vector."""

    def __init__(self, image_dim: int, text_dim: int, struct_dim: int, branch_dim: int, dropout: float) -> None:
        super().__init__()
        self.image_dim, self.text_dim, self.struct_dim = image_dim, text_dim, struct_dim
        self.image_norm = ScaledL2Norm(image_dim)
        self.text_norm = ScaledL2Norm(text_dim)
        self.image_branch = mlp([image_dim, branch_dim], dropout)
        self.text_branch = mlp([text_dim + struct_dim, branch_dim], dropout)
        self.missing_image = nn.Parameter(torch.zeros(branch_dim))
        # Standardisation of the structural features, fitted on the training split (saved with the weights).
        self.register_buffer("struct_mean", torch.zeros(struct_dim))
        self.register_buffer("struct_std", torch.ones(struct_dim))

    def set_struct_stats(self, struct: torch.Tensor) -> None:
        """Fit the struct standardisation on the training rows [N, S]."""
        self.struct_mean.copy_(struct.mean(0))
        self.struct_std.copy_(struct.std(0).clamp_min(1e-6) if len(struct) > 1 else torch.ones_like(self.struct_std))

    def forward(self, image: torch.Tensor, has_image: torch.Tensor, text: torch.Tensor,
                struct: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (image_h [B, H], text_h [B, H])."""
        struct = (struct - self.struct_mean) / self.struct_std
        text_h = self.text_branch(torch.cat([self.text_norm(text), struct], dim=-1))
        image_h = self.image_branch(self.image_norm(image))
        image_h = torch.where(has_image[:, None], image_h, self.missing_image.expand_as(image_h))
        return image_h, text_h


class TwoBranchFusionModel(nn.Module):
    """Concatenate the two branches (2H) and regress: 2H -> head_dims... -> 1."""

    def __init__(self, image_dim: int, text_dim: int, struct_dim: int = 3, branch_dim: int = 512,
                 head_dims: tuple[int, ...] = (512, 256, 128), dropout: float = 0.2) -> None:
        super().__init__()
        self.branches = FusionBranches(image_dim, text_dim, struct_dim, branch_dim, dropout)
        self.head = nn.Sequential(mlp([2 * branch_dim, *head_dims], dropout), nn.Linear(head_dims[-1], 1))

    def forward(self, image, has_image, text, struct) -> torch.Tensor:
        image_h, text_h = self.branches(image, has_image, text, struct)
        return self.head(torch.cat([image_h, text_h], dim=-1)).squeeze(-1)

    def aux_loss(self) -> torch.Tensor:
        return torch.zeros(())


class AdvancedMoEFusionModel(nn.Module):
    """Branches -> attention across the 2 modality tokens of each sample -> gated mixture of experts.

    The attention sequence is [image_h, text_h] of one sample ([B, 2, H]), so no sample sees another and a
    prediction does not depend on the batch it is in. The gate is a softmax over `num_experts` regression heads;
    `aux_loss()` returns the load-balancing term of the last forward (0 when the batch-mean gate is uniform).
    """

    def __init__(self, image_dim: int, text_dim: int, struct_dim: int = 3, branch_dim: int = 512,
                 head_dims: tuple[int, ...] = (512, 256, 128), dropout: float = 0.2, num_experts: int = 3,
                 num_heads: int = 8) -> None:
        super().__init__()
        self.branches = FusionBranches(image_dim, text_dim, struct_dim, branch_dim, dropout)
        self.modality_embedding = nn.Parameter(torch.zeros(2, branch_dim))
        self.attention = nn.MultiheadAttention(branch_dim, num_heads, dropout=dropout, batch_first=True)
        self.attention_norm = nn.LayerNorm(branch_dim)
        self.gate = nn.Linear(2 * branch_dim, num_experts)
        self.experts = nn.ModuleList(
            nn.Sequential(mlp([2 * branch_dim, *head_dims], dropout), nn.Linear(head_dims[-1], 1))
            for _ in range(num_experts))
        self.num_experts = num_experts
        self._last_gate_mean: torch.Tensor | None = None

    def forward(self, image, has_image, text, struct) -> torch.Tensor:
        image_h, text_h = self.branches(image, has_image, text, struct)
        tokens = torch.stack([image_h, text_h], dim=1) + self.modality_embedding  # [B, 2, H]
        attended, _ = self.attention(tokens, tokens, tokens, need_weights=False)
        fused = self.attention_norm(tokens + attended).flatten(1)  # [B, 2H]
        gate = torch.softmax(self.gate(fused), dim=-1)  # [B, E]
        expert_out = torch.cat([expert(fused) for expert in self.experts], dim=-1)  # [B, E]
        self._last_gate_mean = gate.mean(0)
        return (gate * expert_out).sum(-1)

    def aux_loss(self) -> torch.Tensor:
        """E * sum_e mean_gate_e^2 - 1: 0 for a balanced batch-mean gate, up to E - 1 when one expert takes all."""
        if self._last_gate_mean is None:
            return torch.zeros(())
        return self.num_experts * (self._last_gate_mean ** 2).sum() - 1.0


FusionModel = TwoBranchFusionModel | AdvancedMoEFusionModel


def build_model(cfg: ModelConfig, image_dim: int, text_dim: int, struct_dim: int) -> FusionModel:
    """Build the configured model for embeddings of the given dims.

    Raises `UserError` naming both numbers when the config states dims that the embeddings do not have
    (null config dims are taken from the embeddings).
    """
    for key, wanted, found in (("image_dim", cfg.image_dim, image_dim), ("text_dim", cfg.text_dim, text_dim),
                               ("struct_dim", cfg.struct_dim, struct_dim)):
        if wanted is not None and wanted != found:
            raise UserError(f"model.{key}={wanted} but the embeddings are {found}-d; set model.{key}={found} "
                            f"(or null to take it from the embeddings), or re-embed with the matching encoder")
    common = dict(image_dim=image_dim, text_dim=text_dim, struct_dim=struct_dim, branch_dim=cfg.branch_dim,
                  head_dims=tuple(cfg.head_dims), dropout=cfg.dropout)
    if cfg.name == "advanced_moe":
        return AdvancedMoEFusionModel(**common, num_experts=cfg.num_experts, num_heads=cfg.num_heads)
    return TwoBranchFusionModel(**common)


def init_output_bias(model: FusionModel, mean_log_price: float) -> None:
    """Start every regression head at the mean training log price, so epoch 0 predicts the geometric mean."""
    heads = model.experts if isinstance(model, AdvancedMoEFusionModel) else [model.head]
    with torch.no_grad():
        for head in heads:
            head[-1].bias.fill_(mean_log_price)


def load_trained_model(ckpt_dir) -> tuple[FusionModel, dict]:
    """Rebuild the network a checkpoint was trained with (from its meta.json) and load its weights; eval mode."""
    from common.checkpoint import find_checkpoint, load_weights, read_meta

    ckpt = find_checkpoint(ckpt_dir)
    meta = read_meta(ckpt)
    if "model" not in meta:
        raise UserError(f"{ckpt}: meta.json has no 'model' entry; not a price_fusion checkpoint")
    model = build_model(ModelConfig(**meta["model"]), meta["image_dim"], meta["text_dim"], meta["struct_dim"])
    load_weights(ckpt, model)
    return model.eval(), meta
