"""Networks of implant_dims: ViT classifiers whose embedding layer becomes a feature extractor, the attention fusion of
visual, company and model-type features, and the regressor of implant length and diameter in mm.

Images are grayscale tensors [B, 1, H, W] scaled to about [-1, 1]; every ViT is built with `in_chans=1`.

    spec = VitSpec(model_size="tiny", img_size=64)
    company = EmbeddingClassifier(spec, n_classes=12)          # trained first, then reused through .embed()
    model_type = EmbeddingClassifier(spec, n_classes=40)
    regressor = ImplantRegressor({"company": company, "model_type": model_type}, build_vit(spec), "triple")
    regressor.set_target_stats(mean=[10.5, 4.1], std=[2.0, 0.6])
    regressor.set_stage(0)                                     # head-only epochs; then 1 (half unfrozen), 2 (all)
    out = regressor(images)                                    # out["pred_mm"]: [B, 2] = (length, diameter)

Progressive unfreezing follows the original schedule (head only, then the last half of each embedding model, then
everything); `param_groups` always lists every parameter so one optimizer serves all three stages.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from implant_dims.config import ATTENTION_TYPES, VitConfig

VIT_SIZES = {"small": "vit_small_patch16_224", "base": "vit_base_patch16_224", "large": "vit_large_patch16_224"}
TINY_ARCH = "vit_tiny_patch16_224"
SINGLE_EMBEDDING_TYPES = ("concat", "triple")
EMBEDDER_NAMES = ("company", "model_type")
WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".npz")
# Parameters that never get weight decay besides biases and every 1-d tensor (norm scales and shifts).
_NO_DECAY_NAMES = ("pos_embed", "cls_token", "reg_token", "dist_token", "mask_token")


@dataclass
class VitSpec(VitConfig):
    """What `build_vit` builds: a config `vit` section (VitConfig, whose fields and checks it inherits: one source of
    truth) plus the input side. Checkpoints store `dataclasses.asdict(spec)` and rebuild with `VitSpec(**stored)`."""

    img_size: int = 64
    """Square input side in pixels, a multiple of the patch side; timm resizes pretrained position embeddings to
    it."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.img_size < 1 or self.img_size % self.grid_patch:
            raise ValueError(f"img_size ({self.img_size}) must be a positive multiple of the patch side "
                             f"({self.grid_patch})")


def build_vit(spec: VitSpec) -> nn.Module:
    """A timm VisionTransformer without classifier (`num_classes=0`), `in_chans=1`, `img_size=spec.img_size`.

    tiny is the `vit_tiny_patch16_224` family shrunk by `embed_dim` / `depth` / `num_heads` / `patch_size`; it is
    always trained from scratch, so `weights` with tiny is a ValueError. small / base / large are the timm models of
    `VIT_SIZES`; with `weights` they load that local file through `pretrained_cfg_overlay`, which lets timm resize
    the position embeddings to `img_size` and sum the three RGB patch-embedding channels into the one grayscale
    channel. Nothing is downloaded. The result's `.num_features` is its output width. The sizes themselves were
    checked when `spec` was built (VitConfig / VitSpec `__post_init__`).
    """
    import timm

    common: dict[str, Any] = dict(num_classes=0, in_chans=1, img_size=spec.img_size, drop_rate=spec.drop_rate,
                                  drop_path_rate=spec.drop_path_rate, global_pool=spec.global_pool)
    if spec.model_size == "tiny":
        if spec.weights:
            raise ValueError(f"model_size=tiny is trained from scratch and takes no weights (got {spec.weights!r}); "
                             f"use small, base or large for pretrained weights, or leave weights empty")
        model = timm.create_model(TINY_ARCH, pretrained=False, patch_size=spec.patch_size, embed_dim=spec.embed_dim,
                                  depth=spec.depth, num_heads=spec.num_heads, **common)
        if spec.stem == "conv":
            model.patch_embed.proj = conv_stem(spec.patch_size, spec.embed_dim)
        return model
    name = VIT_SIZES[spec.model_size]
    if not spec.weights:
        return timm.create_model(name, pretrained=False, **common)
    path = Path(spec.weights).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"ViT weights file {spec.weights} not found; give a local "
                                f"{' / '.join(WEIGHT_SUFFIXES)} file for {name} or leave weights empty")
    # The pretrained cfg's input_size stays (3, 224, 224): timm reads its channel count as the file's, adapts an RGB
    # patch embedding to one channel and loads an already-grayscale one (e.g. saved from build_vit) unchanged.
    overlay: dict[str, Any] = {"file": str(path)}
    if path.suffix == ".npz":  # big_vision / JAX checkpoints go through VisionTransformer.load_pretrained
        overlay["custom_load"] = True
    return timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay, **common)


