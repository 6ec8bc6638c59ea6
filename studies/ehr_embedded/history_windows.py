"""What a label's history holds on the MIMIC-IV demo under count windows, time windows and kept admission context.

    python -m studies.ehr_embedded.history_windows        # after mimic_results.sh (or convert_mimic + vocab) made
                                                          # runs/ehr_embedded/mimic/{meds,vocab}

Builds the long_stay store of `configs/ehr_embedded/mimic_create_embeddings.yaml` once per variant below (under
runs/ehr_embedded/mimic/history/<variant>, all splits together) and reports per label row: how many hours before
prediction_time the oldest kept timed event lies, and whether the row holds its admission (a HOSPITAL_ADMISSION
event, which carries the admission type). Writes runs/ehr_embedded/mimic/history/history_windows.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from ehr_embedded.create_embeddings import main as create_embeddings
from ehr_embedded.storage import CODE_TABLE_DIR, CodeTable, SequenceStore

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "configs/ehr_embedded/mimic_create_embeddings.yaml"
OUT = ROOT / "runs/ehr_embedded/mimic/history"
ADMISSION = "HOSPITAL_ADMISSION"
VARIANTS = {  # name -> create_embeddings overrides
    "last 256 events": ["sequences.max_length=256"],
    "last 512 events (shipped)": ["sequences.max_length=512"],
    "last 256 events + admission kept": ["sequences.max_length=256", f"sequences.context_codes=[{ADMISSION}]"],
    "last 24 h (at most 512) + admission kept": ["sequences.max_length=512", "sequences.max_history_hours=24",
                                                 f"sequences.context_codes=[{ADMISSION}]"],
    "last 30 days (at most 512) + admission kept": ["sequences.max_length=512", "sequences.max_history_hours=720",
                                                    f"sequences.context_codes=[{ADMISSION}]"],
}
SPLITS = ("train", "tuning", "held_out")


def describe(store_dir: Path) -> dict:
    """Per label row: hours from the oldest kept timed event to prediction_time, events kept, admission held."""
    table = CodeTable.load(store_dir / CODE_TABLE_DIR)
    is_admission = table.vocab.sort_values("token_id")["code"].str.startswith(ADMISSION).to_numpy()
    spans, lengths, admitted = [], [], []
    for split in SPLITS:
        store = SequenceStore(store_dir / split)
        gaps, ids = np.asarray(store.time_gaps, np.float64), np.asarray(store.token_ids)
        for i in range(len(store)):
            lo, hi = store.offsets[i], store.offsets[i + 1]
            # time gaps are hours since the previous kept event (0 around static events), so their sum plus the gap
            # from the last event to prediction_time is how far back the oldest kept timed event lies
            spans.append(gaps[lo:hi].sum() + float(store.hours_to_prediction[i]))
            lengths.append(hi - lo)
            admitted.append(bool(is_admission[ids[lo:hi]].any()))
    spans = np.asarray(spans)
    return {"rows": len(spans), "events_mean": float(np.mean(lengths)),
            "hours_back_p25": float(np.quantile(spans, 0.25)), "hours_back_median": float(np.median(spans)),
            "rows_5h_or_less": float(np.mean(spans <= 5.0)), "rows_with_admission": float(np.mean(admitted))}


def main(argv: list[str] | None = None) -> int:
    """Build every variant's store, describe it, write the table; takes no arguments (its config and paths are fixed)."""
    argparse.ArgumentParser(prog="python -m studies.ehr_embedded.history_windows", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter).parse_args(argv)
    results = {}
    for name, overrides in VARIANTS.items():
        store_dir = OUT / name.split(" (")[0].replace(" ", "_").replace("+", "plus")
        code = create_embeddings(["--config", str(CONFIG), f"data.embedding_output_dir={store_dir}", *overrides])
        if code:
            return code
        results[name] = {"overrides": overrides, **describe(store_dir)}
    lines = ["| history | rows | events kept (mean) | oldest kept event, hours before prediction: p25 / median "
             "| rows reaching back 5 h or less | rows holding their admission |", "|---|---|---|---|---|---|"]
    for name, r in results.items():
        lines.append(f"| {name} | {r['rows']} | {r['events_mean']:.0f} | {r['hours_back_p25']:.1f} / "
                     f"{r['hours_back_median']:.1f} | {100 * r['rows_5h_or_less']:.0f} % | "
                     f"{100 * r['rows_with_admission']:.0f} % |")
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "history_windows.json").write_text(json.dumps(results, indent=2) + "\n")
    (OUT / "history_windows.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
