"""generate_embeddings end to end (tar read, decode, batch, forward, parquet write) against the pure forward pass of
the same model on pre-made tensors, in one process, same images, same batch size.

    OMP_NUM_THREADS=2 python benchmarks/building_embed_throughput.py     # ViT-S/14 (random init) at 224 px, CPU
    python benchmarks/building_embed_throughput.py --img-size 56 --image-size 96 --targets 8   # a quick look

Setup (not timed): the sample tars (`sample_data`, --image-size px JPEGs like the 640 px originals).
  tar stage   process_tar: stream the tars, pair image + metadata, decode each image once to verify, parquet write;
  generate    generate_embeddings.main: read the intermediates, decode in DataLoader workers, batch, forward, float16
              parquet write (includes building the backbone, timed alone as `build`);
  forward     the same backbone (same seed, eval, inference_mode) on pre-made [B, 3, S, S] tensors only.
Ratio = forward seconds / end-to-end seconds (= end-to-end images/s over pure-forward images/s), once for generate
alone and once for tar stage + generate. Goal: >= 0.85. Each measurement: best of --repeats. Writes --out.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import torch

from building_embed.config import EmbeddingModelConfig
from building_embed.generate import generate_embeddings
from building_embed.generate.backbone import build_backbone
from building_embed.preprocess import process_tar
from building_embed.preprocess.schema import IMAGE_BYTES
from building_embed.sample_data import make_dataset
from common.io import write_json

REPO = Path(__file__).resolve().parents[1]


def best_of(repeats: int, fn) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--name", default="vit_small_patch14_dinov2", help="timm backbone (random init)")
    parser.add_argument("--img-size", type=int, default=224, help="model input side")
    parser.add_argument("--image-size", type=int, default=640, help="side of the JPEGs in the tars")
    parser.add_argument("--targets", type=int, default=14, help="targets per region (3 regions, 6 views each)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=1, help="DataLoader decoding workers")
    parser.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "2")))
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", default=str(REPO / "runs" / "benchmarks" / "building_embed_throughput.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="be_throughput_"))
    try:
        report = measure(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    write_json(args.out, report)
    print(f"-> {args.out}")


def measure(args: argparse.Namespace, work: Path) -> dict:
    make_dataset(work / "sample", targets_per_region=args.targets, image_size=args.image_size, seed=0)
    model_args = [f"embedding_model.name={args.name}", "embedding_model.random_init=true",
                  "embedding_model.global_pool=avg",  # random_init with token pooling is refused (constant output)
                  f"embedding_model.img_size={args.img_size}", f"embedding_model.batch_size={args.batch_size}",
                  f"infrastructure.num_workers={args.workers}", f"infrastructure.num_threads={args.threads}",
                  "infrastructure.device=cpu", "global.resume=false", "logging.level=WARNING"]
    paths = [f"paths.tar_dir={work / 'sample' / 'tars'}", f"paths.intermediates_dir={work / 'inter'}",
             f"paths.embeddings_dir={work / 'emb'}"]

    def tar_stage() -> None:
        shutil.rmtree(work / "inter", ignore_errors=True)  # no reuse of finished tars
        assert process_tar.main([*paths, *model_args]) == 0

    def generate() -> None:
        assert generate_embeddings.main([*paths, *model_args]) == 0

    tar_s = best_of(args.repeats, tar_stage)
    generate_s = best_of(args.repeats, generate)
    images = [img for shard in sorted((work / "inter").glob("*.parquet"))
              for img in pq.read_table(shard, columns=[IMAGE_BYTES]).column(IMAGE_BYTES).to_pylist()]
    n = len(images)
    rows = sum(pq.read_metadata(p).num_rows for p in (work / "emb").glob("*.parquet"))
    assert rows == n, (rows, n)

    cfg = EmbeddingModelConfig(name=args.name, random_init=True, global_pool="avg", img_size=args.img_size,
                               batch_size=args.batch_size)
    start = time.perf_counter()
    torch.manual_seed(42)
    model, preprocess, dim = build_backbone(cfg)
    build_s = time.perf_counter() - start
    tensors = torch.stack([preprocess(img) for img in images])  # pre-made, outside the timing

    @torch.inference_mode()
    def forward() -> None:
        for i in range(0, n, args.batch_size):
            model(tensors[i:i + args.batch_size])

    forward_s = best_of(args.repeats, forward)
    ratio_generate, ratio_with_tar = forward_s / generate_s, forward_s / (tar_s + generate_s)
    shards = len(list((work / "inter").glob("*.parquet")))
    print(f"{n} images ({args.image_size} px JPEG) in {shards} shards, {args.name} at {args.img_size} px "
          f"(width {dim}), batch {args.batch_size}, {args.workers} decoding worker(s), {args.threads} torch thread(s)")
    print(f"pure forward              {forward_s:8.2f} s  {n / forward_s:7.1f} images/s")
    print(f"generate_embeddings       {generate_s:8.2f} s  {n / generate_s:7.1f} images/s   ratio {ratio_generate:.3f} "
          f"({'meets' if ratio_generate >= 0.85 else 'MISSES'} >= 0.85; backbone build {build_s:.2f} s of it)")
    print(f"process_tar + generate    {tar_s + generate_s:8.2f} s  {n / (tar_s + generate_s):7.1f} images/s   ratio "
          f"{ratio_with_tar:.3f} ({'meets' if ratio_with_tar >= 0.85 else 'MISSES'} >= 0.85; process_tar {tar_s:.2f} s)")
    return {"images": n, "image_size": args.image_size, "model": args.name, "img_size": args.img_size, "dim": dim,
            "batch_size": args.batch_size, "workers": args.workers, "threads": args.threads, "repeats": args.repeats,
            "forward_s": forward_s, "generate_s": generate_s, "process_tar_s": tar_s, "backbone_build_s": build_s,
            "ratio_generate": ratio_generate, "ratio_tar_and_generate": ratio_with_tar,
            "goal_0_85_generate_met": ratio_generate >= 0.85, "goal_0_85_with_tar_met": ratio_with_tar >= 0.85}


if __name__ == "__main__":
    main()
