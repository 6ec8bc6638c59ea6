"""Batch-1 latency of sensor window -> G-code line: encoder + full constrained greedy decode.

    python benchmarks/cnc_latency.py --config configs/cnc_gcode/sample.yaml --windows 200
    python benchmarks/cnc_latency.py --random-init          # no trained run needed (full-size random weights)

Three ways, same windows, same process, one CPU thread each:
    eager      PyTorch, the decoder re-runs the whole prefix at every step (the baseline)
    kv_cache   PyTorch, one position per step with cached self-attention keys/values and memory keys/values
    onnxrt     onnxruntime on the exported encoder and cached decoder step graphs
Prints p50 / p95 in milliseconds and each way's p50 speed-up over eager; --out writes the numbers as JSON.
Goal: p50 under 10 ms on 2 cores. A run trained with decoder.value_mode=regress is timed with its value heads.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cnc_gcode.config import CncConfig  # noqa: E402
from cnc_gcode.decoding import decode_cached, decode_uncached  # noqa: E402
from cnc_gcode.export_onnx import OnnxPipeline, export  # noqa: E402
from cnc_gcode.model import build_decoder, build_encoder  # noqa: E402
from cnc_gcode.tokenizer import Vocabulary  # noqa: E402
from cnc_gcode.virtual_mill import CHANNELS  # noqa: E402
from common.config import load_config  # noqa: E402


def percentiles(times_s: list[float]) -> dict[str, float]:
    ms = np.asarray(times_s) * 1000.0
    return {"p50_ms": float(np.percentile(ms, 50)), "p95_ms": float(np.percentile(ms, 95)), "n": len(ms)}


def load_pipeline(args: argparse.Namespace):
    cfg = load_config(CncConfig, args.config, args.overrides)
    if args.random_init:
        torch.manual_seed(0)
        vocab = Vocabulary()
        encoder = build_encoder(cfg.encoder, len(CHANNELS)).eval()
        decoder = build_decoder(cfg.decoder, vocab, cfg.encoder.hidden_dim).eval()
        rng = np.random.default_rng(0)
        continuous = rng.normal(size=(args.windows, 64, len(CHANNELS))).astype(np.float32)
        categorical = rng.integers(0, 3, size=(args.windows, 64, 4))
        return encoder, decoder, vocab, continuous, categorical, "random init"
    from cnc_gcode.checkpoints import load_models
    from cnc_gcode.data import load_split

    encoder, decoder, vocab, meta = load_models(cfg)
    test = load_split(cfg, "test", vocab, int(meta["continuous_dim"]))
    n = min(args.windows, len(test))
    return encoder, decoder, vocab, test.continuous[:n], test.categorical[:n], str(cfg.run.run_dir)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=None)
    parser.add_argument("--windows", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--random-init", action="store_true", help="full-size model with random weights")
    parser.add_argument("--out", default=None, help="write the results JSON here")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    encoder, decoder, vocab, continuous, categorical, source = load_pipeline(args)

    @torch.no_grad()
    def torch_way(decode):
        def run(i: int) -> np.ndarray:
            window = torch.from_numpy(continuous[i:i + 1])
            memory, _ = encoder(window, torch.from_numpy(categorical[i:i + 1]))
            # value heads (decoder.value_mode=regress) read values relative to the window's last measured position
            anchor = decoder.value_anchor(window) if decoder.regress else None
            return decode(decoder, memory, vocab, anchor)
        return run

    with tempfile.TemporaryDirectory() as tmp:
        export(encoder, decoder, Path(tmp), 17, continuous.shape[1], continuous.shape[2], categorical.shape[2])
        onnx = OnnxPipeline(tmp, vocab, threads=args.threads)
        ways = {"eager": torch_way(decode_uncached), "kv_cache": torch_way(decode_cached),
                "onnxrt": lambda i: onnx.decode(continuous[i:i + 1], categorical[i:i + 1])}
        outputs, results = {}, {}
        for name, run in ways.items():
            for i in range(min(args.warmup, len(continuous))):
                run(i)
            times, ids = [], []
            for i in range(len(continuous)):
                start = time.perf_counter()
                ids.append(run(i))
                times.append(time.perf_counter() - start)
            outputs[name] = np.concatenate(ids)
            results[name] = percentiles(times)
    base = results["eager"]["p50_ms"]
    print(f"cnc_gcode latency, batch 1, {args.threads} thread(s), {len(continuous)} windows ({source})")
    print(f"{'way':<10} {'p50 ms':>8} {'p95 ms':>8} {'speed-up vs eager':>18}")
    for name, r in results.items():
        r["speedup_p50_vs_eager"] = base / r["p50_ms"]
        print(f"{name:<10} {r['p50_ms']:8.2f} {r['p95_ms']:8.2f} {r['speedup_p50_vs_eager']:17.2f}x")
    same = {name: bool((outputs[name] == outputs["eager"]).all()) for name in outputs}
    print(f"identical greedy outputs vs eager: {same}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"source": source, "threads": args.threads, "results": results,
                                              "identical_outputs": same}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
