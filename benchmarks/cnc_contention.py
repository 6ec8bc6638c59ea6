"""The cnc_gcode training stages (a small demo budget) on an idle machine and beside busy processes.

    python benchmarks/cnc_contention.py                          # run.num_threads=0 (the package default)
    python benchmarks/cnc_contention.py --threads 0 2 --busy 2   # also the node's-cores setting, for comparison

For each thread setting, `train_encoder` + `train_decoder` run in a fresh subprocess (so torch starts with that setting),
first alone, then beside `--busy` processes that spin a CPU each (`while True: pass`), and the wall time of the two
stages (measured inside the subprocess, imports excluded) is compared: the goal is a contended / idle ratio within 3x.
A run longer than --timeout is stopped and reported as at least that long. Prints the table and writes it to --out
(default runs/benchmarks/cnc_contention.json). The result depends on what else runs on the machine: the load
average before each run is recorded beside it.
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

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from common.io import write_json  # noqa: E402
from common.threads import available_cpus  # noqa: E402

# A demo-sized run (the shapes of cnc_gcode.demo, fewer epochs and windows so the contended runs stay short).
BUDGET = ["encoder_train.epochs=2", "train.epochs=3", "train.patience=10", "data.max_train_windows=600",
          "decoder.d_model=64", "decoder.n_layers=2", "decoder.ff_dim=128", "encoder.hidden_dim=64"]
CHILD = """
import sys, time
from cnc_gcode import train_decoder, train_encoder
argv = sys.argv[1:]
start = time.perf_counter()
assert train_encoder.main(argv) == 0 and train_decoder.main(argv) == 0
import torch
print("RESULT", time.perf_counter() - start, torch.get_num_threads())
"""


def run_training(data: Path, runs: Path, name: str, threads: int, timeout: float) -> tuple[float, int | None, bool]:
    """(seconds, torch threads used, finished) of train_encoder + train in a subprocess."""
    argv = ["--config", str(REPO / "configs" / "cnc_gcode" / "tiny.yaml"), f"run.out_dir={runs}", f"run.name={name}",
            f"data.train_path={data / 'train.npz'}", f"data.val_path={data / 'val.npz'}",
            f"data.test_path={data / 'test.npz'}", f"run.num_threads={threads}", "encoder_train.resume=false",
            "train.resume=false", *BUDGET]
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    env["PYTHONPATH"] = str(REPO)
    start = time.perf_counter()
    try:
        done = subprocess.run([sys.executable, "-c", CHILD, *argv], cwd=REPO, env=env, capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        return time.perf_counter() - start, None, False
    if done.returncode != 0:
        raise SystemExit(f"training failed ({done.returncode}):\n{done.stderr[-3000:]}")
    line = next(x for x in done.stdout.splitlines() if x.startswith("RESULT"))
    _, seconds, used = line.split()
    return float(seconds), int(used), True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, nargs="+", default=[0], help="run.num_threads settings (0 = default)")
    parser.add_argument("--busy", type=int, default=2, help="busy-loop processes beside the contended runs")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds before a run is stopped")
    parser.add_argument("--programs", type=int, default=20, help="simulated programs of the data set")
    parser.add_argument("--out", default=str(REPO / "runs" / "benchmarks" / "cnc_contention.json"))
    args = parser.parse_args(argv)

    from cnc_gcode.sample_data import make_dataset

    rows = []
    with tempfile.TemporaryDirectory(prefix="cnc_contention_") as tmp:
        data, runs = Path(tmp) / "data", Path(tmp) / "runs"
        make_dataset(data, n_programs=args.programs, seed=0)
        for threads in args.threads:
            row = {"run.num_threads": threads, "cpus_available": available_cpus(), "busy_processes": args.busy}
            row["load_before_idle"] = os.getloadavg()[0]
            row["idle_s"], row["torch_threads"], _ = run_training(data, runs, f"idle{threads}", threads, args.timeout)
            busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.busy)]
            try:
                time.sleep(1.0)
                row["load_before_busy"] = os.getloadavg()[0]
                seconds, _, finished = run_training(data, runs, f"busy{threads}", threads, args.timeout)
            finally:
                for process in busy:
                    process.kill()
                    process.wait()
            row["busy_s"], row["busy_finished"] = seconds, finished
            row["ratio"] = seconds / row["idle_s"]
            rows.append(row)
            print(f"run.num_threads={threads} (torch {row['torch_threads']} of {row['cpus_available']} CPUs): idle "
                  f"{row['idle_s']:.1f} s, beside {args.busy} busy loops {'' if finished else '>'}{seconds:.1f} s, "
                  f"ratio {'' if finished else '>'}{row['ratio']:.1f}x (load {row['load_before_idle']:.1f} / "
                  f"{row['load_before_busy']:.1f})", flush=True)
    write_json(args.out, {"rows": rows, "budget": BUDGET})
    print(json.dumps({"out": args.out}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
