"""Stage 2: the single-embedding regressor, the baseline of the dual one: one classifier's embedding model
(regression.embedding: company or model_type) fused with visual ViT features, predicting length and diameter (mm).

    python -m implant_dims.train_regression --config configs/implant_dims/sample.yaml regression.embedding=company

Same loop, unfreezing schedule, reports and resume rules as train_dual (see implant_dims/regression.py). With one
embedding the fusion is `triple`-style attention over (visual, embedding) or plain `concat`enation
(regression.attention_type); the other types need both embeddings and are refused (exit 2) before any work. Writes
<run_dir>/single_<embedding>/ (metrics.jsonl, checkpoints/, reports/).
"""

from __future__ import annotations

from common.cli import config_main
from common.errors import UserError
from implant_dims.config import ImplantConfig
from implant_dims.models import SINGLE_EMBEDDING_TYPES
from implant_dims.ood import fit_for_run, require_calibration
from implant_dims.regression import train_regressor


def train_single(cfg: ImplantConfig) -> dict:
    rc = cfg.regression
    if rc.attention_type not in SINGLE_EMBEDDING_TYPES:
        raise UserError(f"regression.attention_type={rc.attention_type} fuses the company and the model-type "
                        f"embedding; the single-embedding regressor (train_regression) builds "
                        f"{' or '.join(SINGLE_EMBEDDING_TYPES)}: set regression.attention_type=triple (attention over "
                        f"visual and embedding) or concat, or train {rc.attention_type} with train_dual")
    out = cfg.run.run_dir / f"single_{rc.embedding}"
    require_calibration(cfg)  # the guard fitted after training needs it: refuse a missing file now
    results = train_regressor(cfg, (rc.embedding,), rc.attention_type, out)
    fit_for_run(cfg, out)  # the out-of-domain guard's statistics, beside the checkpoints (predict reads them)
    return results


def _main(cfg: ImplantConfig) -> int:
    train_single(cfg)
    return 0


main = config_main(ImplantConfig, _main, __doc__, prog="python -m implant_dims.train_regression")

if __name__ == "__main__":
    raise SystemExit(main())
