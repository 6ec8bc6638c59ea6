"""`python -m cnc_gcode` lists the stages a user runs on their own data (the studies that reproduce our tables:
studies/cnc_gcode/README.md)."""

from common.cli import list_stages

STAGES = {
    "sample_data": "simulate machining programs -> sensor-window NPZ splits (OUT folder)",
    "simulate": "run your G-code programs on the virtual mill -> sensor-window NPZ + unsupported-line report",
    "build_vocab": "vocabulary from a G-code corpus + parse / round-trip report",
    "seed_vocab": "import the original's vocabulary_4digit_hybrid.json (and its NPZ token rows)",
    "train_encoder": "train the MMDTAELSTM encoder (operations + denoising reconstruction)",
    "train_decoder": "train the SensorMultiHeadDecoder over the frozen encoder",
    "line_library": "closed programs: a head that picks one of the program's lines + a regressed feed, the decoder "
                    "as its fallback below a threshold chosen on validation",
    "evaluate": "operation / token / digit metrics vs baselines, confusion plot",
    "predict": "sensor NPZ -> G-code text (constrained greedy decoding)",
    "export_onnx": "encoder + cached decoder step to ONNX, onnxruntime parity",
}


def main() -> int:
    return list_stages("cnc_gcode", STAGES)


if __name__ == "__main__":
    raise SystemExit(main())
