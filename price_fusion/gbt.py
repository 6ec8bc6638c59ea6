"""Gradient-boosted trees head: HistGradientBoosting on PCA-reduced embeddings, structural features and
out-of-fold k-nearest-neighbour price features (faiss), with K-fold out-of-fold predictions for blending.

    python -m price_fusion.gbt --config configs/price_fusion/demo.yaml run_name=demo_gbt
    python -m price_fusion.evaluate --config configs/price_fusion/demo.yaml run_name=demo_gbt   # scores its OOF file

Outer and inner folds are grouped (data.group_column / data.group_key). For outer fold f with training rows T and
held-out rows V: the kNN features of T come from inner grouped folds of T (a row never sees its own price or a
same-group variant's), those of V and of the test set from an index over all of T; PCA is fitted on T only.
The test prediction is the mean log price of the K fold models. Writes <run>/predictions/oof_predictions.csv,
<run>/predictions/test_out.csv, <run>/split.json, <run>/reports/gbt_summary.json.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from sklearn.decomposition import PCA
from sklearn.ensemble import HistGradientBoostingRegressor
from sklearn.model_selection import GroupKFold

from common import metrics
from common.cli import config_main
from common.config import save_resolved_config
from common.logs import setup_logging, write_json

from .batching import FusionTensors, load_split
from .config import GbtConfig, PriceFusionConfig
from .data import grouped_folds, product_groups
from .prediction_files import log_to_price, write_predictions

log = logging.getLogger(__name__)
KNN_FEATURES = ("knn_weighted_mean", "knn_median", "knn_std", "knn_top1", "knn_top1_sim", "knn_mean_sim")


def unit_rows(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (float32, C-contiguous, as faiss wants); zero rows stay zero."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def knn_search(base: np.ndarray, base_log_price: np.ndarray, query: np.ndarray, k: int) -> tuple[np.ndarray, ...]:
    """Exact cosine kNN (faiss IndexFlatIP on unit vectors): (similarities [Q, k], neighbour log prices [Q, k])."""
    import faiss

    k = min(k, len(base))
    index = faiss.IndexFlatIP(base.shape[1])
    index.add(unit_rows(base))
    sims, rows = index.search(unit_rows(query), k)
    return sims, base_log_price[rows]


def knn_features(sims: np.ndarray, neighbour_log_price: np.ndarray) -> np.ndarray:
    """[Q, 6]: similarity-weighted mean, median, std, top-1 of the neighbours' log prices; top-1 and mean similarity."""
    weights = np.maximum(sims, 0.0) + 1e-6
    weighted = (weights * neighbour_log_price).sum(1) / weights.sum(1)
    return np.column_stack([weighted, np.median(neighbour_log_price, 1), neighbour_log_price.std(1),
                            neighbour_log_price[:, 0], sims[:, 0], sims.mean(1)]).astype(np.float32)


def oof_knn_features(vectors: np.ndarray, log_price: np.ndarray, k: int, folds: int, seed: int,
                     groups: np.ndarray) -> np.ndarray:
    """kNN features of every row from an index over the other folds only; folds are whole groups (sklearn GroupKFold),
    so no row sees its own price or a same-group variant's (which the held-out and test rows never can either)."""
    out = np.zeros((len(vectors), len(KNN_FEATURES)), dtype=np.float32)
    n_splits = min(folds, len(np.unique(groups)))
    for rest, part in GroupKFold(n_splits, shuffle=True, random_state=seed).split(vectors, groups=groups):
        out[part] = knn_features(*knn_search(vectors[rest], log_price[rest], vectors[part], k))
    return out


class TreeFeatures:
    """Feature builder fitted on training rows: PCA of text (and image) embeddings + struct + image mask + kNN."""

    def __init__(self, gc: GbtConfig, use_image: bool, seed: int) -> None:
        self.gc, self.use_image, self.seed = gc, use_image, seed

    def _pca(self, x: np.ndarray) -> PCA | None:
        n = min(self.gc.pca_dims, x.shape[1], len(x) - 1)
        return PCA(n, random_state=self.seed).fit(x) if self.gc.pca_dims and n >= 1 else None

    def fit_transform(self, data: FusionTensors, groups: np.ndarray) -> np.ndarray:
        text = unit_rows(data.text.numpy())
        self.text_pca = self._pca(text)
        self.base_text, self.base_log_price = text, data.log_price.numpy().astype(np.float64)
        image = unit_rows(data.image.numpy())
        self.image_pca = self._pca(image[data.has_image.numpy()]) if self.use_image and data.has_image.sum() > 2 \
            else None
        knn = oof_knn_features(text, self.base_log_price, self.gc.knn_k, self.gc.folds, self.seed, groups)
        return self._assemble(data, knn)

    def transform(self, data: FusionTensors) -> np.ndarray:
        text = unit_rows(data.text.numpy())
        knn = knn_features(*knn_search(self.base_text, self.base_log_price, text, self.gc.knn_k))
        return self._assemble(data, knn)

    def _assemble(self, data: FusionTensors, knn: np.ndarray) -> np.ndarray:
        text = unit_rows(data.text.numpy())
        parts = [self.text_pca.transform(text) if self.text_pca else text, data.struct.numpy(), knn]
        if self.image_pca is not None:
            mask = data.has_image.numpy()
            image = np.where(mask[:, None], self.image_pca.transform(unit_rows(data.image.numpy())), np.nan)
            parts += [image, mask[:, None].astype(np.float32)]  # NaN: trees route missing images their own way
        return np.hstack(parts).astype(np.float32)


