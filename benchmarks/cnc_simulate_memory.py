"""Peak memory of `cnc_gcode.simulate` on a long program: windows streamed to disk in chunks vs all in memory.

    python benchmarks/cnc_simulate_memory.py                    # a 20,000-line synthetic program
    python benchmarks/cnc_simulate_memory.py --lines 51551      # the size of the 51,567-line table in RESULTS.md

Writes a long 3-axis program (generated operations, one after another, with spindle and coolant words), then runs
the simulate stage twice, each in its own subprocess, and reads each child's peak resident set size from
`os.wait4`: `simulate.chunk_samples=0` (the whole program at once, every window held until np.savez at the end: the
earlier way) and the default chunked way. Checks that both outputs hold the same arrays, prints the table with the
ratio and writes it to --out (default runs/benchmarks/cnc_simulate_memory.json).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cnc_gcode.virtual_mill import CUTTING_OPS, generate_program  # noqa: E402
from common.io import write_json  # noqa: E402


def write_program(path: Path, n_lines: int, seed: int) -> int:
    """A program of about n_lines lines: generated operations back to back (their M30 left out)."""
    rng = np.random.default_rng(seed)
    lines = ["G21 G90 G17", "S9000 M3", "M8"]
    while len(lines) < n_lines:
        lines += generate_program(rng, str(rng.choice(CUTTING_OPS)), n_ops=3)[0][:-1]
    lines.append("M30")
    path.write_text("\n".join(lines) + "\n")
    return len(lines)


def run_simulate(program: Path, out: Path, chunk_samples: int | None) -> dict:
    """Run the stage in a child process; its wall time and peak RSS (MiB)."""
    argv = [sys.executable, "-m", "cnc_gcode.simulate", f"simulate.input={program}", f"simulate.out={out}"]
    if chunk_samples is not None:
        argv.append(f"simulate.chunk_samples={chunk_samples}")
    start = time.perf_counter()
    child = subprocess.Popen(argv, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE)
    _, status, usage = os.wait4(child.pid, 0)
    stderr = child.stderr.read().decode()
    child.stderr.close()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"simulate failed:\n{stderr[-3000:]}")
    return {"seconds": time.perf_counter() - start, "peak_rss_mib": usage.ru_maxrss / 1024,
            "output_mib": out.stat().st_size / 2**20}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lines", type=int, default=20_000, help="lines of the synthetic program")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(REPO / "runs" / "benchmarks" / "cnc_simulate_memory.json"))
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="cnc_simulate_memory_") as tmp:
        program = Path(tmp) / "long.nc"
        n_lines = write_program(program, args.lines, args.seed)
        in_memory = run_simulate(program, Path(tmp) / "whole.npz", 0)
        chunked = run_simulate(program, Path(tmp) / "chunked.npz", None)
        with np.load(Path(tmp) / "whole.npz") as whole, np.load(Path(tmp) / "chunked.npz") as streamed:
            same = sorted(whole.files) == sorted(streamed.files) and all(
                np.array_equal(whole[k], streamed[k]) for k in whole.files)
            windows = len(streamed["tokens"])
    result = {"lines": n_lines, "windows": windows, "all_in_memory": in_memory, "chunked": chunked,
              "peak_rss_ratio": in_memory["peak_rss_mib"] / chunked["peak_rss_mib"], "identical_outputs": same,
              "measured": "each way in its own subprocess, peak RSS from os.wait4"}
    for name in ("all_in_memory", "chunked"):
        row = result[name]
        print(f"{name:14s} peak RSS {row['peak_rss_mib']:8.0f} MiB  time {row['seconds']:6.1f} s  "
              f"output {row['output_mib']:.0f} MiB")
    print(f"{n_lines} lines, {windows} windows: all-in-memory / chunked peak RSS = {result['peak_rss_ratio']:.2f}x; "
          f"identical outputs: {same}")
    write_json(args.out, result)
    print(json.dumps({"out": args.out}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
