"""Pieces pretrain, finetune and evaluate share: datasets, model construction, checkpoint checks, inference."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

from common.checkpoint import WEIGHTS_FILE, find_checkpoint, read_meta
from common.config import to_dict
from common.distributed import DistInfo, setup_distributed
from common.errors import UserError
from common.fingerprint import make_fingerprint
from common.runs import RunStart, open_run
from common.seed import seed_everything
from ehr_embedded.config import TrainConfig
from ehr_embedded.data import EventSequenceDataset, make_loader
from ehr_embedded.models import build_model
from ehr_embedded.storage import CODE_TABLE_DIR, CodeTable, load_dataset_table, open_split

log = logging.getLogger(__name__)
PROJECTION_KEY = "event_embedding.projection.weight"
# Config sections that decide a pretrain / finetune run's weights (`evaluate` only scores them).
WEIGHT_SECTIONS = ("model", "data", "training")
# Keys beyond common.fingerprint.VOLATILE_KEYS that may change across a resume: where the store and the pretrained
# checkpoint live (their contents are fingerprinted instead) and the batch size used only for scoring.
RESUME_VOLATILE = ("data.embedding_output_dir", "training.pretrained_checkpoint", "training.eval_batch_size")


def pick_device(name: str) -> torch.device:
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"training.device={name!r} but CUDA is not available; use training.device=cpu")
    return torch.device(name)


def run_fingerprint(cfg: TrainConfig, splits: tuple[str, ...]) -> dict:
    """What decides a pretrain / finetune run's weights: the model, data and training sections (less the keys that
    may change across a resume), the code table and every split the run trains or selects on (size and SHA-256 of
    their files), and the weights of the pretrained checkpoint a finetune run starts from."""
    store = Path(cfg.data.embedding_output_dir)
    data = {CODE_TABLE_DIR: store / CODE_TABLE_DIR, **{f"split_{s}": store / s for s in splits}}
    digests = {}
    if cfg.training.pretrained_checkpoint is not None:
        meta = read_meta(pretrained_checkpoint_dir(cfg.training.pretrained_checkpoint))
        digests["pretrained_checkpoint"] = meta["files"][WEIGHTS_FILE]["sha256"]
    sections = {k: v for k, v in to_dict(cfg).items() if k in WEIGHT_SECTIONS}
    return make_fingerprint(sections, data=data, digests=digests, volatile=RESUME_VOLATILE)


def start_run(cfg: TrainConfig, fingerprint: dict) -> tuple[Path, DistInfo, torch.device, RunStart]:
    """Shared start of pretrain and finetune: threads, seed, process group, then the resume guard.

    `common.runs.open_run` refuses (exit 2, naming what changed, nothing written) to resume a run whose
    `fingerprint` differs from the one its checkpoints record; only after that does it open `train.log` and, for a
    fresh run only, write `config.yaml`. Returns (run_dir, dist_info, device, run_start); under torchrun each
    process gets its own device.
    """
    tc = cfg.training
    if tc.num_threads:
        torch.set_num_threads(tc.num_threads)
    seed_everything(tc.seed)
    run_dir = Path(tc.output_dir)
    dist_info = setup_distributed(tc.device)  # torchrun: one process per device; alone: world size 1
    device = dist_info.device if dist_info.world_size > 1 else pick_device(tc.device)
    start = open_run(run_dir, cfg, resume=tc.resume, checkpoint_dirs=[run_dir / "checkpoints"],
                     fingerprint=fingerprint, is_main=dist_info.is_main, resume_key="training.resume")
    return run_dir, dist_info, device, start


def load_splits(cfg: TrainConfig, splits: tuple[str, ...]) -> tuple[CodeTable, dict[str, EventSequenceDataset]]:
    dataset_dir = Path(cfg.data.embedding_output_dir)
    table = load_dataset_table(dataset_dir)
    datasets = {s: EventSequenceDataset(open_split(dataset_dir, s), table, cfg.model.max_length) for s in splits}
    return table, datasets


def model_for(cfg: TrainConfig, table: CodeTable, task: str) -> torch.nn.Module:
    return build_model(cfg.model, torch.from_numpy(np.asarray(table.embeddings, np.float32)), table.lm_vocab_size,
                       task)


def checkpoint_embedding_dim(ckpt: Path) -> int | None:
    """The embedding width a checkpoint's projection was trained on (None when it has no projection)."""
    with safe_open(str(Path(ckpt) / WEIGHTS_FILE), framework="pt") as fh:
        if PROJECTION_KEY not in fh.keys():
            return None
        return int(fh.get_slice(PROJECTION_KEY).get_shape()[1])


def check_table_matches(ckpt: Path, table: CodeTable, table_dir: Path) -> None:
    """Raise UserError when the code table's width differs from what the checkpoint was trained on."""
    dim = checkpoint_embedding_dim(ckpt)
    if dim is not None and dim != table.dim:
        raise UserError(f"{table_dir}: the code table is {table.dim}-d ({table.meta.get('model_name')}) but checkpoint "
                        f"{ckpt} was trained on {dim}-d embeddings; rebuild the table with the checkpoint's text "
                        f"model or train a new model on this table")


def pretrained_checkpoint_dir(path: Path) -> Path:
    """A checkpoint dir, or a pretrain run dir (its best checkpoint), as a complete checkpoint directory."""
    path = Path(path)
    if (path / WEIGHTS_FILE).is_file():
        return find_checkpoint(path)
    best = path / "checkpoints" / "best"
    return find_checkpoint(best if best.exists() else path)


