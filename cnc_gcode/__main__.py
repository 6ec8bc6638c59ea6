"""`python -m cnc_gcode` lists the stages."""

from common.cli import list_stages

STAGES = {
    "sample_data": "simulate machining programs -> sensor-window NPZ splits (OUT folder)",
    "simulate": "run your G-code programs on the virtual mill -> sensor-window NPZ + unsupported-line report",
    "build_vocab": "vocabulary from a G-code corpus + parse / round-trip report",
    "seed_vocab": "import the original's vocabulary_4digit_hybrid.json (and its NPZ token rows)",
    "ingest_umich": "UMich CNC mill CSV logs -> sensor-window NPZ splits by experiment",
    "baseline_umich": "UMich phase labels: tree models on per-row machine state vs file position (or, with "
                      "sequence-map labels, on measured windows)",
    "umich_lines": "UMich as G-code: program lines reconstructed from run 01, token accuracy on held-out runs "
                   "(measured channels): encoder + decoder, line library vs random forest, k-NN and majority",
    "train_encoder": "train the MMDTAELSTM encoder (operations + denoising reconstruction)",
    "train": "train the SensorMultiHeadDecoder over the frozen encoder",
    "line_library": "closed programs: a head that picks one of the program's lines + a regressed feed, the decoder "
                    "as its fallback below a threshold chosen on validation",
    "evaluate": "operation / token / digit metrics vs baselines, confusion plot",
    "predict": "sensor NPZ -> G-code text (constrained greedy decoding)",
    "export_onnx": "encoder + cached decoder step to ONNX, onnxruntime parity",
    "ablation_gamma": "focal-gamma table (CE, +label smoothing, gamma 1/2/3)",
    "ablation_modality": "sensor-modality table (remove each channel group)",
    "measured_only": "headline: measured channels only vs all channels vs nearest neighbour (op + token acc)",
}


def main() -> int:
    return list_stages("cnc_gcode", STAGES)


if __name__ == "__main__":
    raise SystemExit(main())
