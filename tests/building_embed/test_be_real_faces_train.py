"""Real identities: the ORL faces through stages 1-4 (tiny random ViT) and train.train, evaluated on held-out people.

With the tiny random ViT the frozen features already find nearly every face (test recall@1 50 of 52 queries), and an
untrained head does about as well, so whether the trained head beats them depends on the training seed: over 21
training seeds (0-19, 42) its test mAP@R beat the frozen features' on 4 and its recall@1 on 1 (seed 10). Neither is
asserted. What holds on every seed, and fails for a broken (constant or random) head: the head learns the training
people (fewer margin-violating triplets) and retrieves held-out people far above chance.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import assert_fewer_mined_triplets, read_json
from learning_seed import seed_args

from building_embed.difficulty import compute_visual_neighbors
from building_embed.generate import generate_embeddings
from building_embed.pack_faces import pack_faces
from building_embed.preprocess import merge_and_split, process_tar
from building_embed.train import train as train_stage

torch.set_num_threads(1)
pytestmark = [pytest.mark.real_data, pytest.mark.slow]

HEAD = ["training_model.input_dim=24", "training_model.hidden_dim=64", "training_model.output_dim=32",
        "training.identities_per_batch=8", "training.views_per_identity=4", "training.batches_per_epoch=10",
        "training.miner=semihard", "training.lr=1e-3", "training.epochs=25"]


@pytest.fixture(scope="module")
def faces_run(real_data_dir, tmp_path_factory, stage_args, learning_seed) -> Path:
    """The trained run directory. The learning seed seeds train only: the split and the random ViT stay global.seed's
    default, so the frozen baseline is the same under every learning seed."""
    faces = real_data_dir / "faces_orl_att"
    if not faces.is_dir():
        pytest.skip(f"{faces} not found")
    root = tmp_path_factory.mktemp("be_faces_train")
    pack_faces(faces, root, n_tars=2)
    for stage in (process_tar, generate_embeddings, merge_and_split, compute_visual_neighbors):
        assert stage.main(stage_args(root)) == 0, stage.__name__
    assert train_stage.main(stage_args(root, f"paths.runs_dir={root / 'runs'}", *HEAD,
                                      *seed_args("global.seed", learning_seed))) == 0
    return root / "runs" / "default"


# Measured, global.seed 42 (own) / 1 / 2 / 3 (OMP_NUM_THREADS=1), worst of 21 training seeds in brackets; frozen
# features: test recall@1 0.9615, recall@5 0.9808, mAP@R 0.7086 (val 0.9615 / 0.9808 / 0.7498). Chance (random
# embeddings): recall@1 0.17, mAP@R 0.08; a constant head: recall@1 = mAP@R 0.17-0.19 (ties in gallery order).
#   test recall@1 head 0.96 / 0.90 / 0.92 / 0.85 [0.81]; val 0.96 / 0.96 / 0.92 / 0.94 [0.92]
#   test mAP@R head 0.77 / 0.67 / 0.70 / 0.59 [0.57]; val 0.80 / 0.72 / 0.76 / 0.79 [0.70]
#   recall@5 head - frozen: test +0.02 / +0.02 / +0.02 / -0.02 [-0.04]; val 0.00 on all four [0.00]
# Re-splitting too (global.seed 1 / 2 / 3 for every stage) gave test recall@1 0.92 / 0.89 / 0.96, mAP@R 0.65 / 0.47
# / 0.59, recall@5 head - frozen 0 on each.
MIN_RECALL_AT_1 = 0.7
MIN_MAP_AT_R = 0.4
RECALL_AT_5_SLACK = 0.08  # 4 of 52 queries; the worst seed lost 2


@pytest.mark.learning
def test_head_retrieves_held_out_people_far_above_chance(faces_run):
    report = read_json(faces_run / "reports" / "retrieval.json")
    for split in ("val", "test"):
        head, frozen = report[split]["head"], report[split]["frozen"]
        print(split, {k: (round(head[k], 4), round(frozen[k], 4)) for k in ("recall@1", "recall@5", "map@r")})
        assert head["queries"] == frozen["queries"] >= 40
        assert head["recall@1"] > MIN_RECALL_AT_1
        assert head["map@r"] > MIN_MAP_AT_R
        assert head["recall@5"] >= frozen["recall@5"] - RECALL_AT_5_SLACK


# Semihard triplets mined per batch, last epoch / first: 0.48 / 0.40 / 0.34 / 0.40 (worst of 21 seeds 0.63); an
# untrained head (training.lr=1e-9) 0.90-1.21.
TRIPLET_DROP = 0.75


@pytest.mark.learning
def test_head_learns_the_training_people(faces_run):
    assert_fewer_mined_triplets(faces_run, TRIPLET_DROP)
