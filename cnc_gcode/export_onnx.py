"""Export the encoder and the cached decoder step to ONNX and check onnxruntime against PyTorch.

    python -m cnc_gcode.export_onnx --config configs/cnc_gcode/sample.yaml

Writes <run_dir>/onnx/encoder.onnx, decoder_step.onnx, vocab.json and parity.json. Graphs:
    encoder.onnx       continuous [B,T,C] f32, categorical [B,T,K] i64
                       -> memory [B,T,H], op_logits [B,9], cross_kv [layers,2,B,heads,T,hd], context [B,1,D]
    decoder_step.onnx  token [B,1] i64, position [1] i64, cache [layers,2,B,heads,L,hd], cross_kv, context
                       -> type, command, ptype, exponent [B,.], digits [B,K,10], new_cache
With value heads (decoder.value_mode=regress) the encoder graph also gives `anchor` [B, letters] (the window's
last measured X/Y/Z, read from the raw input), the step graph takes it and gives `value` [B, letters] (each
letter's regressed value in program units), and value_heads.json holds the decimals they are rounded to.
The decoder's cross-attention keys/values are computed once inside the encoder graph, so each step only
attends. Parity: max |onnxruntime - PyTorch| over memory, operation logits and every step's logits along the
greedy path, and whether the constrained greedy outputs are identical (with value heads also the largest value
difference, and `greedy_rounding_only`: rows that differ do so first at a value one rounding step apart).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch
from torch import nn

from cnc_gcode.checkpoints import load_models
from cnc_gcode.config import CncConfig, set_threads
from cnc_gcode.data import load_split
from cnc_gcode.decoding import decode_cached, greedy_decode
from cnc_gcode.model import HEADS, VALUE_HEAD
from cnc_gcode.tokenizer import Vocabulary
from common.cli import config_main
from common.io import write_json
from common.logs import setup_logging

log = logging.getLogger(__name__)
ENCODER_FILE, STEP_FILE, VALUE_FILE = "encoder.onnx", "decoder_step.onnx", "value_heads.json"


class EncoderGraph(nn.Module):
    def __init__(self, encoder, decoder) -> None:
        super().__init__()
        self.encoder, self.decoder = encoder, decoder

    def forward(self, continuous, categorical):
        memory, op_logits = self.encoder(continuous, categorical)
        out = (memory, op_logits, self.decoder.cross_kv(memory), self.decoder.step_context(memory))
        return (*out, self.decoder.value_anchor(continuous)) if self.decoder.regress else out


class StepGraph(nn.Module):
    def __init__(self, decoder) -> None:
        super().__init__()
        self.decoder = decoder

    def forward(self, token, position, cache, cross_kv, context, anchor=None):
        logits, new_cache = self.decoder.step(token, position, cache, cross_kv, context)
        heads = [logits[h][:, 0] for h in HEADS]
        if self.decoder.regress:
            heads.append(self.decoder.absolute_values(logits[VALUE_HEAD][:, 0], anchor))
        return (*heads, new_cache)


def export(encoder, decoder, out_dir: Path, opset: int, window: int, channels: int, n_categorical: int) -> None:
    """Write both graphs (legacy TorchScript exporter: LSTM and the fixed-size cache export with dynamic batch
    and window length and no onnxscript rewriting)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    continuous = torch.zeros(2, window, channels)
    categorical = torch.zeros(2, window, n_categorical, dtype=torch.long)
    enc_graph = EncoderGraph(encoder, decoder).eval()
    value = ["anchor"] if decoder.regress else []
    tmp = out_dir / f".{ENCODER_FILE}.tmp"
    torch.onnx.export(enc_graph, (continuous, categorical), str(tmp), opset_version=opset, dynamo=False,
                      input_names=["continuous", "categorical"],
                      output_names=["memory", "op_logits", "cross_kv", "context", *value],
                      dynamic_axes={"continuous": {0: "batch", 1: "time"}, "categorical": {0: "batch", 1: "time"},
                                    "memory": {0: "batch", 1: "time"}, "op_logits": {0: "batch"},
                                    "cross_kv": {2: "batch", 4: "time"}, "context": {0: "batch"},
                                    **{k: {0: "batch"} for k in value}})
    tmp.replace(out_dir / ENCODER_FILE)
    with torch.no_grad():
        _, _, cross, context, *anchor = enc_graph(continuous, categorical)
    step_graph = StepGraph(decoder).eval()
    args = (torch.full((2, 1), 2, dtype=torch.long), torch.tensor([0]), decoder.empty_cache(2), cross, context,
            *anchor)
    heads = [*HEADS, VALUE_HEAD] if decoder.regress else list(HEADS)
    tmp = out_dir / f".{STEP_FILE}.tmp"
    torch.onnx.export(step_graph, args, str(tmp), opset_version=opset, dynamo=False,
                      input_names=["token", "position", "cache", "cross_kv", "context", *value],
                      output_names=[*heads, "new_cache"],
                      dynamic_axes={"token": {0: "batch"}, "cache": {2: "batch"}, "cross_kv": {2: "batch", 4: "time"},
                                    "context": {0: "batch"}, **{k: {0: "batch"} for k in value},
                                    **{h: {0: "batch"} for h in heads}, "new_cache": {2: "batch"}})
    tmp.replace(out_dir / STEP_FILE)
    value_file = out_dir / VALUE_FILE
    if decoder.regress:  # what the host needs besides the graphs: the rounding of each letter's value
        write_json(value_file, {"letters": list(decoder.vocab.letters), "decimals": decoder.value_decimals.tolist(),
                                "digits_confidence": decoder.value_digits_confidence})
    elif value_file.exists():
        value_file.unlink()


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
        value_file = Path(onnx_dir) / VALUE_FILE
        value_heads = json.loads(value_file.read_text(encoding="utf-8")) if value_file.is_file() else {}
        self.value_decimals = np.asarray(value_heads["decimals"]) if value_heads else None
        self.value_confidence = float(value_heads.get("digits_confidence", 2.0))
        self.heads = [*HEADS, VALUE_HEAD] if self.value_decimals is not None else list(HEADS)

    def encode(self, continuous: np.ndarray, categorical: np.ndarray):
        return self.encoder.run(None, {"continuous": continuous.astype(np.float32),
                                       "categorical": categorical.astype(np.int64)})

    def decode(self, continuous: np.ndarray, categorical: np.ndarray, record: list | None = None) -> np.ndarray:
        """Greedy constrained ids [B,L]; `record` (a list) receives each step's logits for parity checks."""
        _, _, cross, context, *anchor = self.encode(continuous, categorical)
        batch = continuous.shape[0]
        layers = self.step.get_inputs()[2].shape[0]  # static: the decoder's layer count
        heads, head_dim = cross.shape[3], cross.shape[5]
        state = {"cache": np.zeros((layers, 2, batch, heads, self.vocab.max_tokens, head_dim), dtype=np.float32)}

        def step(previous: np.ndarray, position: int) -> dict[str, np.ndarray]:
            feeds = {"token": previous.reshape(batch, 1).astype(np.int64),
                     "position": np.array([position], dtype=np.int64), "cache": state["cache"], "cross_kv": cross,
                     "context": context}
            if anchor:
                feeds["anchor"] = anchor[0]
            outputs = self.step.run(None, feeds)
            state["cache"] = outputs[-1]
            logits = dict(zip(self.heads, outputs[:-1]))
            if record is not None:
                record.append(logits)
            return logits

        return greedy_decode(step, self.vocab, batch, self.value_decimals, self.value_confidence)