def fit_trees(gc: GbtConfig, x: np.ndarray, y: np.ndarray, seed: int) -> HistGradientBoostingRegressor:
    """Trees on log price with absolute error (its minimiser, the median, is close to SMAPE's on log scale)."""
    model = HistGradientBoostingRegressor(loss="absolute_error", learning_rate=gc.learning_rate, max_iter=gc.max_iter,
                                          max_leaf_nodes=gc.max_leaf_nodes, l2_regularization=gc.l2_regularization,
                                          early_stopping=len(y) >= 100, n_iter_no_change=gc.early_stopping_rounds,
                                          validation_fraction=0.1, random_state=seed)
    return model.fit(x, y)


def gbt(cfg: PriceFusionConfig) -> int:
    if not cfg.gbt.num_threads:
        return _gbt(cfg)
    import faiss
    from threadpoolctl import threadpool_limits

    # OpenMP spin-waits badly when other processes hold the cores: one thread measured several times faster here.
    previous = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(cfg.gbt.num_threads)
    try:
        with threadpool_limits(limits=cfg.gbt.num_threads):
            return _gbt(cfg)
    finally:
        faiss.omp_set_num_threads(previous)


def _gbt(cfg: PriceFusionConfig) -> int:
    run_dir = Path(cfg.runs_dir) / cfg.run_name
    setup_logging(run_dir)
    save_resolved_config(cfg, run_dir)
    gc, seed = cfg.gbt, cfg.train.seed
    catalog, data = load_split(cfg.data.embeddings_dir, "train", cfg.data.train_csv, labelled=True,
                               bad_price=cfg.data.bad_price, use_image=cfg.model.use_image,
                               group_column=cfg.data.group_column, structural=cfg.data.structural)
    test_catalog = None
    if Path(cfg.data.test_csv).is_file() and (Path(cfg.data.embeddings_dir) / "test").is_dir():
        test_catalog, test_data = load_split(cfg.data.embeddings_dir, "test", cfg.data.test_csv, labelled=False,
                                             use_image=cfg.model.use_image, structural=cfg.data.structural)
    groups = product_groups(catalog, cfg.data.group_key)
    folds = grouped_folds(catalog.prices, groups, gc.folds, cfg.data.n_price_bins, cfg.data.split_seed)
    write_json(run_dir / "split.json", {"kfold": gc.folds, "val_ids": [catalog.sample_ids[v].tolist() for _, v in folds]})
    y = data.log_price.numpy().astype(np.float64)
    oof, knn_oof = np.zeros(len(data)), np.zeros(len(data))
    test_log = np.zeros(len(test_catalog.sample_ids)) if test_catalog else None
    for k, (train_rows, val_rows) in enumerate(folds):
        features = TreeFeatures(gc, cfg.model.use_image, seed + k)
        x_train = features.fit_transform(data.subset(train_rows), groups[train_rows])
        trees = fit_trees(gc, x_train, y[train_rows], seed + k)
        x_val = features.transform(data.subset(val_rows))
        oof[val_rows] = trees.predict(x_val)
        knn_oof[val_rows] = x_val[:, _knn_column(features, data.struct.shape[1])]
        if test_catalog:
            test_log += trees.predict(features.transform(test_data)) / len(folds)
        log.info("fold %d: %d trees, held-out SMAPE %.3f%%", k, trees.n_iter_,
                 metrics.smape(catalog.prices[val_rows], log_to_price(oof[val_rows])))
    summary = {"oof_smape": metrics.smape(catalog.prices, log_to_price(oof)),
               "oof_smape_knn_only": metrics.smape(catalog.prices, log_to_price(knn_oof)),
               "oof_mae": metrics.mae(catalog.prices, log_to_price(oof)), "folds": gc.folds, "n": len(data)}
    write_predictions(run_dir / "predictions" / "oof_predictions.csv", catalog.sample_ids, log_to_price(oof),
                      actual=catalog.prices)
    if test_catalog:
        write_predictions(run_dir / "predictions" / "test_out.csv", test_data.sample_ids, log_to_price(test_log),
                          expected_ids=test_catalog.sample_ids)
    write_json(run_dir / "reports" / "gbt_summary.json", summary)
    log.info("GBT out-of-fold SMAPE %.3f%% (kNN weighted mean alone %.3f%%)", summary["oof_smape"],
             summary["oof_smape_knn_only"])
    return 0


def _knn_column(features: TreeFeatures, struct_dim: int) -> int:
    """Column of `knn_weighted_mean` in the assembled feature matrix (after the text and struct columns)."""
    text_cols = features.text_pca.n_components_ if features.text_pca else features.base_text.shape[1]
    return text_cols + struct_dim


main = config_main(PriceFusionConfig, gbt, __doc__)

if __name__ == "__main__":
    raise SystemExit(main())
