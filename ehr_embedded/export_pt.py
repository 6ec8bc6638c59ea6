"""Export a compact store to the original per-patient .pt layout (for code that reads those files).

    python -m ehr_embedded.export_pt --config configs/ehr_embedded/export_pt.yaml

Writes `<output_dir>/<split>/patient_<i>.pt` = {'embeddings': (N, D), 'token_ids': (N,), 'label': ()} plus
`subject_id` and `prediction_time` (microseconds since the epoch). About 4 * D bytes per event: 130x the store.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from common.cli import config_main
from common.logs import setup_logging
from ehr_embedded.config import ExportConfig
from ehr_embedded.storage import export_pt, load_dataset_table, open_split

log = logging.getLogger(__name__)


def run(cfg: ExportConfig) -> int:
    setup_logging()
    table = load_dataset_table(Path(cfg.embedding_output_dir))
    dtype = torch.float16 if cfg.dtype == "float16" else torch.float32
    for split in cfg.splits:
        n = export_pt(open_split(Path(cfg.embedding_output_dir), split), table, Path(cfg.output_dir) / split, dtype)
        log.info("%s: %d files -> %s", split, n, Path(cfg.output_dir) / split)
    return 0


main = config_main(ExportConfig, run, __doc__)

if __name__ == "__main__":
    raise SystemExit(main())
