"""Use a published model: load it as any user would, embed stored backbone embeddings, show nearest neighbours.

    python -m building_embed.publish.demo_usage published/ data/building_embed/merged/test.parquet --queries 3 --k 5

Loads MODEL_DIR with `AutoModel.from_pretrained(dir, trust_remote_code=True)`, embeds every row of EMBEDDINGS (a
generate_embeddings / merged split parquet or a folder of them), and prints for the first --queries rows their --k
nearest other rows (image_key, identity, cosine, `*` = same identity). Last line: the share of rows whose nearest
other row is of the same identity, with the head and with the raw backbone embeddings (the baseline it must beat).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pyarrow as pa

from building_embed.difficulty.compute_visual_neighbors import exact_knn
from building_embed.generate.generate_embeddings import read_embeddings
from building_embed.preprocess.schema import IDENTITY, IMAGE_KEY
from building_embed.publish.generate_embeddings_from_parquet import embedding_files
from building_embed.publish.hub import IntermixedParser, apply_head, load_published, require_width
from common.cli import guarded_main
from common.errors import UserError
from common.io import require_finite


def demo(model_dir: str | Path, embeddings_path: str | Path, queries: int = 3, k: int = 5) -> dict:
    """Print the neighbour table; return {"rows", "first_neighbor_same_identity": {"head", "backbone"}}."""
    model = load_published(model_dir)
    parts = [read_embeddings(p) for p in embedding_files(embeddings_path)]
    ids = pa.concat_tables([t for t, _ in parts])
    raw = np.concatenate([e for _, e in parts])
    require_width(raw, model.config.input_dim, embeddings_path, model_dir)
    keys = ids.column(IMAGE_KEY).to_pylist()
    require_finite(raw, embeddings_path, what="row", row_ids=keys, fix="regenerate those embeddings")
    if len(raw) < 2:
        raise UserError(f"{embeddings_path}: {len(raw)} row(s); the demo needs at least 2 to find neighbours")
    identity = np.asarray(ids.column(IDENTITY).to_pylist() if IDENTITY in ids.column_names else keys)
    z = apply_head(model, raw)
    print(f"{model_dir}: {model.config.backbone_name} [{model.config.input_dim}] -> head -> "
          f"[{model.config.output_dim}], {len(z)} rows of {embeddings_path}")
    sims, idx = exact_knn(z, k, method="torch")
    for q in range(min(queries, len(z))):
        print(f"query {keys[q]} ({identity[q]})")
        for rank, (j, s) in enumerate(zip(idx[q], sims[q]), start=1):
            mark = "*" if identity[j] == identity[q] else " "
            print(f"  {rank:2d} {mark} {s:+.4f}  {keys[j]} ({identity[j]})")
    share = {}
    for name, values in (("head", z), ("backbone", raw)):
        _, first = exact_knn(values, 1, method="torch")
        share[name] = float(np.mean(identity[first[:, 0]] == identity))
    print(f"nearest other row of the same identity: head {share['head']:.1%}, raw backbone {share['backbone']:.1%}")
    return {"rows": len(z), "first_neighbor_same_identity": share}


def build_parser() -> argparse.ArgumentParser:
    parser = IntermixedParser(prog="python -m building_embed.publish.demo_usage", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_dir", help="a directory written by convert_to_hf")
    parser.add_argument("embeddings", help="an embeddings parquet or a folder of them")
    parser.add_argument("--queries", type=int, default=3, help="rows whose neighbours are printed")
    parser.add_argument("--k", type=int, default=5, help="neighbours per query")
    return parser


main = guarded_main(lambda args: demo(args.model_dir, args.embeddings, args.queries, args.k) and 0, build_parser())

if __name__ == "__main__":
    raise SystemExit(main())
