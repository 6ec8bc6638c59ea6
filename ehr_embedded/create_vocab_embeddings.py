"""Stage 1a: the vocabulary from the training split, one description per code, embedded once.

    python -m ehr_embedded.create_vocab_embeddings --config configs/ehr_embedded/create_embeddings.yaml
    python -m ehr_embedded.create_vocab_embeddings --config configs/ehr_embedded/create_embeddings.yaml \
        data.data_dir=/tmp/sample/meds data.vocab_embedding_path=/tmp/sample/vocab vocab.min_count=2

Writes `data.vocab_embedding_path/`: vocab.parquet, embeddings.npy `[V, D]`, meta.json (model name and path,
dimension, counts) and coverage.json (how many codes got a real description, by source).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from common.cli import config_main
from common.errors import UserError
from common.io import write_json
from common.logs import setup_logging
from ehr_embedded import meds_io
from ehr_embedded.config import Stage1Config
from ehr_embedded.descriptions import DescriptionResolver, TextEncoder
from ehr_embedded.storage import PAD_ID, PAD_TOKEN, UNK_DESCRIPTION, UNK_ID, UNK_TOKEN, CodeTable

log = logging.getLogger(__name__)


def resolve_paths(cfg: Stage1Config) -> tuple[Path, Path | None]:
    """(splits file, codes file or None) with the MEDS defaults under data.data_dir."""
    root = Path(cfg.data.data_dir)
    splits = cfg.data.splits_filepath or root / "metadata" / "subject_splits.parquet"
    codes = cfg.data.codes_filepath or root / "metadata" / "codes.parquet"
    if cfg.data.codes_filepath and not Path(codes).is_file():
        raise UserError(f"{codes}: data.codes_filepath does not exist; fix the path or set it to null")
    return Path(splits), (Path(codes) if Path(codes).is_file() else None)


def build_resolver(cfg: Stage1Config) -> tuple[DescriptionResolver, list[str] | None]:
    _, codes_path = resolve_paths(cfg)
    vocab_codes, vocab_desc = meds_io.read_vocab_csv(cfg.data.vocab_filepath)
    lookups = [vocab_desc, meds_io.read_lookup_csv(cfg.data.medical_lookup_filepath, "medical"),
               meds_io.read_lookup_csv(cfg.data.lab_lookup_filepath, "lab")]
    return DescriptionResolver(meds_io.read_codes(codes_path), lookups), vocab_codes


def training_code_stats(cfg: Stage1Config) -> pd.DataFrame:
    """Per code on the training split: count, mean and std of numeric_value (NaN where the code has none)."""
    splits_path, _ = resolve_paths(cfg)
    splits = meds_io.read_splits(splits_path)
    train_ids = pa.array(splits.loc[splits["split"] == "train", "subject_id"].to_numpy(), pa.int64())
    if len(train_ids) == 0:
        raise UserError(f"{splits_path}: no subject is in the 'train' split; the vocabulary comes from train")
    frames = []
    for path in meds_io.data_files(Path(cfg.data.data_dir)):
        table = meds_io.read_events(path)
        table = table.filter(pc.is_in(table.column("subject_id"), value_set=train_ids))
        frames.append(table.select(["code", "numeric_value"]).to_pandas())
    events = pd.concat(frames, ignore_index=True)
    if events.empty:
        raise UserError(f"{cfg.data.data_dir}: the training subjects have no events; check the splits file")
    grouped = events.groupby("code", sort=False)["numeric_value"]
    stats = pd.DataFrame({"train_count": grouped.size(), "value_mean": grouped.mean(),
                          "value_std": grouped.std(ddof=0)}).reset_index()
    return stats


def build_vocabulary(stats: pd.DataFrame, min_count: int, listed: list[str] | None) -> pd.DataFrame:
    """Codes kept for the next-event vocabulary, most frequent first (ties by code, so the order is stable)."""
    kept = stats[stats["train_count"] >= min_count]
    if listed is not None:
        dropped = len(set(listed) - set(kept["code"]))
        kept = kept[kept["code"].isin(set(listed))]
        if dropped:
            log.info("%d codes of the vocabulary CSV are absent from train or below min_count and were left out",
                     dropped)
    return kept.sort_values(["train_count", "code"], ascending=[False, True], kind="stable").reset_index(drop=True)


def create_vocab_embeddings(cfg: Stage1Config) -> CodeTable:
    started = time.time()
    resolver, listed = build_resolver(cfg)
    vocab = build_vocabulary(training_code_stats(cfg), cfg.vocab.min_count, listed)
    if vocab.empty:
        raise UserError(f"vocab.min_count={cfg.vocab.min_count} leaves no training code; lower it")
    descriptions, sources, coverage = resolver.resolve_all(vocab["code"])
    encoder = TextEncoder(cfg.model.name, cfg.device, cfg.model.batch_size, cfg.model.normalize)
    if cfg.model.embedding_dim is not None and cfg.model.embedding_dim != encoder.dim:
        raise UserError(f"model.embedding_dim={cfg.model.embedding_dim} but {cfg.model.name} gives {encoder.dim}-d "
                        f"embeddings; set model.embedding_dim={encoder.dim} or null")
    code_emb = encoder.encode(descriptions)
    unk_emb = encoder.encode([UNK_DESCRIPTION])
    embeddings = np.concatenate([np.zeros((1, encoder.dim), np.float32), unk_emb, code_emb])
    n = len(vocab)
    table = pd.DataFrame({
        "token_id": np.arange(n + 2, dtype=np.int32),
        "code": [PAD_TOKEN, UNK_TOKEN, *vocab["code"]],
        "description": ["padding", UNK_DESCRIPTION, *descriptions],
        "description_source": ["special", "special", *sources],
        "train_count": np.concatenate([[0, 0], vocab["train_count"].to_numpy(np.int64)]),
        "value_mean": np.concatenate([[np.nan, np.nan], vocab["value_mean"].to_numpy(np.float32)]).astype(np.float32),
        "value_std": np.concatenate([[np.nan, np.nan], vocab["value_std"].to_numpy(np.float32)]).astype(np.float32),
        "in_lm_vocab": np.ones(n + 2, bool),
    })
    assert table["token_id"].iloc[PAD_ID] == PAD_ID and table["token_id"].iloc[UNK_ID] == UNK_ID
    real = n - coverage["readable"]
    coverage_report = {"n_codes": n, "with_real_description": real,
                       "fraction_real": round(real / n, 4), "by_source": coverage,
                       "readable_fallback_examples": [c for c, s in zip(vocab["code"], sources) if s == "readable"][:20]}
    meta = {"model_name": cfg.model.name, "model_path": str(encoder.path), "normalize": cfg.model.normalize,
            "min_count": cfg.vocab.min_count, "data_dir": str(cfg.data.data_dir), "coverage": coverage_report,
            "seconds": round(time.time() - started, 2)}
    out = CodeTable(table, embeddings, meta)
    out.save(Path(cfg.data.vocab_embedding_path))
    write_json(Path(cfg.data.vocab_embedding_path) / "coverage.json", coverage_report)
    log.info("vocabulary: %d codes (min_count=%d), %d-d embeddings from %s; real descriptions %d/%d %s -> %s",
             n, cfg.vocab.min_count, encoder.dim, cfg.model.name, real, n, coverage, cfg.data.vocab_embedding_path)
    return out


def run(cfg: Stage1Config) -> int:
    setup_logging()
    create_vocab_embeddings(cfg)
    return 0


main = config_main(Stage1Config, run, __doc__)

if __name__ == "__main__":
    raise SystemExit(main())
