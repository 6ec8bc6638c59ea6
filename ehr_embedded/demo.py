"""The whole ehr_embedded chain on generated sample data (1-3 minutes on 2 CPU cores).

    python -m ehr_embedded.demo runs/ehr_embedded/demo

sample_data -> create_vocab_embeddings (packaged MiniLM) -> create_embeddings -> pretrain (decoder) ->
finetune (encoder, and decoder from the pretrained weights) -> evaluate on held_out -> count baseline.
Prints one JSON row per result and writes them all to `OUT_DIR/demo_rows.json`; each row names the file it comes from.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import time

from common.cli import guarded_main
from common.config import load_config
from common.io import write_json
from ehr_embedded.baseline import fit_baseline
from ehr_embedded.config import BaselineConfig, Stage1Config, TrainConfig
from ehr_embedded.create_embeddings import create_embeddings
from ehr_embedded.create_vocab_embeddings import create_vocab_embeddings
from ehr_embedded.finetune import finetune
from ehr_embedded.pretrain import pretrain
from ehr_embedded.sample_data import write_sample

PACKAGE = "ehr_embedded"
MODEL = ["model.model_dim=32", "model.n_heads=4", "model.n_layers=2", "model.max_length=64", "model.dropout=0.1"]
TRAIN = ["training.batch_size=16", "training.learning_rate=0.002", "training.save_every=0",
         "training.class_weights=auto", "evaluate.n_bootstrap=300"]


def run_demo(out_dir: pathlib.Path, seed: int | None = None) -> list[dict]:
    """The chain on the sample data; `seed` (an int) is the training.seed of pretrain and both finetunes and the
    counts baseline's seed; None keeps each stage's default. The sample data do not depend on it."""
    out_dir = pathlib.Path(out_dir)
    rows: list[dict] = []
    train_seed = [] if seed is None else [f"training.seed={seed}"]

    def row(stage: str, metric: str, value, output) -> None:
        rows.append({"package": PACKAGE, "stage": stage, "metric": metric, "value": value, "output": str(output)})

    meds = out_dir / "meds"
    started = time.time()
    counts = write_sample(meds, n_subjects=200, seed=0)
    row("sample_data", "events", float(counts["events"]), meds)
    stage1 = load_config(Stage1Config, None, [
        f"data.data_dir={meds}", f"data.labels_filepath={meds}/labels/infection",
        f"data.medical_lookup_filepath={meds}/lookups/medical_lookup.csv",
        f"data.lab_lookup_filepath={meds}/lookups/lab_lookup.csv", f"data.vocab_embedding_path={out_dir}/vocab",
        f"data.embedding_output_dir={out_dir}/patients", "vocab.min_count=2", "sequences.max_length=64"])
    table = create_vocab_embeddings(stage1)
    coverage = table.meta["coverage"]
    row("create_vocab_embeddings", "codes with a real description",
        f"{coverage['with_real_description']}/{coverage['n_codes']}", out_dir / "vocab")
    report = create_embeddings(stage1)
    row("create_embeddings", "sequences (train/tuning/held_out)",
        "/".join(str(report[s]["sequences"]) for s in ("train", "tuning", "held_out")), out_dir / "patients")
    row("create_embeddings", "codes embedded from description only",
        float(report["counts"].get("codes_embedded_from_description_only", 0)), out_dir / "patients")

    store = [f"data.embedding_output_dir={out_dir}/patients"]
    pre = load_config(TrainConfig, None, [*MODEL, *store, *TRAIN, "model.type=transformer_decoder_embedded",
                                          "training.task=autoregressive", f"training.output_dir={out_dir}/pretrain",
                                          "training.epochs=3", "training.learning_rate=0.003", *train_seed])
    tuning = pretrain(pre)
    row("pretrain", "tuning next-event top-10 accuracy", round(tuning["top10_accuracy"], 4), out_dir / "pretrain")
    for kind, extra in (("encoder", ["model.type=transformer_encoder_embedded"]),
                        ("decoder", ["model.type=transformer_decoder_embedded",
                                     f"training.pretrained_checkpoint={out_dir}/pretrain"])):
        cfg = load_config(TrainConfig, None, [*MODEL, *store, *TRAIN, *extra, "training.epochs=8",
                                              f"training.output_dir={out_dir}/finetune_{kind}", *train_seed])
        result = finetune(cfg)
        auroc = result["auroc"]
        row(f"finetune+evaluate ({kind})", "held_out AUROC [95% CI]",
            f"{auroc['value']:.3f} [{auroc['low']:.3f}, {auroc['high']:.3f}]",
            out_dir / f"finetune_{kind}" / "reports" / "eval_held_out.json")
    base = fit_baseline(load_config(BaselineConfig, None, [f"embedding_output_dir={out_dir}/patients",
                                                           f"output_dir={out_dir}/baseline", "n_bootstrap=300",
                                                           *([] if seed is None else [f"seed={seed}"])]))
    auroc = base["auroc"]
    row("baseline (counts + LR)", "held_out AUROC [95% CI]", f"{auroc['value']:.3f} [{auroc['low']:.3f}, "
        f"{auroc['high']:.3f}]", out_dir / "baseline" / "reports" / "baseline_held_out.json")
    row("demo", "seconds", round(time.time() - started, 1), out_dir)
    write_json(out_dir / "demo_rows.json", rows)
    return rows


def _body(args: argparse.Namespace) -> int:
    for r in run_demo(pathlib.Path(args.out_dir), seed=args.seed):
        print(json.dumps(r))
    return 0


parser = argparse.ArgumentParser(prog="python -m ehr_embedded.demo", description=__doc__)
parser.add_argument("out_dir")
parser.add_argument("--seed", type=int, default=None, help="training seed of every training stage (default: each "
                    "stage's own)")
main = guarded_main(_body, parser)

if __name__ == "__main__":
    raise SystemExit(main())
