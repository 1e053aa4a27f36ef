"""FAISS index over L2-normalised embeddings (inner product = cosine).

Every index is an ``IndexIDMap2`` so vectors carry the chunk ids of the metadata;
inside it sits either an exact ``IndexFlatIP`` or, past
``IndexConfig.approximate_threshold`` chunks, an ``IndexHNSWFlat`` (inner product).
HNSW cannot delete, so removing from it rebuilds from the stored vectors
(HNSWFlat keeps them), which is linear in the index size and fine for removals.

Serialisation is ``faiss.serialize_index`` bytes only (never pickle).
Deliberately left out: what a chunk is (metadata lives in ``knowledge.py``).
"""

from __future__ import annotations

import faiss
import numpy as np

from .config import IndexConfig

FLAT, HNSW = "flat", "hnsw"


def new_index(dim: int, kind: str = FLAT, cfg: IndexConfig | None = None) -> faiss.Index:
    cfg = cfg or IndexConfig()
    if kind == FLAT:
        inner = faiss.IndexFlatIP(dim)
    elif kind == HNSW:
        inner = faiss.IndexHNSWFlat(dim, cfg.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        inner.hnsw.efConstruction = cfg.hnsw_ef_construction
        inner.hnsw.efSearch = cfg.hnsw_ef_search
    else:
        raise ValueError(f"unknown index kind {kind!r}")
    return faiss.IndexIDMap2(inner)


def kind_of(index: faiss.Index) -> str:
    inner = faiss.downcast_index(faiss.downcast_index(index).index)
    return HNSW if isinstance(inner, faiss.IndexHNSW) else FLAT


def ids_of(index: faiss.Index) -> np.ndarray:
    """Chunk ids in internal order, (ntotal,) int64."""
    return faiss.vector_to_array(faiss.downcast_index(index).id_map).astype(np.int64)


def vectors_of(index: faiss.Index) -> np.ndarray:
    """All stored vectors in internal order, (ntotal, dim) float32."""
    inner = faiss.downcast_index(index).index
    if index.ntotal == 0:
        return np.zeros((0, index.d), dtype=np.float32)
    return inner.reconstruct_n(0, index.ntotal)


def add(index: faiss.Index, vectors: np.ndarray, ids: np.ndarray) -> None:
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)  # (n, dim)
    if len(vectors):
        index.add_with_ids(vectors, np.asarray(ids, dtype=np.int64))


def remove(index: faiss.Index, ids, cfg: IndexConfig | None = None) -> faiss.Index:
    """Return an index without ``ids`` (may be a new object for HNSW)."""
    ids = np.asarray(list(ids), dtype=np.int64)
    if len(ids) == 0:
        return index
    if kind_of(index) == FLAT:
        index.remove_ids(ids)
        return index
    keep = ~np.isin(ids_of(index), ids)
    return rebuild(vectors_of(index)[keep], ids_of(index)[keep], HNSW, cfg)


def rebuild(vectors: np.ndarray, ids: np.ndarray, kind: str, cfg: IndexConfig | None = None) -> faiss.Index:
    index = new_index(vectors.shape[1] if vectors.ndim == 2 and vectors.shape[1] else 0, kind, cfg)
    add(index, vectors, ids)
    return index


def fit_kind(index: faiss.Index, cfg: IndexConfig | None = None) -> faiss.Index:
    """Switch flat <-> HNSW by size. Hysteresis (back to flat at half the threshold)
    keeps a store near the limit from rebuilding on every change."""
    cfg = cfg or IndexConfig()
    kind = kind_of(index)
    if kind == FLAT and index.ntotal > cfg.approximate_threshold:
        return rebuild(vectors_of(index), ids_of(index), HNSW, cfg)
    if kind == HNSW and index.ntotal < cfg.approximate_threshold // 2:
        return rebuild(vectors_of(index), ids_of(index), FLAT, cfg)
    return index


def search(index: faiss.Index, queries: np.ndarray, k: int, ef_search: int | None = None):
    """Top-k by inner product. queries (q, dim) -> (scores (q, k), ids (q, k)); id -1 = none."""
    queries = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
    k = max(1, min(k, index.ntotal)) if index.ntotal else 1
    if ef_search and kind_of(index) == HNSW:
        faiss.downcast_index(faiss.downcast_index(index).index).hnsw.efSearch = max(ef_search, k)
    if len(queries) > 1:
        return index.search(queries, k)
    # One query: OpenMP start-up costs more than it saves (bench/query.py: 0.2 ms on 1 thread
    # vs ~20 ms on 2 busy threads at 1k chunks).
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        return index.search(queries, k)
    finally:
        faiss.omp_set_num_threads(threads)


def serialize(index: faiss.Index) -> bytes:
    return faiss.serialize_index(index).tobytes()


def deserialize(data: bytes) -> faiss.Index:
    return faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))
