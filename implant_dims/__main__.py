"""`python -m implant_dims` lists the stages."""

from common.cli import list_stages

STAGES = {
    "sample_data": "synthetic implant radiograph crops in the original JSON layout (OUT folder)",
    "crop_yolo": "real panoramic X-rays + YOLO boxes -> implant crops (unknown sizes) for predict",
    "train_classifier": "ViT company or model-type classifier -> embedding model (accuracy, top-k, confusion)",
    "train_regression": "single-embedding regressor (one classifier's embedding + visual features), the baseline",
    "train_dual": "dual-embedding regressor: attention fusion, progressive unfreezing, MAE per dimension",
    "hpo": "Optuna study (classifier accuracy or dual mean MAE), parallel workers on one storage",
    "analyze_tuning_results": "best trials table, parameter importances, optimisation history",
    "baselines": "mean / median / pixel ridge / pixel kNN / caliper (bright-blob extent) baselines on the same split",
    "predict": "images / DICOM / JSON -> CSV of length, diameter and an uncertainty each",
}


def main() -> int:
    return list_stages("implant_dims", STAGES)


if __name__ == "__main__":
    raise SystemExit(main())