def load_pretrained(model: torch.nn.Module, path: Path, table: CodeTable, table_dir: Path) -> None:
    """Initialise from a pretrain run: every weight but the classification head must fit."""
    from safetensors.torch import load_file

    ckpt = pretrained_checkpoint_dir(path)
    check_table_matches(ckpt, table, table_dir)
    weights = load_file(str(Path(ckpt) / WEIGHTS_FILE))
    try:
        missing, unexpected = model.load_state_dict(weights, strict=False)
    except RuntimeError as exc:
        raise UserError(f"{ckpt}: pretrained weights do not fit this model ({str(exc).splitlines()[0]}); use the "
                        f"pretrain config's model section (model_dim, n_layers, n_heads, max_length)") from exc
    bad = [k for k in missing if not k.startswith("classifier.")] + list(unexpected)
    if bad:
        raise UserError(f"{ckpt}: pretrained checkpoint does not match model.type={type(model).__name__} "
                        f"(unmatched keys {bad[:4]}); pretraining initialises transformer_decoder_embedded only")
    log.info("initialised from pretrained %s (new: %s)", ckpt, missing)


@torch.no_grad()
def _score(model: torch.nn.Module, dataset: EventSequenceDataset, batch_size: int, device: torch.device, head,
           empty: np.ndarray) -> tuple[np.ndarray, float]:
    """Every sequence of `dataset` through `model` (eval mode, batches by length): `head(logits, labels)` turns one
    batch into (its outputs as a numpy array, its summed loss, how many terms that sum holds). Returns (the outputs in
    dataset order, `empty` when there are no sequences; the mean loss)."""
    model.eval()
    out = empty
    total, count = 0.0, 0
    for batch in make_loader(dataset, batch_size, shuffle=False):
        batch = {k: v.to(device) for k, v in batch.items()}
        values, loss_sum, n_terms = head(model(batch), batch["labels"])  # the classification head by default
        if out is empty:
            out = np.zeros((len(dataset), *values.shape[1:]), values.dtype)
        out[batch["index"].cpu().numpy()] = values
        total += loss_sum
        count += n_terms
    return out, total / max(count, 1)


def predict_probs(model: torch.nn.Module, dataset: EventSequenceDataset, batch_size: int,
                  device: torch.device) -> tuple[np.ndarray, np.ndarray, float]:
    """(`[N, C]` class probabilities in dataset order, `[N]` labels, mean cross-entropy)."""
    def head(logits, labels):
        loss = torch.nn.functional.cross_entropy(logits, labels, reduction="sum").item()
        return torch.softmax(logits.float(), -1).cpu().numpy(), loss, len(logits)

    probs, loss = _score(model, dataset, batch_size, device, head, np.zeros((len(dataset), 0), np.float32))
    return probs, dataset.store.labels.copy(), loss


def predict_values(model: torch.nn.Module, dataset: EventSequenceDataset, batch_size: int, device: torch.device,
                   mean: float, std: float) -> tuple[np.ndarray, np.ndarray, float]:
    """Regression (one output): (`[N]` de-standardised predictions `mean + std * output` in dataset order, `[N]`
    float64 targets, mean squared error on the standardised scale, the loss finetune trains)."""
    def head(logits, labels):
        out = logits.float()[:, 0]
        loss = torch.nn.functional.mse_loss(out, (labels.float() - mean) / std, reduction="sum").item()
        return mean + std * out.double().cpu().numpy(), loss, len(out)

    pred, loss = _score(model, dataset, batch_size, device, head, np.zeros(len(dataset), np.float64))
    return pred, dataset.store.labels.astype(np.float64), loss


def masked_bce(logits: torch.Tensor, labels: torch.Tensor, pos_weight: torch.Tensor | None = None,
               reduction: str = "mean") -> torch.Tensor:
    """Multi-label loss: binary cross-entropy with logits per (row, task) over the pairs that have a label
    (`labels` 1 / 0; -1 = that task has no label at this time and adds nothing). `pos_weight` `[K]` weighs each task's
    positives; `mean` divides by the labelled pairs, `sum` does not."""
    present = labels >= 0
    per_pair = torch.nn.functional.binary_cross_entropy_with_logits(
        logits.float(), labels.clamp(min=0).float(), pos_weight=pos_weight, reduction="none")
    total = (per_pair * present).sum()
    return total / present.sum().clamp(min=1) if reduction == "mean" else total


def predict_multilabel(model: torch.nn.Module, dataset: EventSequenceDataset, batch_size: int,
                       device: torch.device) -> tuple[np.ndarray, np.ndarray, float]:
    """Multi-label (one output per task): (`[N, K]` sigmoid probabilities in dataset order, `[N, K]` labels with -1
    where missing, the mean masked binary cross-entropy over labelled pairs)."""
    def head(logits, labels):
        logits = logits.float()
        loss = masked_bce(logits, labels, reduction="sum").item()
        return torch.sigmoid(logits).cpu().numpy(), loss, int((labels >= 0).sum())

    probs, loss = _score(model, dataset, batch_size, device, head, np.zeros(dataset.store.labels.shape, np.float32))
    return probs, dataset.store.labels.copy(), loss


TARGET_SCALING_FILE = "target_scaling.json"  # under <run>/reports/: regression target mean / std / median on train


def target_scaling(labels: np.ndarray) -> dict:
    """The train split's regression target mean, std (1 when constant) and median (the median predictor baseline)."""
    labels = np.asarray(labels, np.float64)
    std = float(labels.std())
    return {"mean": float(labels.mean()), "std": std if std > 0 else 1.0, "median": float(np.median(labels)),
            "computed_on": "train", "n": int(len(labels))}
