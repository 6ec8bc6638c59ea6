"""Sensor-modality ablation: evaluate the trained pipeline with each channel group removed.

    python -m cnc_gcode.ablation_modality --config configs/cnc_gcode/sample.yaml

A removed group's channels are replaced by their training mean (zero after the encoder's normalisation), so the
model sees "no information" rather than out-of-range values. Groups come from channels.json next to the test
file (written by sample_data / ingest_umich) or ablation.groups. Writes <run_dir>/reports/ablation_modality.
{md,json,png}: test token accuracy, line exact match and operation accuracy with everything, then without each group.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from cnc_gcode.ablation_gamma import bar_chart, markdown_table
from cnc_gcode.config import CncConfig
from cnc_gcode.evaluate import predict_windows, score
from cnc_gcode.runtime import cap_windows, load_models, load_split, set_threads
from common.cli import UserError, config_main
from common.io import atomic_write_text, write_json
from common.logs import setup_logging

log = logging.getLogger(__name__)


def channel_groups(test_path: str, channel_names: list[str], wanted: list[str]) -> dict[str, list[int]]:
    """Group name -> channel indices, from channels.json beside the data."""
    path = Path(test_path).parent / "channels.json"
    if not path.is_file():
        raise UserError(f"{path} not found; the modality ablation needs the channel groups written by sample_data "
                        f"or ingest_umich next to the data")
    groups = json.loads(path.read_text(encoding="utf-8"))["groups"]
    unknown = [g for g in wanted if g not in groups]
    if unknown:
        raise UserError(f"config key 'ablation.groups': {unknown} not in {path} (groups: {sorted(groups)})")
    index = {name: i for i, name in enumerate(channel_names)}
    return {g: [index[c] for c in groups[g] if c in index] for g in (wanted or groups)}


def ablation_modality(cfg: CncConfig) -> int:
    set_threads(cfg)
    setup_logging()
    encoder, decoder, vocab, meta = load_models(cfg)
    test = cap_windows(load_split(cfg, "test", vocab, int(meta["continuous_dim"])), cfg.eval.max_windows,
                       cfg.run.seed)
    groups = channel_groups(cfg.data.test_path, test.channel_names, cfg.ablation.groups)
    results = []
    for name, channels in [("full model", []), *[(f"- {g}", c) for g, c in groups.items()]]:
        scores = score(vocab, test, *predict_windows(encoder, decoder, vocab, test, cfg.eval.batch_size, channels))
        results.append({"removed": name, "channels": len(channels), **scores})
        log.info("%s: token_acc %.4f operation_acc %.4f", name, scores["token_acc"], scores["operation_acc"])
    full = results[0]["token_acc"]
    reports = cfg.run.run_dir / "reports"
    write_json(reports / "ablation_modality.json", results)
    table = markdown_table(["modality removed", "channels", "token acc", "change", "line exact", "operation acc"],
                           [[r["removed"], r["channels"], r["token_acc"], f"{r['token_acc'] - full:+.4f}",
                             r["line_exact_match"], r["operation_acc"]] for r in results])
    atomic_write_text(reports / "ablation_modality.md", table)
    bar_chart([r["removed"] for r in results], [r["token_acc"] for r in results], reports / "ablation_modality.png",
              "test token accuracy", "sensor-modality ablation")
    print(table)
    return 0


main = config_main(CncConfig, ablation_modality, __doc__, prog="python -m cnc_gcode.ablation_modality")

if __name__ == "__main__":
    raise SystemExit(main())