def conv_stem(patch_size: int, embed_dim: int, in_chans: int = 1) -> nn.Sequential:
    """Stride-2 3x3 convolutions (BatchNorm + GELU between) whose total stride is `patch_size`, ending in
    `embed_dim` channels: a drop-in for the ViT's patch projection (timm's PatchEmbed flattens its output grid)."""
    steps = int(math.log2(patch_size))
    if patch_size < 2 or 2**steps != patch_size:
        raise ValueError(f"a conv stem needs patch_size to be a power of 2 (>= 2), got {patch_size}")
    widths = [in_chans] + [max(8, embed_dim // 2 ** (steps - i)) for i in range(1, steps)] + [embed_dim]
    layers: list[nn.Module] = []
    for i in range(steps):
        layers.append(nn.Conv2d(widths[i], widths[i + 1], 3, stride=2, padding=1, bias=i == steps - 1))
        if i < steps - 1:
            layers += [nn.BatchNorm2d(widths[i + 1]), nn.GELU()]
    return nn.Sequential(*layers)


def vit_depth(backbone: nn.Module) -> int:
    """Number of transformer blocks of a timm ViT (0 for a backbone without `.blocks`)."""
    blocks = getattr(backbone, "blocks", None)
    return len(blocks) if blocks is not None else 0


class EmbeddingClassifier(nn.Module):
    """ViT backbone -> embedding layer (Linear + LayerNorm + GELU + Dropout) -> Linear classifier.

    Trained to classify the implant's company or model type; afterwards `embed` (the embedding layer's output, the
    original's 256-d features) is what the regressors consume.
    """

    def __init__(self, spec: VitSpec, n_classes: int, embedding_dim: int = 256, dropout: float = 0.1) -> None:
        super().__init__()
        if n_classes < 1:
            raise ValueError(f"n_classes must be >= 1, got {n_classes}")
        self.spec = spec
        self.embedding_dim = embedding_dim
        self.n_classes = n_classes
        self.backbone = build_vit(spec)
        self.embedding = nn.Sequential(nn.Linear(self.backbone.num_features, embedding_dim),
                                       nn.LayerNorm(embedding_dim), nn.GELU(), nn.Dropout(dropout))
        self.classifier = nn.Linear(embedding_dim, n_classes)

    def embed(self, images: Tensor) -> Tensor:
        """images [B, 1, H, W] -> embeddings [B, embedding_dim]."""
        return self.embedding(self.backbone(images))

    def forward(self, images: Tensor) -> Tensor:
        """images [B, 1, H, W] -> class logits [B, n_classes]."""
        return self.classifier(self.embed(images))


def _projection(in_dim: int, out_dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_dim, out_dim), nn.LayerNorm(out_dim))


def _scorer(in_dim: int, hidden: int, n_out: int, dropout: float) -> nn.Sequential:
    """MLP producing the logits of a softmax over `n_out` sources."""
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, n_out))


def _weighted_sum(weights: Tensor, parts: Sequence[Tensor]) -> Tensor:
    """sum_k weights[:, k] * parts[k]; weights [B, K], parts K tensors [B, D]."""
    return (weights.unsqueeze(-1) * torch.stack(list(parts), dim=1)).sum(dim=1)


