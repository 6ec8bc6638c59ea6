"""Sensor-modality ablation: evaluate the trained pipeline with each channel group removed.

    python -m studies.cnc_gcode.ablation_modality --config configs/cnc_gcode/sample.yaml

A removed group's channels are replaced by their training mean (zero after the encoder's normalisation), so the
model sees "no information" rather than out-of-range values. Groups come from channels.json next to the test
file (written by sample_data / ingest_umich) or ablation.groups. Writes <run_dir>/reports/ablation_modality.
{md,json,png}: test token accuracy, line exact match and operation accuracy with everything, then without each group.
`ablation.seeds=[0,1,2]`: the configured run is the run.seed pipeline; for every other seed an encoder and a decoder
are trained (same config, that seed) in <run_dir>/ablations/modality_seed<N>/ (resumable), each is ablated the same
way, and the table gives the mean and sample standard deviation over the seeds (per-seed values in the JSON).
"""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

from cnc_gcode.checkpoints import load_models
from cnc_gcode.config import CncConfig, set_threads
from cnc_gcode.data import cap_windows, groups_used, load_split
from cnc_gcode.evaluate import predict_windows, score
from common.cli import config_main
from common.errors import UserError
from common.io import atomic_write_text, write_json
from common.logs import setup_logging
from studies.cnc_gcode.ablation_gamma import bar_chart, markdown_table, mean_cell, seed_summary

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


def seed_run(cfg: CncConfig, seed: int) -> CncConfig:
    """The config of the pipeline of `seed`: the configured run for run.seed, else a trained one under ablations/."""
    if seed == cfg.run.seed:
        return cfg
    others = [s for s in (cfg.ablation.seeds or [cfg.run.seed]) if s != cfg.run.seed]
    if cfg.ablation.seed_runs:
        if len(cfg.ablation.seed_runs) != len(others):
            raise UserError(f"config key 'ablation.seed_runs': {len(cfg.ablation.seed_runs)} run directories for the "
                            f"{len(others)} seeds {others} beyond run.seed={cfg.run.seed}; give one per seed")
        sub = copy.deepcopy(cfg)
        run_dir = Path(cfg.ablation.seed_runs[others.index(seed)])
        sub.run.out_dir, sub.run.name, sub.eval.checkpoint = str(run_dir.parent), run_dir.name, ""
        return sub
    from cnc_gcode.train_decoder import train_decoder
    from cnc_gcode.train_encoder import train_encoder

    sub = copy.deepcopy(cfg)
    sub.run.out_dir, sub.run.name, sub.run.seed = str(cfg.run.run_dir / "ablations"), f"modality_seed{seed}", seed
    sub.train.encoder_checkpoint, sub.eval.checkpoint = "", ""
    log.info("modality ablation: training the seed %d pipeline in %s", seed, sub.run.run_dir)
    train_encoder(sub)
    train_decoder(sub)
    return sub


def ablation_modality(cfg: CncConfig) -> int:
    set_threads(cfg)
    setup_logging()
    seeds = list(cfg.ablation.seeds) or [cfg.run.seed]
    per_row: dict[str, list[dict]] = {}
    channels_of: dict[str, int] = {}
    for seed in seeds:
        sub = seed_run(cfg, seed)
        encoder, decoder, vocab, meta = load_models(sub)
        test = cap_windows(load_split(cfg, "test", vocab, int(meta["continuous_dim"])), cfg.eval.max_windows,
                           cfg.run.seed)
        groups = channel_groups(cfg.data.test_path, test.channel_names, cfg.ablation.groups)
        for name, channels in [("full model", []), *[(f"- {g}", c) for g, c in groups.items()]]:
            scores = score(vocab, test, *predict_windows(encoder, decoder, vocab, test, cfg.eval.batch_size,
                                                         channels))
            per_row.setdefault(name, []).append({"seed": seed, **scores})
            channels_of[name] = len(channels)
            log.info("seed %d %s: token_acc %.4f operation_acc %.4f", seed, name, scores["token_acc"],
                     scores["operation_acc"])
    results = [{"removed": name, "channels": channels_of[name], "channel_groups": groups_used(test), "seeds": seeds,
                **seed_summary(rows)} for name, rows in per_row.items()]
    full = results[0]["token_acc"]
    reports = cfg.run.run_dir / "reports"
    write_json(reports / "ablation_modality.json", results)
    n = len(seeds)
    full_tol = results[0]["token_acc_tol"]
    table = markdown_table(["modality removed", "channels", "token acc", "change", "within tolerance", "change",
                            "line exact", "operation acc"],
                           [[r["removed"], r["channels"], mean_cell(r, "token_acc", n), f"{r['token_acc'] - full:+.4f}",
                             mean_cell(r, "token_acc_tol", n), f"{r['token_acc_tol'] - full_tol:+.4f}",
                             mean_cell(r, "line_exact_match", n), mean_cell(r, "operation_acc", n)] for r in results])
    table = (f"Input groups: {', '.join(groups_used(test))}; "
             f"{'mean ± std over seeds ' + str(seeds) if n > 1 else 'seed ' + str(seeds[0])}\n\n" + table)
    atomic_write_text(reports / "ablation_modality.md", table)
    bar_chart([r["removed"] for r in results], [r["token_acc"] for r in results], reports / "ablation_modality.png",
              "test token accuracy", "sensor-modality ablation")
    print(table)
    return 0


main = config_main(CncConfig, ablation_modality, __doc__, prog="python -m studies.cnc_gcode.ablation_modality")

if __name__ == "__main__":
    raise SystemExit(main())
