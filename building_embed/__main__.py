"""`python -m building_embed` lists the stages."""

from common.cli import list_stages

STAGES = {
    "sample_data": "rendered facades -> 3D Street View style tar shards + manifest of injected traps (OUT folder)",
    "preprocess.process_tar": "stream tar shards -> parquet intermediates; unsafe / corrupt members counted",
    "preprocess.fix_intermediate_schema": "cast intermediates written by older code to the current schema",
    "generate.generate_embeddings": "DINOv2 / DINOv3 (timm or transformers, local weights) -> float16 parquet",
    "preprocess.compute_fingerprints": "SHA-256 + perceptual hash of every image",
    "preprocess.merge_and_split": "join, dedup, split by identity and place, cross-split leak audit",
    "preprocess.summarize_ids": "images / identities / place groups per split",
    "difficulty.compute_visual_neighbors": "exact kNN -> difficulty bands (difficulty_metadata.parquet)",
    "train.train": "projection head: triplet loss, P x K batches, UCB1-chosen difficulty band; head vs frozen report",
    "train.multisplit": "frozen vs trained head vs PCA + LDA over repeated identity folds: paired intervals, win/tie/loss",
    "train.optuna_worker": "one Optuna worker on a shared RDB study (run several at once), pruned on val mAP@R",
    "train.fetch_best_and_train": "the study's best trial's params -> the final training run",
    "publish.convert_to_hf": "trainer checkpoint + config -> Hugging Face directory (safetensors, auto_map, remote code)",
    "publish.generate_embeddings_from_hf": "images -> backbone -> published head -> float32 embeddings parquet",
    "publish.generate_embeddings_from_parquet": "stored backbone embeddings -> published head -> parquet, ids kept",
    "publish.demo_usage": "load a published model, embed stored embeddings, print nearest neighbours",
    "publish.estimate_model_size": "parameters, fp32 / fp16 bytes, safetensors size of a published model",
}


def main() -> int:
    return list_stages("building_embed", STAGES)


if __name__ == "__main__":
    raise SystemExit(main())