class Fusion(nn.Module):
    """Fuses visual features v [B, Dv] with the company c and model-type m embeddings [B, De] into [B, out_dim].

    Each input first goes through its own Linear + LayerNorm to `fusion_dim` (v_p, c_p, m_p). Softmax weights come
    from a small MLP (Linear, GELU, Dropout, Linear) on the concatenated projections, so they depend on the input.

    - dual: weights over (company, model) from [c_p, m_p]; out = [v_p, w_c c_p + w_m m_p]      (2 * fusion_dim)
    - triple: weights over (visual, company, model) from [v_p, c_p, m_p]; out = w_v v_p + w_c c_p + w_m m_p
      (fusion_dim). Deliberately no extra v_p bypass: the three sources compete on one footing, so the weights say
      how much each contributes ("balances all three").
    - hierarchical: e = w_c c_p + w_m m_p (weights from [c_p, m_p]); out = u_v v_p + u_e e (weights from [v_p, e])
      (fusion_dim)
    - cross: the visual token queries the tokens (visual, company, model) with nn.MultiheadAttention; residual +
      LayerNorm, then a GELU feed-forward with residual + LayerNorm; out = [v_p, attended]      (2 * fusion_dim)
    - concat: no attention, out = [v_p, c_p, m_p] (the ablation)                               (3 * fusion_dim)

    With one embedding (`n_embeddings=1`, the single-embedding baseline; call with m=None) only concat
    (out = [v_p, c_p]) and triple (weights over visual, embedding) exist; the others raise ValueError.

    `forward` returns (fused, weights): weights maps a name to a [B, k] tensor of softmax weights (rows sum to 1)
    for logging; `weight_labels` names the k columns of each.
    """

    def __init__(self, attention_type: str, visual_dim: int, embed_dim: int, fusion_dim: int = 256, n_heads: int = 4,
                 dropout: float = 0.1, n_embeddings: int = 2) -> None:
        super().__init__()
        if attention_type not in ATTENTION_TYPES:
            raise ValueError(f"attention_type must be one of {list(ATTENTION_TYPES)}, got {attention_type!r}")
        if n_embeddings not in (1, 2):
            raise ValueError(f"n_embeddings must be 1 or 2, got {n_embeddings}")
        if n_embeddings == 1 and attention_type not in SINGLE_EMBEDDING_TYPES:
            raise ValueError(f"attention_type={attention_type!r} needs both the company and the model-type embedding; "
                             f"a single embedding works with {' or '.join(SINGLE_EMBEDDING_TYPES)}")
        self.attention_type = attention_type
        self.n_embeddings = n_embeddings
        self.fusion_dim = fusion_dim
        self.v_proj = _projection(visual_dim, fusion_dim)
        self.c_proj = _projection(embed_dim, fusion_dim)
        self.m_proj = _projection(embed_dim, fusion_dim) if n_embeddings == 2 else None
        n_inputs = 1 + n_embeddings
        self.weight_labels: dict[str, tuple[str, ...]] = {}
        if attention_type == "dual":
            self.score = _scorer(2 * fusion_dim, fusion_dim, 2, dropout)
            self.weight_labels = {"company_model": ("company", "model")}
            self.out_dim = 2 * fusion_dim
        elif attention_type == "triple":
            self.score = _scorer(n_inputs * fusion_dim, fusion_dim, n_inputs, dropout)
            labels = ("visual", "company", "model") if n_embeddings == 2 else ("visual", "embedding")
            self.weight_labels = {"_".join(labels): labels}
            self.out_dim = fusion_dim
        elif attention_type == "hierarchical":
            self.score = _scorer(2 * fusion_dim, fusion_dim, 2, dropout)
            self.score_top = _scorer(2 * fusion_dim, fusion_dim, 2, dropout)
            self.weight_labels = {"company_model": ("company", "model"), "visual_embedding": ("visual", "embedding")}
            self.out_dim = fusion_dim
        elif attention_type == "cross":
            if fusion_dim % n_heads:
                raise ValueError(f"fusion_dim ({fusion_dim}) must be divisible by n_heads ({n_heads})")
            # No dropout inside the attention (its returned weights would be the dropped ones); the attended
            # vector gets dropout instead, which Monte Carlo dropout then samples.
            self.attn = nn.MultiheadAttention(fusion_dim, n_heads, dropout=0.0, batch_first=True)
            self.attn_drop = nn.Dropout(dropout)
            self.attn_norm = nn.LayerNorm(fusion_dim)
            self.ffn = nn.Sequential(nn.Linear(fusion_dim, 2 * fusion_dim), nn.GELU(), nn.Dropout(dropout),
                                     nn.Linear(2 * fusion_dim, fusion_dim))
            self.ffn_norm = nn.LayerNorm(fusion_dim)
            self.ffn_drop = nn.Dropout(dropout)
            self.weight_labels = {"cross": ("visual", "company", "model")}
            self.out_dim = 2 * fusion_dim
        else:
            self.out_dim = n_inputs * fusion_dim

    def forward(self, v: Tensor, c: Tensor, m: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        """v [B, Dv], c [B, De], m [B, De] or None -> (fused [B, out_dim], {name: softmax weights [B, k]})."""
        if (m is None) != (self.n_embeddings == 1):
            raise ValueError(f"this Fusion was built for {self.n_embeddings} embedding(s): "
                             f"{'pass m' if m is None else 'call it with m=None'}")
        v_p, c_p = self.v_proj(v), self.c_proj(c)
        parts = [v_p, c_p] if m is None else [v_p, c_p, self.m_proj(m)]
        kind = self.attention_type
        if kind == "concat":
            return torch.cat(parts, dim=-1), {}
        if kind == "triple":
            w = F.softmax(self.score(torch.cat(parts, dim=-1)), dim=-1)
            return _weighted_sum(w, parts), {next(iter(self.weight_labels)): w}
        m_p = parts[2]
        if kind == "dual":
            w = F.softmax(self.score(torch.cat([c_p, m_p], dim=-1)), dim=-1)
            return torch.cat([v_p, _weighted_sum(w, [c_p, m_p])], dim=-1), {"company_model": w}
        if kind == "hierarchical":
            w = F.softmax(self.score(torch.cat([c_p, m_p], dim=-1)), dim=-1)
            e = _weighted_sum(w, [c_p, m_p])
            u = F.softmax(self.score_top(torch.cat([v_p, e], dim=-1)), dim=-1)
            return _weighted_sum(u, [v_p, e]), {"company_model": w, "visual_embedding": u}
        tokens = torch.stack(parts, dim=1)  # [B, 3, F]: visual, company, model
        attended, attn_w = self.attn(v_p.unsqueeze(1), tokens, tokens, need_weights=True, average_attn_weights=True)
        x = self.attn_norm(v_p + self.attn_drop(attended.squeeze(1)))
        x = self.ffn_norm(x + self.ffn_drop(self.ffn(x)))
        return torch.cat([v_p, x], dim=-1), {"cross": attn_w.squeeze(1)}


class ImplantRegressor(nn.Module):
    """Company and model-type embedders + a visual ViT -> Fusion -> MLP head predicting (length, diameter) in mm.

    `embedders` maps "company" and/or "model_type" to trained EmbeddingClassifiers (only their `embed` is used);
    a single one is the single-embedding baseline (Fusion then supports concat and triple). `visual` is any module
    images [B, 1, H, W] -> [B, visual.num_features], normally `build_vit(...)`.

    The head works in standardised units: `pred_std` is (y - target_mean) / target_std, `pred_mm` the same in mm.
    `target_mean` / `target_std` are buffers (saved in checkpoints), set with `set_target_stats` from training
    targets. With `n_thread_classes > 0` an auxiliary Linear head gives thread-type logits from the fused features.

    Until `set_stage` is called every parameter trains.
    """

    def __init__(self, embedders: dict[str, EmbeddingClassifier], visual: nn.Module, attention_type: str = "triple",
                 fusion_dim: int = 256, head_hidden: int = 256, dropout: float = 0.1, n_thread_classes: int = 0,
                 n_heads: int = 4) -> None:
        super().__init__()
        unknown = sorted(set(embedders) - set(EMBEDDER_NAMES))
        if unknown or not embedders:
            raise ValueError(f"embedders must map some of {list(EMBEDDER_NAMES)} to EmbeddingClassifiers, "
                             f"got {sorted(embedders)}")
        names = [name for name in EMBEDDER_NAMES if name in embedders]
        dims = {name: embedders[name].embedding_dim for name in names}
        if len(set(dims.values())) != 1:
            raise ValueError(f"the embedders must share one embedding_dim, got {dims}")
        if not hasattr(visual, "num_features"):
            raise ValueError("visual must expose .num_features (its output width), as timm models do")
        self.embedder_names = tuple(names)
        self.embedders = nn.ModuleDict({name: embedders[name] for name in names})
        self.visual = visual
        self.fusion = Fusion(attention_type, int(visual.num_features), dims[names[0]], fusion_dim, n_heads, dropout,
                             n_embeddings=len(names))
        self.head = nn.Sequential(nn.Linear(self.fusion.out_dim, head_hidden), nn.GELU(), nn.Dropout(dropout),
                                  nn.Linear(head_hidden, 2))
        self.n_thread_classes = n_thread_classes
        self.thread_head = nn.Linear(self.fusion.out_dim, n_thread_classes) if n_thread_classes > 0 else None
        self.register_buffer("target_mean", torch.zeros(2))
        self.register_buffer("target_std", torch.ones(2))
        self.stage: int | None = None
        self._frozen_modules: list[str] = []  # submodules kept in eval mode whatever train() is asked

    # -- targets ---------------------------------------------------------------------------------------------------

    def set_target_stats(self, mean: Sequence[float] | Tensor, std: Sequence[float] | Tensor) -> None:
        """Standardisation of (length, diameter): mean and std in mm, each of 2 values, std > 0."""
        mean_t = torch.as_tensor(mean, dtype=torch.float32).reshape(-1)
        std_t = torch.as_tensor(std, dtype=torch.float32).reshape(-1)
        if mean_t.numel() != 2 or std_t.numel() != 2:
            raise ValueError(f"target mean and std need 2 values (length, diameter), got {mean_t.tolist()} and "
                             f"{std_t.tolist()}")
        if not (torch.isfinite(mean_t).all() and torch.isfinite(std_t).all() and (std_t > 0).all()):
            raise ValueError(f"target stats must be finite with std > 0, got mean {mean_t.tolist()} std "
                             f"{std_t.tolist()}")
        self.target_mean.copy_(mean_t)
        self.target_std.copy_(std_t)

    def standardise(self, targets_mm: Tensor) -> Tensor:
        """[B, 2] mm -> standardised units (the loss compares these with `pred_std`)."""
        return (targets_mm - self.target_mean) / self.target_std

    # -- forward ---------------------------------------------------------------------------------------------------

    def features(self, images: Tensor) -> dict[str, Tensor]:
        """The expensive part: {"visual": [B, Dv]} plus {"company" / "model_type": [B, De]} for each embedder."""
        feats = {"visual": self.visual(images)}
        for name in self.embedder_names:
            feats[name] = self.embedders[name].embed(images)
        return feats

    def forward_features(self, feats: dict[str, Tensor]) -> dict[str, Any]:
        """Fusion and heads on `features()` output (cached or fresh).

        Returns {"pred_mm": [B, 2], "pred_std": [B, 2], "weights": {name: [B, k]}} and "thread_logits"
        [B, n_thread_classes] when the thread head exists.
        """
        embeddings = [feats[name] for name in self.embedder_names]
        fused, weights = self.fusion(feats["visual"], embeddings[0], embeddings[1] if len(embeddings) > 1 else None)
        pred_std = self.head(fused)
        out: dict[str, Any] = {"pred_std": pred_std, "pred_mm": pred_std * self.target_std + self.target_mean,
                               "weights": weights}
        if self.thread_head is not None:
            out["thread_logits"] = self.thread_head(fused)
        return out

    def forward(self, images: Tensor) -> dict[str, Any]:
        """images [B, 1, H, W] -> `forward_features(features(images))`."""
        return self.forward_features(self.features(images))

    # -- progressive unfreezing --------------------------------------------------------------------------------------

    def train(self, mode: bool = True) -> ImplantRegressor:
        """As nn.Module.train, but frozen feature-extractor parts stay in eval mode (deterministic features)."""
        super().train(mode)
        for name in self._frozen_modules:
            self.get_submodule(name).eval()
        return self

    def set_stage(self, stage: int, half_fraction: float = 0.5, visual_frozen_in_stage0: bool = True) -> None:
        """Progressive unfreezing (the original: head only, then half of each embedding model, then everything).

        stage 0: the embedders are frozen (requires_grad False, kept in eval mode so their dropout / stochastic depth
        is off and cached features stay valid); the visual backbone likewise iff `visual_frozen_in_stage0`; the
        fusion and heads train.
        stage 1: in each embedder the last ceil(half_fraction * depth) blocks, the final norm and the embedding layer
        train; the patch embedding, position embedding, cls token and earlier blocks stay frozen (and in eval mode);
        the visual backbone trains.
        stage 2: everything trains.
        Each embedder's classifier layer (unused here) trains only in stage 2.
        """
        if stage not in (0, 1, 2):
            raise ValueError(f"stage must be 0, 1 or 2, got {stage}")
        if not 0.0 <= half_fraction <= 1.0:
            raise ValueError(f"half_fraction must lie in [0, 1], got {half_fraction}")
        self.requires_grad_(True)
        frozen: list[str] = []
        if stage == 0:
            for name in self.embedder_names:
                self.embedders[name].requires_grad_(False)
                frozen.append(f"embedders.{name}")
            if visual_frozen_in_stage0:
                self.visual.requires_grad_(False)
                frozen.append("visual")
        elif stage == 1:
            for name in self.embedder_names:
                frozen.extend(self._freeze_embedder_prefix(name, half_fraction))
        self.stage = stage
        self._frozen_modules = frozen
        self.train(self.training)

    def _freeze_embedder_prefix(self, name: str, half_fraction: float) -> list[str]:
        """Freeze all of embedder `name` but its last blocks, final norms and embedding layer; the frozen modules."""
        embedder = self.embedders[name]
        backbone = embedder.backbone
        depth = vit_depth(backbone)
        if depth == 0:
            raise ValueError(f"embedder {name!r}: partial unfreezing needs a ViT backbone with .blocks")
        n_train = min(depth, math.ceil(half_fraction * depth))
        embedder.requires_grad_(False)
        for block in list(backbone.blocks)[depth - n_train:]:
            block.requires_grad_(True)
        for attr in ("norm", "fc_norm", "attn_pool", "head"):
            module = getattr(backbone, attr, None)
            if isinstance(module, nn.Module):
                module.requires_grad_(True)
        embedder.embedding.requires_grad_(True)
        prefix = f"embedders.{name}.backbone"
        frozen = [f"embedders.{name}.classifier"]
        for attr in ("patch_embed", "pos_drop", "patch_drop", "norm_pre"):
            if isinstance(getattr(backbone, attr, None), nn.Module):
                frozen.append(f"{prefix}.{attr}")
        frozen.extend(f"{prefix}.blocks.{i}" for i in range(depth - n_train))
        return frozen

    def _feature_modules(self) -> list[nn.Module]:
        """The modules `features()` runs: the visual backbone and each embedder's backbone and embedding layer."""
        mods: list[nn.Module] = [self.visual]
        for name in self.embedder_names:
            mods.extend([self.embedders[name].backbone, self.embedders[name].embedding])
        return mods

    @property
    def frozen_feature_parts(self) -> bool:
        """True when nothing `features()` computes has a trainable parameter and all of it runs in eval mode, so its
        output can be computed once and cached (stage 0 with the visual backbone frozen)."""
        for module in self._feature_modules():
            if any(p.requires_grad for p in module.parameters()):
                return False
            if any(m.training for m in module.modules()):
                return False
        return True

    # -- optimizer ---------------------------------------------------------------------------------------------------

    def param_groups(self, base_lr: float, embedder_lr_mult: float = 0.1, visual_lr_mult: float = 1.0,
                     weight_decay: float = 0.05) -> list[dict[str, Any]]:
        """AdamW parameter groups over ALL parameters (frozen ones included, so the optimizer's layout is the same in
        every stage; frozen parameters get no gradient and AdamW skips them).

        head (fusion + heads) at base_lr, embedders at base_lr * embedder_lr_mult, visual at base_lr * visual_lr_mult;
        each split into a decayed group and a `_no_decay` one (biases, 1-d norm parameters, position embeddings, cls /
        register tokens). Empty groups are left out; each group carries "name" and "lr_mult".
        """
        parts = {"head": (1.0, [self.fusion, self.head] + ([self.thread_head] if self.thread_head is not None else [])),
                 "embedders": (embedder_lr_mult, [self.embedders]),
                 "visual": (visual_lr_mult, [self.visual])}
        groups: list[dict[str, Any]] = []
        seen: set[int] = set()
        for group_name, (mult, modules) in parts.items():
            decay, no_decay = [], []
            for module in modules:
                for pname, param in module.named_parameters():
                    if id(param) in seen:
                        continue
                    seen.add(id(param))
                    leaf = pname.rsplit(".", 1)[-1]
                    if param.ndim <= 1 or leaf == "bias" or leaf in _NO_DECAY_NAMES:
                        no_decay.append(param)
                    else:
                        decay.append(param)
            for suffix, params, wd in (("", decay, weight_decay), ("_no_decay", no_decay, 0.0)):
                if params:
                    groups.append({"params": params, "lr": base_lr * mult, "weight_decay": wd, "lr_mult": mult,
                                   "name": group_name + suffix})
        missing = [n for n, p in self.named_parameters() if id(p) not in seen]
        if missing:  # a parameter registered outside fusion / heads / embedders / visual
            raise RuntimeError(f"param_groups: parameters outside the known parts: {missing[:5]}")
        return groups


# -- Monte Carlo dropout --------------------------------------------------------------------------------------------

_DROPOUT_TYPES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)


