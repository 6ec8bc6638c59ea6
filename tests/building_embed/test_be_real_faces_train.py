"""Real identities: the ORL faces through stages 1-4 (tiny random ViT) and train.train; head vs frozen on held-out
people. The faces make the frozen features' recall@1 near its ceiling (50 of 52 test queries), and the head does not
beat it there; the head's mAP@R does beat the frozen features' (measured below). See building_embed/README.md."""

from __future__ import annotations

import pytest
import torch
from conftest import read_json

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
def faces_report(real_data_dir, tmp_path_factory, stage_args) -> dict:
    faces = real_data_dir / "faces_orl_att"
    if not faces.is_dir():
        pytest.skip(f"{faces} not found")
    root = tmp_path_factory.mktemp("be_faces_train")
    pack_faces(faces, root, n_tars=2)
    for stage in (process_tar, generate_embeddings, merge_and_split, compute_visual_neighbors):
        assert stage.main(stage_args(root)) == 0, stage.__name__
    assert train_stage.main(stage_args(root, f"paths.runs_dir={root / 'runs'}", *HEAD)) == 0
    return read_json(root / "runs" / "default" / "reports" / "retrieval.json")


def test_head_map_at_r_beats_the_frozen_features_on_held_out_people(faces_report):
    # Measured: test mAP@R head 0.7669 vs frozen 0.7086, val 0.7957 vs 0.7498 (52 queries each, 6 people each).
    for split in ("val", "test"):
        head, frozen = faces_report[split]["head"], faces_report[split]["frozen"]
        print(split, {k: (round(head[k], 4), round(frozen[k], 4)) for k in ("recall@1", "recall@5", "map@r")})
        assert head["queries"] == frozen["queries"] >= 40
        assert head["map@r"] > frozen["map@r"] + 0.02
        assert head["recall@5"] >= frozen["recall@5"] - 0.02


@pytest.mark.xfail(strict=True, reason="measured: test recall@1 head 0.9615 = frozen 0.9615 (50/52 each) with the "
                                       "tiny random ViT; the frozen faces are at the ceiling (README)")
def test_head_recall_at_1_beats_the_frozen_features_on_held_out_people(faces_report):
    assert faces_report["test"]["head"]["recall@1"] > faces_report["test"]["frozen"]["recall@1"]