@torch.no_grad()
def parity(encoder, decoder, vocab, pipeline: OnnxPipeline, continuous: np.ndarray, categorical: np.ndarray) -> dict:
    """Max abs differences between onnxruntime and PyTorch, and whether greedy outputs agree."""
    memory, op_logits = encoder(torch.from_numpy(continuous), torch.from_numpy(categorical))
    ort_memory, ort_ops, *_ = pipeline.encode(continuous, categorical)
    anchor = decoder.value_anchor(torch.from_numpy(continuous)) if decoder.regress else None
    torch_ids = decode_cached(decoder, memory, vocab, anchor)
    recorded: list = []
    ort_ids = pipeline.decode(continuous, categorical, recorded)
    # Replay PyTorch along the onnxruntime path to compare step logits position by position.
    cross, cache, context = decoder.cross_kv(memory), decoder.empty_cache(len(continuous)), decoder.step_context(memory)
    previous = torch.full((len(continuous), 1), 2, dtype=torch.long)
    step_diff, value_diff = 0.0, 0.0
    for position, ort_logits in enumerate(recorded):
        logits, cache = decoder.step(previous, torch.tensor([position]), cache, cross, context)
        for head in HEADS:
            step_diff = max(step_diff, float(np.abs(logits[head][:, 0].numpy() - ort_logits[head]).max()))
        if decoder.regress:  # in program units (mm, mm/min, rpm)
            values = decoder.absolute_values(logits[VALUE_HEAD][:, 0], anchor).numpy()
            value_diff = max(value_diff, float(np.abs(values - ort_logits[VALUE_HEAD]).max()))
        previous = torch.from_numpy(ort_ids[:, position:position + 1].copy())  # PAD for finished rows, as ORT saw
    report = {"windows": len(continuous), "max_abs_diff_memory": float(np.abs(memory.numpy() - ort_memory).max()),
              "max_abs_diff_op_logits": float(np.abs(op_logits.numpy() - ort_ops).max()),
              "max_abs_diff_step_logits": step_diff, "greedy_identical": bool((torch_ids == ort_ids).all())}
    if decoder.regress:
        report["max_abs_diff_values"] = value_diff
        report["greedy_rounding_only"] = rounding_only(vocab, torch_ids, ort_ids, decoder.value_decimals.numpy())
    return report


def rounding_only(vocab: Vocabulary, ids_a: np.ndarray, ids_b: np.ndarray, decimals: np.ndarray) -> bool:
    """True when every row of two greedy decodings is identical or first differs at a parameter of the same letter
    whose values are one rounding step (10**-decimals) apart: a regressed value that float32 noise between the two
    runtimes put on either side of a rounding boundary (the rest of that row then follows a different input)."""
    from cnc_gcode.metrics import param_values

    fields_a, fields_b = vocab.fields(ids_a), vocab.fields(ids_b)
    values_a, values_b = param_values(fields_a), param_values(fields_b)
    for row in np.flatnonzero((ids_a != ids_b).any(1)):
        col = int(np.flatnonzero(ids_a[row] != ids_b[row])[0])
        ptype_a, ptype_b = fields_a["ptype"][row, col], fields_b["ptype"][row, col]
        if ptype_a < 0 or ptype_b < 0 or ptype_a // 2 != ptype_b // 2:
            return False
        step = 10.0 ** -int(decimals[ptype_a // 2])
        if abs(abs(values_a[row, col] - values_b[row, col]) - step) > 1e-6 * max(1.0, abs(values_a[row, col])):
            return False
    return True


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
