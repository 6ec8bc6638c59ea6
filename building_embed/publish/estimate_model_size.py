"""Size of a published model: parameters, bytes in float32 / float16, the safetensors file, embedding storage.

    python -m building_embed.publish.estimate_model_size published/ [--json size.json]

Parameters of the head LayerNorm(I) -> Linear(I, H) -> GELU -> Dropout -> Linear(H, O):
2 I + (I H + H) + (H O + O). Also prints what a million output embeddings take in float16 / float32.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from building_embed.publish.hub import IntermixedParser, load_published
from common.cli import guarded_main
from common.io import write_json


def head_parameter_count(input_dim: int, hidden_dim: int, output_dim: int) -> int:
    """The closed form above (what the module's parameters must add up to)."""
    return 2 * input_dim + input_dim * hidden_dim + hidden_dim + hidden_dim * output_dim + output_dim


def estimate(model_dir: str | Path) -> dict:
    model_dir = Path(model_dir)
    model = load_published(model_dir)
    c = model.config
    params = sum(p.numel() for p in model.parameters())
    expected = head_parameter_count(c.input_dim, c.hidden_dim, c.output_dim)
    if params != expected:
        raise RuntimeError(f"{model_dir}: {params} parameters, the closed form says {expected}")
    weights = model_dir / "model.safetensors"
    return {"model_dir": str(model_dir), "input_dim": c.input_dim, "hidden_dim": c.hidden_dim,
            "output_dim": c.output_dim, "parameters": params,
            "parameters_by_tensor": {k: v.numel() for k, v in model.state_dict().items()},
            "bytes_fp32": 4 * params, "bytes_fp16": 2 * params,
            "safetensors_file_bytes": weights.stat().st_size,
            "safetensors_header_bytes": weights.stat().st_size - 4 * params,
            "embeddings_per_million_bytes": {"fp16": 2 * c.output_dim * 10**6, "fp32": 4 * c.output_dim * 10**6}}


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f} MiB"


def _run(args: argparse.Namespace) -> int:
    report = estimate(args.model_dir)
    print(f"{report['model_dir']}: head {report['input_dim']} -> {report['hidden_dim']} -> {report['output_dim']}")
    print(f"  parameters            {report['parameters']:,}")
    print(f"  float32 / float16     {_mib(report['bytes_fp32'])} / {_mib(report['bytes_fp16'])}")
    print(f"  model.safetensors     {report['safetensors_file_bytes']:,} bytes "
          f"({report['safetensors_header_bytes']:,} of them header)")
    per_million = report["embeddings_per_million_bytes"]
    print(f"  1M output embeddings  {_mib(per_million['fp16'])} fp16 / {_mib(per_million['fp32'])} fp32")
    if args.json:
        write_json(args.json, report)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = IntermixedParser(prog="python -m building_embed.publish.estimate_model_size", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_dir", help="a directory written by convert_to_hf")
    parser.add_argument("--json", default=None, help="also write the figures to this JSON file")
    return parser


main = guarded_main(_run, build_parser())

if __name__ == "__main__":
    raise SystemExit(main())
