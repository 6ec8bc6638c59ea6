"""Export the encoder and the cached decoder step to ONNX and check onnxruntime against PyTorch.

    python -m cnc_gcode.export_onnx --config configs/cnc_gcode/sample.yaml

Writes <run_dir>/onnx/encoder.onnx, decoder_step.onnx, vocab.json and parity.json. Graphs:
    encoder.onnx       continuous [B,T,C] f32, categorical [B,T,K] i64
                       -> memory [B,T,H], op_logits [B,9], cross_kv [layers,2,B,heads,T,hd], context [B,1,D]
    decoder_step.onnx  token [B,1] i64, position [1] i64, cache [layers,2,B,heads,L,hd], cross_kv, context
                       -> type, command, ptype, exponent [B,.], digits [B,K,10], new_cache
The decoder's cross-attention keys/values are computed once inside the encoder graph, so each step only
attends. Parity: max |onnxruntime - PyTorch| over memory, operation logits and every step's logits along the
greedy path, and whether the constrained greedy outputs are identical.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from torch import nn

from cnc_gcode.config import CncConfig
from cnc_gcode.decoding import decode_cached, greedy_decode
from cnc_gcode.model import HEADS
from cnc_gcode.runtime import load_models, load_split, set_threads
from cnc_gcode.tokenizer import Vocabulary
from common.cli import config_main
from common.io import write_json
from common.logs import setup_logging

log = logging.getLogger(__name__)
ENCODER_FILE, STEP_FILE = "encoder.onnx", "decoder_step.onnx"


class EncoderGraph(nn.Module):
    def __init__(self, encoder, decoder) -> None:
        super().__init__()
        self.encoder, self.decoder = encoder, decoder

    def forward(self, continuous, categorical):
        memory, op_logits = self.encoder(continuous, categorical)
        return memory, op_logits, self.decoder.cross_kv(memory), self.decoder.step_context(memory)


class StepGraph(nn.Module):
    def __init__(self, decoder) -> None:
        super().__init__()
        self.decoder = decoder

    def forward(self, token, position, cache, cross_kv, context):
        logits, new_cache = self.decoder.step(token, position, cache, cross_kv, context)
        return (*[logits[h][:, 0] for h in HEADS], new_cache)


def export(encoder, decoder, out_dir: Path, opset: int, window: int, channels: int, n_categorical: int) -> None:
    """Write both graphs (legacy TorchScript exporter: LSTM and the fixed-size cache export with dynamic batch
    and window length and no onnxscript rewriting)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    continuous = torch.zeros(2, window, channels)
    categorical = torch.zeros(2, window, n_categorical, dtype=torch.long)
    enc_graph = EncoderGraph(encoder, decoder).eval()
    tmp = out_dir / f".{ENCODER_FILE}.tmp"
    torch.onnx.export(enc_graph, (continuous, categorical), str(tmp), opset_version=opset, dynamo=False,
                      input_names=["continuous", "categorical"],
                      output_names=["memory", "op_logits", "cross_kv", "context"],
                      dynamic_axes={"continuous": {0: "batch", 1: "time"}, "categorical": {0: "batch", 1: "time"},
                                    "memory": {0: "batch", 1: "time"}, "op_logits": {0: "batch"},
                                    "cross_kv": {2: "batch", 4: "time"}, "context": {0: "batch"}})
    tmp.replace(out_dir / ENCODER_FILE)
    with torch.no_grad():
        _, _, cross, context = enc_graph(continuous, categorical)
    step_graph = StepGraph(decoder).eval()
    args = (torch.full((2, 1), 2, dtype=torch.long), torch.tensor([0]), decoder.empty_cache(2), cross, context)
    tmp = out_dir / f".{STEP_FILE}.tmp"
    torch.onnx.export(step_graph, args, str(tmp), opset_version=opset, dynamo=False,
                      input_names=["token", "position", "cache", "cross_kv", "context"],
                      output_names=[*HEADS, "new_cache"],
                      dynamic_axes={"token": {0: "batch"}, "cache": {2: "batch"}, "cross_kv": {2: "batch", 4: "time"},
                                    "context": {0: "batch"},
                                    **{h: {0: "batch"} for h in HEADS}, "new_cache": {2: "batch"}})
    tmp.replace(out_dir / STEP_FILE)


