"""torchrun DDP (gloo, CPU) of the encoder and decoder stages: 2 processes, and 2 single-process "nodes" joined by a
c10d rendezvous on localhost, take the steps one process takes with the same global batch; only rank 0 writes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file
from torchrun_launch import free_port, launch_env, torchrun

from cnc_gcode import train_decoder, train_encoder
from cnc_gcode.config import CncConfig
from cnc_gcode.model import build_decoder, build_encoder
from cnc_gcode.tokenizer import load_vocabulary
from common.config import load_config
from common.logs import read_metrics
from common.seed import seed_everything

pytestmark = pytest.mark.slow  # subprocesses that import torch: 20-40 s each on 2 shared cores
REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "configs" / "cnc_gcode" / "tiny.yaml"
# Dropout off (it draws per rank); the encoder's DTAE noise stays on: every rank draws the whole global batch's noise
# from the one seeded stream. A global batch of 15 splits 8 / 7 between the ranks and 91 windows end in a batch of one
# (rank 1 runs a placeholder row with weight 0): the share weighting of unequal parts is exercised, and for the decoder
# unequal token counts per head.
ENCODER = ("encoder.dropout=0", "encoder_train.epochs=2", "encoder_train.batch_size=15", "data.max_train_windows=91",
           "run.num_threads=1")
DECODER = ("decoder.dropout=0", "train.epochs=2", "train.batch_size=15", "train.warmup_epochs=1")
# Tolerances. The same global batch goes through the same ops, but as two half-batches whose gradients gloo sums:
# the float32 summation order differs (GEMM blocking by batch size, the all-reduce), which moves the weights by a few
# ulp per step; after 14 AdamW steps the largest difference measured here is 1.2e-7 (encoder) and 2.4e-7 (decoder),
# the train loss 5e-8 relative. 1e-5 leaves 40x room for other BLAS builds and is still 1000x below what training
# moves (asserted > 1e-2 below), so a rank that dropped its share weighting, double-counted a row or drew other noise
# fails it.
WEIGHT_TOL = 1e-5
LOSS_REL_TOL = 1e-5


def two_node_torchrun(module: str, argv: list[str]) -> list[subprocess.CompletedProcess]:
    """Two torchrun launchers, one process each, as nodes 0 and 1 of a c10d rendezvous on 127.0.0.1 (node 0 hosts
    the rendezvous store)."""
    port = free_port()
    launchers = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node_rank={node}",
                                   "--nproc_per_node=1", "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}",
                                   "--rdzv_id=cnc_two_nodes", f"--rdzv_conf=is_host={int(node == 0)}",
                                   "-m", module, *argv],
                                  cwd=REPO, env=launch_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for node in (0, 1)]
    done = []
    try:
        for proc in launchers:
            stdout, stderr = proc.communicate(timeout=300)
            done.append(subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr))
    finally:
        for proc in launchers:
            if proc.poll() is None:
                proc.kill()
    for node, result in enumerate(done):
        assert result.returncode == 0, (node, result.stderr[-4000:])
    return done


def args(stage_args, sample_dir: Path, runs: Path, name: str, *extra: str) -> list[str]:
    return stage_args(sample_dir, runs, name, *ENCODER, *extra)


def weights(stage_dir: Path) -> dict[str, np.ndarray]:
    return load_file(str(stage_dir / "checkpoints" / "latest" / "model.safetensors"))


def determined(key: str, value: np.ndarray) -> np.ndarray:
    """The part of a weight that the loss determines. Not the attention key biases (first half of `*.kv.bias`):
    softmax is unchanged by adding q.b_k to every score of a query, so their true gradient is 0 and what they get is
    rounding noise, which AdamW divides by its own root mean square into lr-sized steps (measured: 6e-5 apart after
    14 steps while every other entry agrees to 2.4e-7)."""
    return value[len(value) // 2:] if key.endswith("kv.bias") else value


def worst_difference(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> tuple[float, str]:
    assert a.keys() == b.keys()
    return max((float(np.abs(determined(k, a[k]) - determined(k, b[k])).max()), k) for k in a)


def initial_weights(argv: list[str], stage: str) -> dict[str, np.ndarray]:
    """The weights the stage starts from: its builder right after seed_everything(run.seed), as the trainers do."""
    cfg = load_config(CncConfig, argv[1], argv[2:])
    seed_everything(cfg.run.seed)
    model = build_encoder(cfg.encoder, 27) if stage == "encoder" else \
        build_decoder(cfg.decoder, load_vocabulary(cfg.data.vocab_path), cfg.encoder.hidden_dim)
    return {k: v.numpy() for k, v in model.state_dict().items()}


def assert_matches(ddp: Path, single: Path, start: dict[str, np.ndarray], prefix: str = "") -> tuple[float, float]:
    """The DDP run's final weights and loss curve equal the single process's (within the tolerances) and training
    moved the weights; returns (max abs weight difference, max relative train-loss difference)."""
    a, b = weights(ddp), weights(single)
    worst, key = worst_difference(a, b)
    assert worst < WEIGHT_TOL, (worst, key)
    moved = max(float(np.abs(a[prefix + k] - v).max()) for k, v in start.items()
                if not k.startswith("channel_"))  # normalisation buffers are set from the data, not trained
    assert moved > 1e-2, moved
    curve_a, curve_b = read_metrics(ddp / "metrics.jsonl"), read_metrics(single / "metrics.jsonl")
    assert [m["epoch"] for m in curve_a] == [m["epoch"] for m in curve_b] == [1, 2]  # one line per epoch: rank 0 only
    loss_diff = 0.0
    for x, y in zip(curve_a, curve_b, strict=True):
        loss_diff = max(loss_diff, abs(x["train_loss"] - y["train_loss"]) / abs(y["train_loss"]))
        assert x["train_loss"] == pytest.approx(y["train_loss"], rel=LOSS_REL_TOL)
        assert x["val_loss"] == pytest.approx(y["val_loss"], rel=LOSS_REL_TOL)
    assert curve_a[1]["train_loss"] < curve_a[0]["train_loss"]
    assert not list(ddp.rglob(".tmp-*")) and not list(ddp.rglob(".old-*"))
    print(f"{ddp}: max |w_ddp - w_single| {worst:.2e} ({key}), max rel train-loss diff {loss_diff:.2e}")
    return worst, loss_diff


@pytest.fixture(scope="module")
def single(sample_dir, stage_args, tmp_path_factory) -> Path:
    """One process: encoder and decoder with the DDP tests' settings (runs/single/{encoder,decoder})."""
    runs = tmp_path_factory.mktemp("cnc_ddp")
    encoder_best = runs / "single" / "encoder" / "checkpoints" / "best"
    argv = args(stage_args, sample_dir, runs, "single", *DECODER, f"train.encoder_checkpoint={encoder_best}")
    assert train_encoder.main(argv) == 0
    assert train_decoder.main(argv) == 0
    return runs


