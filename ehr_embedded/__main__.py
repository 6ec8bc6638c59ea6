"""`python -m ehr_embedded` lists the stages."""

from common.cli import list_stages

STAGES = {
    "sample_data": "write a small MEDS dataset with a learnable, leakage-trapped label (OUT_DIR)",
    "convert_mimic": "MIMIC-IV demo (shared MEDS-like parquet + raw dictionaries) -> canonical MEDS + real tasks",
    "create_vocab_embeddings": "vocabulary from train, one description per code, embedded once (MiniLM by default)",
    "create_embeddings": "sequences cut at prediction_time -> compact per-split store (+ optional .pt export)",
    "export_pt": "write the original per-patient .pt files from a compact store",
    "pretrain": "causal decoder on next-event prediction",
    "finetune": "encoder or decoder classifier; threshold on tuning; held_out score",
    "optuna_worker": "one Optuna worker tuning finetune on tuning AUROC (several share one RDB study; pruning)",
    "fetch_best_and_train": "the study's best trial's parameters -> a full finetune run with its held_out report",
    "evaluate": "binary AUROC/AUPRC/F1/accuracy/Brier or multi-class accuracy/macro F1/AUROC; subject-bootstrap CIs",
    "predict": "a finetuned run's predictions on one split of a store (MEDS predictions parquet)",
    "baseline": "count features + logistic regression on the same sequences and splits",
    "represent": "a finetuned run's pooled patient representations per (subject, prediction_time) -> parquet",
    "linear_probe": "standardised logistic regression on exported representations (C on tuning), held_out with CIs",
    "summarize": "held-out reports of finished runs -> one markdown + JSON table (mean +- sd rows for repeated labels)",
    "demo": "the whole chain on generated sample data (OUT_DIR), 1-3 minutes on 2 cores",
}

if __name__ == "__main__":
    raise SystemExit(list_stages("ehr_embedded", STAGES))
