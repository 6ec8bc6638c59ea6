"""Two-process DDP (torchrun, gloo on CPU): finetune and pretrain run, rank 0 alone writes, ranks stay in step."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from ehr_helpers import TINY_MODEL

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_torchrun_two_processes_finetune(built, tmp_path):
    run = tmp_path / "ddp"
    args = [*TINY_MODEL, f"data.embedding_output_dir={built.store}", f"training.output_dir={run}",
            "training.epochs=2", "training.batch_size=8", "training.save_every=0", "evaluate.n_bootstrap=50",
            "training.num_threads=1"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29513",
           "-m", "ehr_embedded.finetune", *args]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["epoch"] for x in lines] == [1, 2]  # rank 0 alone writes metrics
    report = json.loads((run / "reports" / "eval_held_out.json").read_text())
    assert 0.0 <= report["auroc"]["value"] <= 1.0
    assert (run / "checkpoints" / "best" / "model.safetensors").is_file()
