"""Export the patient representation a finetuned run's classification head reads, one row per label, as parquet.

    python -m ehr_embedded.represent run_dir=runs/ehr_embedded/mimic/finetune_encoder            # train, tuning, held_out
    python -m ehr_embedded.represent run_dir=runs/ehr_embedded/sample/finetune_decoder split=held_out \
        dataset_dir=runs/ehr_embedded/new/patients output=runs/ehr_embedded/new/held_out_repr.parquet

The representation is `model.encode(batch)`: for the encoder the final hidden states pooled over non-padding events
(`model.pooling`), for the decoder the state of the last real event; the classifier is one linear layer on it, so
`classifier(representation)` gives the run's own logits. Columns: subject_id int64, prediction_time timestamp[us],
label int64 (the stored class id; for a multi-label store a fixed-size list of K int8, -1 = no label),
representation fixed_size_list<float32>[D] (D = model.model_dim). The schema metadata key `ehr_embedded.represent`
holds the run, checkpoint, split, model type and D as JSON. Default output: `<run_dir>/representations/<split>.parquet`
(what `python -m ehr_embedded.linear_probe run_dir=RUN` reads).
The run is loaded by `predict.load_run` (its own config.yaml; the code table is checked against the checkpoint).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from common.cli import config_main
from common.errors import UserError
from common.io import atomic_write
from common.logs import setup_logging
from ehr_embedded.config import RepresentConfig
from ehr_embedded.data import EventSequenceDataset, make_loader
from ehr_embedded.engine import pick_device
from ehr_embedded.storage import label_array, open_split

log = logging.getLogger(__name__)
SPLITS = ("train", "tuning", "held_out")
META_KEY = b"ehr_embedded.represent"
REPRESENTATION_COLUMN = "representation"


@torch.no_grad()
def representations(model: torch.nn.Module, dataset: EventSequenceDataset, batch_size: int,
                    device: torch.device) -> np.ndarray:
    """`[N, D]` float32 `model.encode(batch)` in dataset order (batches as evaluate forms them)."""
    if not hasattr(model, "encode"):
        raise UserError(f"{type(model).__name__} has no encode(); represent exports encoder and decoder runs")
    model.eval()
    out = None
    for batch in make_loader(dataset, batch_size, shuffle=False):
        batch = {k: v.to(device) for k, v in batch.items()}
        pooled = model.encode(batch).float().cpu().numpy()
        if out is None:
            out = np.zeros((len(dataset), pooled.shape[1]), np.float32)
        out[batch["index"].cpu().numpy()] = pooled
    return out


def representation_table(sequences: pd.DataFrame, labels: np.ndarray, reps: np.ndarray, meta: dict) -> pa.Table:
    flat = pa.array(np.ascontiguousarray(reps, np.float32).reshape(-1), pa.float32())
    table = pa.table({"subject_id": sequences["subject_id"].to_numpy(np.int64),
                      "prediction_time": sequences["prediction_time"].astype("datetime64[us]").to_numpy(),
                      "label": label_array(labels if np.ndim(labels) == 2 else np.asarray(labels, np.int64)),
                      REPRESENTATION_COLUMN: pa.FixedSizeListArray.from_arrays(flat, reps.shape[1])})
    return table.replace_schema_metadata({META_KEY: json.dumps(meta).encode()})


def export_split(run_dir: Path, split: str, dataset_dir: Path | None = None, checkpoint: str = "best",
                 output: Path | None = None, batch_size: int = 64, device: str = "cpu", loaded=None) -> Path:
    """Write one split's representations; returns the parquet path. `loaded` reuses a `predict.load_run` result."""
    from ehr_embedded.predict import load_run  # predict is heavy; keep this module light to import

    model, cfg, table, _ = loaded or load_run(run_dir, checkpoint, dataset_dir, device)
    store_dir = Path(dataset_dir) if dataset_dir is not None else Path(cfg.data.embedding_output_dir)
    store = open_split(store_dir, split)
    if len(store) == 0:
        raise UserError(f"{store_dir}/{split}: no sequences to represent; pick another split or rebuild the store")
    dataset = EventSequenceDataset(store, table, cfg.model.max_length)
    reps = representations(model, dataset, batch_size, pick_device(device))
    meta = {"run_dir": str(run_dir), "checkpoint": checkpoint, "split": split, "dataset_dir": str(store_dir),
            "model_type": cfg.model.type, "pooling": cfg.model.pooling if "encoder" in cfg.model.type else "last_event",
            "dim": int(reps.shape[1]), "num_classes": int(cfg.model.num_classes)}
    out = Path(output) if output is not None else Path(run_dir) / "representations" / f"{split}.parquet"
    arrow = representation_table(store.sequences, store.labels, reps, meta)
    atomic_write(out, lambda tmp: pq.write_table(arrow, tmp))
    log.info("%s: %d representations of dimension %d -> %s", split, len(reps), reps.shape[1], out)
    return out


def represent(cfg: RepresentConfig) -> list[Path]:
    from ehr_embedded.predict import load_run

    loaded = load_run(cfg.run_dir, cfg.checkpoint, cfg.dataset_dir, cfg.device)
    splits = SPLITS if cfg.split == "all" else (cfg.split,)
    return [export_split(cfg.run_dir, s, cfg.dataset_dir, cfg.checkpoint, cfg.output, cfg.batch_size, cfg.device,
                         loaded=loaded) for s in splits]


def read_representations(path: Path) -> tuple[pd.DataFrame, np.ndarray, dict]:
    """(frame with subject_id, prediction_time, label; `[N, D]` float32; the writer's metadata) of one file.

    Raises UserError for a missing or unreadable file, missing columns, or non-finite values (naming the row).
    """
    from common.io import require_finite

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: representations file not found; write it with `python -m ehr_embedded.represent "
                        f"run_dir=RUN` (or fix the path)")
    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowException) as exc:
        raise UserError(f"{path}: cannot read parquet ({exc}); re-run ehr_embedded.represent") from exc
    missing = [c for c in ("subject_id", "prediction_time", "label", REPRESENTATION_COLUMN) if c not in table.column_names]
    if missing:
        raise UserError(f"{path}: missing column(s) {missing}; expected the output of ehr_embedded.represent "
                        f"(subject_id, prediction_time, label, {REPRESENTATION_COLUMN})")
    column = table.column(REPRESENTATION_COLUMN).combine_chunks()
    if not pa.types.is_fixed_size_list(column.type):
        raise UserError(f"{path}: column '{REPRESENTATION_COLUMN}' is {column.type}, expected a fixed-size list of "
                        f"floats (one vector of equal length per row)")
    x = column.flatten().to_numpy(zero_copy_only=False).astype(np.float32).reshape(len(table), column.type.list_size)
    frame = table.select(["subject_id", "prediction_time", "label"]).to_pandas()
    require_finite(x, path, what="row", row_ids=list(zip(frame["subject_id"], frame["prediction_time"].astype(str))),
                   fix="re-run ehr_embedded.represent (the model produced non-finite states)")
    meta = json.loads((table.schema.metadata or {}).get(META_KEY, b"{}"))
    return frame, x, meta


def run(cfg: RepresentConfig) -> int:
    setup_logging()
    represent(cfg)
    return 0


main = config_main(RepresentConfig, run, __doc__)

if __name__ == "__main__":
    raise SystemExit(main())
