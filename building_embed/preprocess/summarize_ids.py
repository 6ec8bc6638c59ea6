"""Images, identities and place groups per split of the merged data.

    python -m building_embed.preprocess.summarize_ids --config configs/building_embed/config.toml

Reads `paths.merged_dir/{train,val,test}.parquet` and writes `id_summary.json` (per split: images, identities,
place groups, datasets, images per identity min / median / max) and `id_summary.csv` (one row per identity:
identity, dataset_id, target_id, split, place_group, images). merge_and_split writes both too.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq

from building_embed.config import BuildingEmbedConfig
from common.cli import config_main
from common.errors import UserError
from common.io import atomic_write_text, write_json
from common.logs import setup_logging

log = logging.getLogger(__name__)
SPLITS = ("train", "val", "test")
COLUMNS = ["identity", "dataset_id", "target_id", "split", "place_group"]


def summarize(merged_dir: str | Path) -> tuple[dict, pd.DataFrame]:
    """(per-split summary, per-identity table) of the merged splits."""
    merged_dir = Path(merged_dir)
    frames = []
    for split in SPLITS:
        path = merged_dir / f"{split}.parquet"
        if not path.is_file():
            raise UserError(f"{path}: not found; run python -m building_embed.preprocess.merge_and_split first")
        frames.append(pq.read_table(path, columns=COLUMNS).to_pandas())
    frame = pd.concat(frames, ignore_index=True)
    per_identity = (frame.groupby(COLUMNS, sort=True).size().rename("images").reset_index())
    summary = {}
    for split in SPLITS:
        rows = per_identity[per_identity["split"] == split]
        summary[split] = {"images": int(rows["images"].sum()), "identities": int(len(rows)),
                          "place_groups": int(rows["place_group"].nunique()),
                          "datasets": sorted(int(d) for d in rows["dataset_id"].unique()),
                          "images_per_identity": {"min": int(rows["images"].min()) if len(rows) else 0,
                                                  "median": float(rows["images"].median()) if len(rows) else 0.0,
                                                  "max": int(rows["images"].max()) if len(rows) else 0}}
    return summary, per_identity


def write_summary(merged_dir: str | Path) -> dict:
    summary, per_identity = summarize(merged_dir)
    write_json(Path(merged_dir) / "id_summary.json", summary)
    atomic_write_text(Path(merged_dir) / "id_summary.csv", per_identity.to_csv(index=False))
    return summary


def run(cfg: BuildingEmbedConfig) -> int:
    setup_logging(level=getattr(logging, cfg.logging.level.upper(), logging.INFO))
    summary = write_summary(cfg.paths.merged_dir)
    for split, row in summary.items():
        log.info("%s: %d images, %d identities, %d place groups", split, row["images"], row["identities"],
                 row["place_groups"])
    return 0


main = config_main(BuildingEmbedConfig, run, __doc__, prog="python -m building_embed.preprocess.summarize_ids")

if __name__ == "__main__":
    raise SystemExit(main())