class OnnxPipeline:
    """onnxruntime sessions of both graphs plus the shared constrained greedy decoder."""

    def __init__(self, onnx_dir: str | Path, vocab: Vocabulary, threads: int = 1) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        providers = ["CPUExecutionProvider"]
        self.encoder = ort.InferenceSession(str(Path(onnx_dir) / ENCODER_FILE), options, providers=providers)
        self.step = ort.InferenceSession(str(Path(onnx_dir) / STEP_FILE), options, providers=providers)
        self.vocab = vocab

    def encode(self, continuous: np.ndarray, categorical: np.ndarray):
        return self.encoder.run(None, {"continuous": continuous.astype(np.float32),
                                       "categorical": categorical.astype(np.int64)})

    def decode(self, continuous: np.ndarray, categorical: np.ndarray, record: list | None = None) -> np.ndarray:
        """Greedy constrained ids [B,L]; `record` (a list) receives each step's logits for parity checks."""
        _, _, cross, context = self.encode(continuous, categorical)
        batch = continuous.shape[0]
        layers = self.step.get_inputs()[2].shape[0]  # static: the decoder's layer count
        heads, head_dim = cross.shape[3], cross.shape[5]
        state = {"cache": np.zeros((layers, 2, batch, heads, self.vocab.max_tokens, head_dim), dtype=np.float32)}

        def step(previous: np.ndarray, position: int) -> dict[str, np.ndarray]:
            outputs = self.step.run(None, {"token": previous.reshape(batch, 1).astype(np.int64),
                                           "position": np.array([position], dtype=np.int64),
                                           "cache": state["cache"], "cross_kv": cross, "context": context})
            state["cache"] = outputs[-1]
            logits = dict(zip(HEADS, outputs[:-1]))
            if record is not None:
                record.append(logits)
            return logits

        return greedy_decode(step, self.vocab, batch)


@torch.no_grad()
def parity(encoder, decoder, vocab, pipeline: OnnxPipeline, continuous: np.ndarray, categorical: np.ndarray) -> dict:
    """Max abs differences between onnxruntime and PyTorch, and whether greedy outputs agree."""
    memory, op_logits = encoder(torch.from_numpy(continuous), torch.from_numpy(categorical))
    ort_memory, ort_ops, _, _ = pipeline.encode(continuous, categorical)
    torch_ids = decode_cached(decoder, memory, vocab)
    recorded: list = []
    ort_ids = pipeline.decode(continuous, categorical, recorded)
    # Replay PyTorch along the onnxruntime path to compare step logits position by position.
    cross, cache, context = decoder.cross_kv(memory), decoder.empty_cache(len(continuous)), decoder.step_context(memory)
    previous = torch.full((len(continuous), 1), 2, dtype=torch.long)
    step_diff = 0.0
    for position, ort_logits in enumerate(recorded):
        logits, cache = decoder.step(previous, torch.tensor([position]), cache, cross, context)
        for head in HEADS:
            step_diff = max(step_diff, float(np.abs(logits[head][:, 0].numpy() - ort_logits[head]).max()))
        previous = torch.from_numpy(ort_ids[:, position:position + 1].copy())  # PAD for finished rows, as ORT saw
    return {"windows": len(continuous), "max_abs_diff_memory": float(np.abs(memory.numpy() - ort_memory).max()),
            "max_abs_diff_op_logits": float(np.abs(op_logits.numpy() - ort_ops).max()),
            "max_abs_diff_step_logits": step_diff, "greedy_identical": bool((torch_ids == ort_ids).all())}


def export_stage(cfg: CncConfig) -> int:
    set_threads(cfg)
    setup_logging()
    encoder, decoder, vocab, meta = load_models(cfg)
    out_dir = Path(cfg.export.out_dir) if cfg.export.out_dir else cfg.run.run_dir / "onnx"
    windows = load_split(cfg, "test", vocab, int(meta["continuous_dim"]))
    n = min(cfg.export.parity_windows, len(windows))
    export(encoder, decoder, out_dir, cfg.export.opset, windows.continuous.shape[1], windows.continuous.shape[2],
           windows.categorical.shape[2])
    vocab.save(out_dir / "vocab.json")
    report = parity(encoder, decoder, vocab, OnnxPipeline(out_dir, vocab), windows.continuous[:n],
                    windows.categorical[:n])
    write_json(out_dir / "parity.json", report)
    log.info("onnx parity: %s", report)
    print(f"onnx: {out_dir} {report}")
    return 0


main = config_main(CncConfig, export_stage, __doc__, prog="python -m cnc_gcode.export_onnx")

if __name__ == "__main__":
    raise SystemExit(main())