def enable_mc_dropout(model: nn.Module) -> None:
    """Everything in eval mode except the dropout layers (nn.Dropout and its 1d/2d/3d/alpha kin), which sample.

    Stochastic depth (timm DropPath) stays off.
    """
    model.eval()
    for module in model.modules():
        if isinstance(module, _DROPOUT_TYPES):
            module.train()


def _has_active_dropout(module: nn.Module) -> bool:
    return any(isinstance(m, _DROPOUT_TYPES) and m.training and m.p > 0 for m in module.modules())


@torch.no_grad()
def mc_dropout_predict(model: ImplantRegressor, images: Tensor, n_samples: int = 20,
                       generator_seed: int | None = 0) -> tuple[Tensor, Tensor]:
    """Mean and std in mm [B, 2] of `n_samples` forward passes with dropout sampling (`enable_mc_dropout`).

    When no dropout of the feature extractors is active (ViT drop_rate 0 and embedder dropout 0), the features are
    computed once and only fusion + head are resampled; otherwise every pass reruns the whole model. With ViT
    drop_rate = 0 the uncertainty comes from the fusion / head dropout and the embedders' embedding-layer dropout.
    The std is the sample std (unbiased; 0 for n_samples = 1). `generator_seed` makes the draws repeatable without
    touching the global RNG stream (None draws from it). Each module's train/eval mode is restored afterwards.
    """
    if n_samples < 1:
        raise ValueError(f"n_samples must be >= 1, got {n_samples}")
    modes = {name: module.training for name, module in model.named_modules()}
    try:
        enable_mc_dropout(model)
        devices = [images.device] if images.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices, enabled=generator_seed is not None):
            if generator_seed is not None:
                torch.manual_seed(generator_seed)
            resample_features = any(_has_active_dropout(m) for m in model._feature_modules())
            feats = None if resample_features else model.features(images)
            preds = []
            for _ in range(n_samples):
                out = model(images) if resample_features else model.forward_features(feats)
                preds.append(out["pred_mm"].float())
        stacked = torch.stack(preds)
        std = stacked.std(dim=0, correction=1) if n_samples > 1 else torch.zeros_like(stacked[0])
        return stacked.mean(dim=0), std
    finally:
        for name, module in model.named_modules():
            module.training = modes[name]
