"""Two-process DDP (torchrun, gloo on CPU) equals one process fed the same global batches, and learns."""

from __future__ import annotations

import functools
import json

import pytest
import torch
from ehr_helpers import train_config, train_overrides
from learning_seed import seed_args
from safetensors.torch import load_file
from torchrun_launch import torchrun

from common.logs import read_metrics
from ehr_embedded import finetune as finetune_stage
from ehr_embedded.data import LengthBucketBatchSampler, collate

# dropout off and no class weights: then a step of 2 ranks x 8 sequences (gradients averaged by DDP) is exactly a
# step of one process on those 16 sequences, up to float summation order
DDP_ARGS = ("training.batch_size=8", "training.epochs=4", "model.dropout=0.0", "training.class_weights=null",
            "training.num_threads=1", "evaluate.n_bootstrap=50")


class GlobalBatches(LengthBucketBatchSampler):
    """One process seeing what 2 DDP ranks see together: rank 0's batch k joined with rank 1's batch k."""

    def __iter__(self):
        batches = self.batches()
        usable = len(batches) - len(batches) % 2
        return iter(batches[i] + batches[i + 1] for i in range(0, usable, 2))

    def __len__(self):
        return super().__len__() // 2


def global_batch_loader(dataset, batch_size, shuffle, seed=0, bucket=True, pad_to=None, num_workers=0, rank=0,
                        world_size=1):
    sampler = GlobalBatches(dataset.lengths, batch_size, shuffle=shuffle, seed=seed, bucket=bucket)
    return torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=functools.partial(collate,
                                                                                                   pad_to=pad_to))


@pytest.mark.slow
@pytest.mark.learning
def test_torchrun_two_processes_equal_one_process_with_the_same_global_batch(built, tmp_path, monkeypatch,
                                                                              learning_seed):
    args = (*DDP_ARGS, *seed_args("training.seed", learning_seed))
    ddp_run, single_run = tmp_path / "ddp", tmp_path / "single"
    # the timeout allows a loaded 2-core machine (the run takes well under a minute alone)
    torchrun("ehr_embedded.finetune", train_overrides(built.store, ddp_run, *args), timeout=600)
    ddp_metrics = read_metrics(ddp_run / "metrics.jsonl")
    assert [m["epoch"] for m in ddp_metrics] == [1, 2, 3, 4]  # rank 0 alone writes metrics

    monkeypatch.setattr(finetune_stage, "make_loader", global_batch_loader)
    finetune_stage.finetune(train_config(built.store, single_run, *args))
    single_metrics = read_metrics(single_run / "metrics.jsonl")
    for a, b in zip(ddp_metrics, single_metrics, strict=True):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-4, abs=1e-5)
        assert a["tuning_loss"] == pytest.approx(b["tuning_loss"], rel=1e-4, abs=1e-5)
    ddp_w = load_file(str(ddp_run / "checkpoints" / "latest" / "model.safetensors"))
    single_w = load_file(str(single_run / "checkpoints" / "latest" / "model.safetensors"))
    assert ddp_w.keys() == single_w.keys()
    # one AdamW step moves a weight by up to lr = 3e-3, so a skipped or doubled step shows; float summation order
    # (gloo's all-reduce against one batched backward), amplified by Adam over 24 steps, left at most 7.2e-4 / 4.1e-4
    # / 5.4e-4 / 4.6e-4 (own seed / 1 / 2 / 3, OMP_NUM_THREADS=1; 2.6e-4 on an earlier machine)
    worst = max(float((ddp_w[k] - single_w[k]).abs().max()) for k in ddp_w)
    assert worst < 1.5e-3, worst

    # and the 2-process run learned the label; chance is 0.5. Measured held-out AUROC own seed / 1 / 2 / 3:
    # 0.979 / 0.979 / 0.987 / 0.996
    report = json.loads((ddp_run / "reports" / "eval_held_out.json").read_text())
    assert report["auroc"]["value"] > 0.8, report["auroc"]


@pytest.mark.slow
@pytest.mark.learning
def test_torchrun_pretraining_two_processes_equal_one_process_with_the_same_global_batch(built, tmp_path, monkeypatch,
                                                                                          learning_seed):
    from ehr_embedded import pretrain as pretrain_stage

    # next-event targets differ in number between the ranks' halves of a global batch: each rank's mean loss is
    # weighted by its share of the targets, so the averaged gradient is the one-process gradient on the whole batch
    args = (*DDP_ARGS, "training.epochs=3", *seed_args("training.seed", learning_seed))
    kind = {"model_type": "transformer_decoder_embedded", "task": "autoregressive"}
    ddp_run, single_run = tmp_path / "ddp", tmp_path / "single"
    torchrun("ehr_embedded.pretrain", train_overrides(built.store, ddp_run, *args, **kind), timeout=600)
    ddp_metrics = read_metrics(ddp_run / "metrics.jsonl")
    assert [m["epoch"] for m in ddp_metrics] == [1, 2, 3]  # rank 0 alone writes metrics

    original = pretrain_stage.make_loader

    def training_batches_joined(dataset, batch_size, shuffle, **kwargs):  # the tuning loss reads every sequence
        return (global_batch_loader if shuffle else original)(dataset, batch_size, shuffle, **kwargs)

    monkeypatch.setattr(pretrain_stage, "make_loader", training_batches_joined)
    pretrain_stage.pretrain(train_config(built.store, single_run, *args, **kind))
    single_metrics = read_metrics(single_run / "metrics.jsonl")
    for a, b in zip(ddp_metrics, single_metrics, strict=True):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-4, abs=1e-5)
        assert a["tuning_loss"] == pytest.approx(b["tuning_loss"], rel=1e-4, abs=1e-5)
    ddp_w = load_file(str(ddp_run / "checkpoints" / "latest" / "model.safetensors"))
    single_w = load_file(str(single_run / "checkpoints" / "latest" / "model.safetensors"))
    # it learned: the train loss falls by 0.90 / 0.78 / 0.83 / 0.87 over 3 epochs (own seed / 1 / 2 / 3,
    # OMP_NUM_THREADS=1); a model that does not learn stays level
    assert ddp_metrics[0]["train_loss"] - ddp_metrics[-1]["train_loss"] > 0.5, ddp_metrics
    # as in the fine-tuning test: a step moves a weight by up to lr = 3e-3; summation order left at most 2.8e-4 /
    # 1.3e-4 / 1.3e-4 / 1.4e-4 (own seed / 1 / 2 / 3)
    worst = max(float((ddp_w[k] - single_w[k]).abs().max()) for k in ddp_w)
    assert worst < 1e-3, worst
