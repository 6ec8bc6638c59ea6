"""All-neighbour exact search over N x 768 float32 embeddings: ours (compute_visual_neighbors.exact_knn) against
sklearn BallTree and against one pure matrix-product pass over the same data, in one process.

    OMP_NUM_THREADS=2 python benchmarks/building_knn.py                  # N = 100,000, k = 50, faiss and torch
    python benchmarks/building_knn.py --n 5000 --ball-queries 100        # a quick look

Data: unit vectors of --n / 10 "identities" (a random centre each, 10 noisy views), float32, seeded.
  ours      exact_knn(x, k, method) for each --methods (L2-normalise, search all N queries, drop self): what
            difficulty.compute_visual_neighbors runs;
  matmul    one pass of blocked x @ x.T (torch.mm into a reused buffer, same block size as knn_torch), nothing kept:
            the arithmetic floor of any exact search;
  BallTree  sklearn BallTree (euclidean on the same unit vectors, leaf_size 40): the build plus --ball-queries
            queries (k + 1), **extrapolated** to all N queries (build + query_time x N / queries); it is
            single-threaded, so the JSON also gives the ratio per thread of ours.
Asserted: on every query BallTree answered, ours returns the same k neighbours in the same order (a swap is allowed
only between neighbours whose similarities tie within 1e-6). Prints the ratios; writes them to --out.
Goal: ours >= 30x faster than BallTree, and within 1.5x of the matmul pass.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
import torch

from building_embed.difficulty.compute_visual_neighbors import exact_knn, l2_normalize
from common.io import write_json

REPO = Path(__file__).resolve().parents[1]
DIM = 768
BLOCK = 4096  # knn_torch's default block


def make_embeddings(n: int, dim: int = DIM, views: int = 10, seed: int = 0) -> np.ndarray:
    """[n, dim] float32: n / views centres, each with `views` noisy copies (cosine to the centre ~0.9)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((max(n // views, 1), dim), dtype=np.float32)
    x = centres[np.arange(n) % len(centres)] + 0.5 * rng.standard_normal((n, dim), dtype=np.float32)
    return x[rng.permutation(n)]


def matmul_pass(unit: np.ndarray, block: int = BLOCK) -> float:
    """Seconds for one blocked pass of unit @ unit.T; the result of each block is overwritten, nothing kept."""
    data = torch.from_numpy(np.ascontiguousarray(unit))
    buffer = torch.empty(min(block, len(data)), len(data))
    start = time.perf_counter()
    for i in range(0, len(data), block):
        rows = data[i:i + block]
        torch.mm(rows, data.T, out=buffer[:len(rows)])
    return time.perf_counter() - start


def balltree(unit: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, float, float]:
    """(neighbour indices [Q, k] without self, build seconds, query seconds) of sklearn BallTree."""
    from sklearn.neighbors import BallTree

    start = time.perf_counter()
    tree = BallTree(unit, leaf_size=40)
    build = time.perf_counter() - start
    start = time.perf_counter()
    _, idx = tree.query(unit[queries], k=k + 1)
    query = time.perf_counter() - start
    keep = idx != queries[:, None]
    keep[keep.all(axis=1), -1] = False  # self not among the k + 1 (ties): drop the last instead
    return idx[keep].reshape(len(queries), k), build, query


def same_neighbours(ours: np.ndarray, theirs: np.ndarray, unit: np.ndarray, queries: np.ndarray) -> int:
    """Number of queries whose lists differ only by swaps of tied neighbours; raises if any differ otherwise."""
    tied = 0
    for row, q in enumerate(queries):
        if np.array_equal(ours[row], theirs[row]):
            continue
        sim_ours, sim_theirs = unit[ours[row]] @ unit[q], unit[theirs[row]] @ unit[q]
        if not np.allclose(sim_ours, sim_theirs, atol=1e-6) or abs(np.sort(sim_ours).min()
                                                                    - np.sort(sim_theirs).min()) > 1e-6:
            raise AssertionError(f"query {q}: neighbours differ beyond ties: ours {ours[row][:5]}..., "
                                 f"BallTree {theirs[row][:5]}...")
        tied += 1
    return tied


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--k", type=int, default=50)
    parser.add_argument("--methods", nargs="+", default=["faiss", "torch"], choices=["faiss", "torch"])
    parser.add_argument("--ball-queries", type=int, default=200, help="queries BallTree answers (then extrapolated)")
    parser.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "2")))
    parser.add_argument("--out", default=str(REPO / "runs" / "benchmarks" / "building_knn.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import faiss

    faiss.omp_set_num_threads(args.threads)
    x = make_embeddings(args.n)
    unit = l2_normalize(x)
    print(f"{args.n} x {DIM} float32, k = {args.k}, {args.threads} thread(s) for ours and matmul; BallTree "
          f"single-threaded on {args.ball_queries} queries, extrapolated")
    report: dict = {"n": args.n, "dim": DIM, "k": args.k, "threads": args.threads,
                    "ball_queries": args.ball_queries, "methods": {}}

    matmul = matmul_pass(unit)
    print(f"matmul pass (floor)          {matmul:9.2f} s", flush=True)
    report["matmul_pass_s"] = matmul

    queries = np.random.default_rng(1).choice(args.n, size=min(args.ball_queries, args.n), replace=False)
    ball_idx, build, query = balltree(unit, queries, args.k)
    ball_total = build + query * args.n / len(queries)
    print(f"BallTree (extrapolated)      {ball_total:9.2f} s   (build {build:.2f} s, {len(queries)} queries "
          f"{query:.2f} s = {1000 * query / len(queries):.1f} ms each)", flush=True)
    report["balltree"] = {"build_s": build, "query_s": query, "queries": len(queries),
                          "extrapolated_all_queries_s": ball_total}

    for method in args.methods:
        start = time.perf_counter()
        _, idx = exact_knn(x, args.k, method)
        ours = time.perf_counter() - start
        tied = same_neighbours(idx[queries], ball_idx, unit, queries)
        vs_ball, vs_matmul = ball_total / ours, ours / matmul
        print(f"ours ({method:5s})                {ours:9.2f} s   {vs_ball:6.1f}x faster than BallTree "
              f"({'meets' if vs_ball >= 30 else 'MISSES'} >= 30x), {vs_matmul:4.2f}x the matmul pass "
              f"({'meets' if vs_matmul <= 1.5 else 'MISSES'} <= 1.5x); same neighbours on {len(queries)} queries "
              f"({tied} with tied swaps)", flush=True)
        report["methods"][method] = {"seconds": ours, "speedup_vs_balltree": vs_ball,
                                     "speedup_vs_balltree_per_thread": vs_ball / args.threads,
                                     "ratio_to_matmul_pass": vs_matmul, "same_neighbours_queries": len(queries),
                                     "queries_with_tied_swaps": tied,
                                     "goal_30x_balltree_met": vs_ball >= 30, "goal_1_5x_matmul_met": vs_matmul <= 1.5}
        write_json(args.out, report)  # after each method: a long run keeps what it measured
    write_json(args.out, report)
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