def test_torchrun_encoder_equals_one_process_and_only_rank0_writes(single, sample_dir, stage_args):
    argv = args(stage_args, sample_dir, single, "ddp")
    done = torchrun("cnc_gcode.train_encoder", argv)
    ddp = single / "ddp" / "encoder"
    assert_matches(ddp, single / "single" / "encoder", initial_weights(argv, "encoder"))
    log = (ddp / "train.log").read_text()
    assert log.count("encoder epoch 1:") == log.count("encoder epoch 2:") == 1
    assert done.stderr.count("encoder test: operation_acc") == 1  # rank 1 logs warnings only and writes no report
    assert (single / "ddp" / "reports" / "encoder_results_test.json").is_file()
    assert (ddp / "config.yaml").is_file() and (ddp / "checkpoints" / "best" / "meta.json").is_file()


def test_torchrun_decoder_equals_one_process_then_resumes_under_ddp(single, sample_dir, stage_args):
    encoder_best = single / "single" / "encoder" / "checkpoints" / "best"
    argv = args(stage_args, sample_dir, single, "ddp_dec", *DECODER, f"train.encoder_checkpoint={encoder_best}")
    torchrun("cnc_gcode.train_decoder", argv)
    ddp = single / "ddp_dec" / "decoder"
    assert_matches(ddp, single / "single" / "decoder", initial_weights(argv, "decoder"), prefix="decoder.")
    assert (ddp / "train.log").read_text().count("decoder epoch 2:") == 1
    # resume=auto under DDP: rank 0 wrote epoch 2, both ranks load it and train epoch 3; one process does the same
    torchrun("cnc_gcode.train_decoder", [*argv, "train.epochs=3"])
    assert train_decoder.main([*argv, "run.name=single", "train.epochs=3"]) == 0
    assert [m["epoch"] for m in read_metrics(ddp / "metrics.jsonl")] == [1, 2, 3]
    worst, key = worst_difference(weights(ddp), weights(single / "single" / "decoder"))
    assert worst < WEIGHT_TOL, (worst, key)


def test_two_torchrun_nodes_on_localhost_equal_one_process(single, sample_dir, stage_args):
    """`--nnodes=2` with c10d rendezvous: two launchers (one process each) as two nodes of one job."""
    argv = args(stage_args, sample_dir, single, "two_nodes")
    two_node_torchrun("cnc_gcode.train_encoder", argv)
    ddp = single / "two_nodes" / "encoder"
    assert_matches(ddp, single / "single" / "encoder", initial_weights(argv, "encoder"))
    assert (ddp / "train.log").read_text().count("encoder epoch 2:") == 1
