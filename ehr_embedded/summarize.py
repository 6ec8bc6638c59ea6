"""Collect held-out reports of finished runs into one table (markdown + JSON): what the results tables quote.

    python -m ehr_embedded.summarize runs/ehr_embedded/mimic/summary \
        "counts + LR=runs/ehr_embedded/mimic/baseline_counts/reports/baseline_held_out.json" \
        "encoder=runs/ehr_embedded/mimic/finetune_encoder/reports/eval_held_out.json"

Each argument is `LABEL=REPORT`, where REPORT is a `reports/eval_<split>.json` written by finetune / evaluate or a
`reports/baseline_held_out.json` written by baseline. A row holds n, positives, AUROC with its 95% interval, AUPRC,
Brier and the tuning AUROC the run was selected on (baseline: its report; a finetune run: the last epoch marked best
in metrics.jsonl). `REPORT#TASK` takes one task of a multi-label report (its per-task metrics; the tuning AUROC
column then shows that task's own tuning AUROC where the report has one (baseline), else `-`, since a multi-label run
is selected on the macro AUROC over tasks). Labels given more than once also get a `mean +- sd` row of AUROC. Writes
OUT.md and OUT.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from common.cli import guarded_main
from common.errors import UserError
from common.io import atomic_write_text, write_json


def selection_auroc(report_path: Path, report: dict) -> float | None:
    """The tuning AUROC a run was selected on."""
    if "tuning_auroc" in report:
        return float(report["tuning_auroc"])
    metrics = report_path.parent.parent / "metrics.jsonl"
    if not metrics.is_file():
        return None
    best = [r for r in map(json.loads, metrics.read_text().splitlines()) if r.get("best")]
    return float(best[-1]["tuning_auroc"]) if best and "tuning_auroc" in best[-1] else None


def summarize(entries: list[tuple[str, Path]]) -> list[dict]:
    rows = []
    for label, where in entries:
        path, _, task = str(where).partition("#")
        path = Path(path)
        if not path.is_file():
            raise UserError(f"{path}: report not found; run the stage that writes it first")
        report = json.loads(path.read_text())
        tuning = selection_auroc(path, report)
        if task:
            if task not in report.get("tasks", {}):
                raise UserError(f"{path}: no task '{task}' in this report (tasks: {list(report.get('tasks', {}))}); "
                                f"pass REPORT#TASK with one of them")
            report = report["tasks"][task]
            tuning = report.get("tuning_auroc")
        if "auroc" not in report:
            raise UserError(f"{path}: no 'auroc' in this report; pass an eval_<split>.json or baseline_held_out.json")
        rows.append({"label": label, "report": str(where), "n": report["n"], "positives": report["positives"],
                     "auroc": report["auroc"]["value"], "auroc_low": report["auroc"]["low"],
                     "auroc_high": report["auroc"]["high"], "auprc": report["auprc"]["value"],
                     "brier": report["brier"]["value"], "tuning_auroc": tuning})
    return rows


def markdown(rows: list[dict]) -> str:
    def f(x):
        return "-" if x is None else f"{x:.3f}"

    lines = ["| model | held_out n (pos.) | AUROC [95% CI] | AUPRC | Brier | tuning AUROC | report |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['label']} | {r['n']} ({r['positives']}) | {f(r['auroc'])} [{f(r['auroc_low'])}, "
                     f"{f(r['auroc_high'])}] | {f(r['auprc'])} | {f(r['brier'])} | {f(r['tuning_auroc'])} | "
                     f"`{r['report']}` |")
    for label in dict.fromkeys(r["label"] for r in rows):
        values = [r["auroc"] for r in rows if r["label"] == label]
        if len(values) > 1:
            lines.append(f"| {label}: mean +- sd of {len(values)} | | {np.mean(values):.3f} +- "
                         f"{np.std(values, ddof=1):.3f} | | | | |")
    return "\n".join(lines) + "\n"


def _body(args: argparse.Namespace) -> int:
    entries = []
    for item in args.reports:
        label, sep, path = item.rpartition("=")
        if not sep or not label:
            raise UserError(f"{item!r}: expected LABEL=REPORT_JSON")
        entries.append((label, Path(path)))
    rows = summarize(entries)
    out = Path(args.out)
    write_json(out.with_suffix(".json"), rows)
    text = markdown(rows)
    atomic_write_text(out.with_suffix(".md"), text)
    print(text, end="")
    return 0


parser = argparse.ArgumentParser(prog="python -m ehr_embedded.summarize", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("out", help="output path without suffix: OUT.md and OUT.json are written")
parser.add_argument("reports", nargs="+", metavar="LABEL=REPORT")
main = guarded_main(_body, parser)

if __name__ == "__main__":
    raise SystemExit(main())
