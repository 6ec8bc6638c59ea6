"""Turn a sensor file into G-code text with the trained pipeline.

    python -m cnc_gcode.predict --config configs/cnc_gcode/sample.yaml predict.input=data/cnc_gcode/sample/test.npz

The input NPZ needs `continuous [N,T,C]` and `categorical [N,T,K]` (labels are not needed), windows in time
order. Each window is decoded with the constrained greedy decoder; consecutive windows that decode to the same
line are merged, so the output reads as a program. Writes the .nc file (default
<run_dir>/predictions/<input stem>.nc) and a CSV with one row per window (operation, decoded line).

With a line library configured (library.program set; cnc_gcode.line_library trained in <run_dir>/library), each
window takes the library's line (a program line with a regressed feed) where its confidence reaches
library.threshold, else the decoder's; the CSV then also gives the source of each line and the confidence.
"""

from __future__ import annotations

import csv
import io
import logging
from pathlib import Path

from cnc_gcode.checkpoints import load_models
from cnc_gcode.config import CncConfig, set_threads
from cnc_gcode.data import check_channels, load_windows, select_groups
from cnc_gcode.evaluate import operation_names, predict_windows
from common.cli import config_main
from common.errors import UserError
from common.io import atomic_write_text
from common.logs import setup_logging

log = logging.getLogger(__name__)


def windows_to_program(lines: list[str]) -> list[str]:
    """Merge runs of identical consecutive lines (several windows see the same executing line)."""
    program = []
    for line in lines:
        if not program or program[-1] != line:
            program.append(line)
    return program


def predict(cfg: CncConfig) -> int:
    set_threads(cfg)
    setup_logging()
    if not cfg.predict.input:
        raise UserError("config key 'predict.input' is empty; pass predict.input=PATH/TO/windows.npz")
    encoder, decoder, vocab, meta = load_models(cfg)
    windows = load_windows(cfg.predict.input, categorical_dims=cfg.encoder.categorical_dims,
                           nan_policy=cfg.data.nan_policy, labels=False)
    # the input groups the model was trained on (its checkpoint records them)
    windows = select_groups(windows, meta.get("channel_groups") or cfg.data.channel_groups)
    check_channels(windows, None, int(meta["continuous_dim"]))
    op_pred, token_pred = predict_windows(encoder, decoder, vocab, windows)
    source = None
    if cfg.library.program:  # closed program: the library's line where it is confident, the decoder's elsewhere
        from cnc_gcode.line_library import combine, configured_threshold, library_predict, load_library

        model, library, _, _ = load_library(cfg)
        lib_tokens, confidence, lib_ops = library_predict(model, library, windows)
        threshold = configured_threshold(cfg)
        token_pred = combine(lib_tokens, confidence, token_pred, threshold)
        op_pred = lib_ops
        source = [("library" if c >= threshold else "decoder", f"{c:.4f}") for c in confidence]
        log.info("line library: %d of %d windows below the threshold %.4f take the decoder's line",
                 int((confidence < threshold).sum()), len(windows), threshold)
    lines = [vocab.decode_line(row) for row in token_pred]
    names = operation_names(cfg.encoder.n_operations, cfg.data.train_path)
    out = Path(cfg.predict.output) if cfg.predict.output else \
        cfg.run.run_dir / "predictions" / f"{Path(cfg.predict.input).stem}.nc"
    program = windows_to_program(lines)
    header = f"(predicted by cnc_gcode from {Path(cfg.predict.input).name}: {len(windows)} windows)"
    if windows.skipped_nan:
        header += f"\n(skipped {windows.skipped_nan} windows holding NaN/inf sensor values)"
    atomic_write_text(out, header + "\n" + "\n".join(program) + "\n")
    table = io.StringIO()
    writer = csv.writer(table)
    writer.writerow(["window", "operation", "gcode", *(["source", "library_confidence"] if source else [])])
    for i, (op, line) in enumerate(zip(op_pred, lines)):
        writer.writerow([i, names[int(op)], line, *(source[i] if source else [])])
    atomic_write_text(out.with_suffix(".csv"), table.getvalue())
    log.info("wrote %d program lines from %d windows to %s", len(program), len(windows), out)
    print(out)
    return 0


main = config_main(CncConfig, predict, __doc__, prog="python -m cnc_gcode.predict")

if __name__ == "__main__":
    raise SystemExit(main())
