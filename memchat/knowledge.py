"""The knowledge base users see: add, replace and remove documents; search.

It ties the bottom layer together: ``pdf`` (text per page) -> ``chunking`` ->
``embeddings`` -> ``index`` -> ``store`` (encrypted, atomic). Writers do the slow
part (extraction and embedding) without the lock, then lock, re-read the latest
state and merge, so two writers never lose each other's documents.

Invariants kept on every commit: the FAISS ids equal the metadata's chunk ids;
each document has exactly the chunks of its current version.

``documents()`` and ``remove()`` load no model: they only decrypt and edit.
Deliberately left out: prompting and answering (``rag.py``).
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np

from . import config
from .config import ChunkConfig, EmbeddingConfig, IndexConfig
from .errors import BadDocumentError, EmbeddingMismatchError, LimitError, MemChatError, NoStoreError, StoreError
from .names import clean_name
from .store import EncryptedStore, StoreState

log = logging.getLogger(__name__)


@dataclass
class Hit:
    """One retrieved chunk."""

    score: float  # cosine similarity to the query
    chunk_id: int
    document: str
    version: int
    page_start: int
    page_end: int
    text: str
    ocr: bool = False  # read by OCR from a page without a text layer: the text may hold misreadings

    @property
    def citation(self) -> str:
        pages = f"p. {self.page_start}" if self.page_start == self.page_end else f"pp. {self.page_start}-{self.page_end}"
        return f"{self.document}, {pages}" + (", OCR" if self.ocr else "")


@dataclass
class AddResult:
    name: str
    status: str  # "added" | "updated" | "unchanged" | "error"
    version: int | None = None
    pages: int = 0
    chunks: int = 0
    error: str | None = None
    seconds: float = 0.0

    @property
    def message(self) -> str:
        if self.status == "error":
            return f"{self.name}: {self.error}"
        if self.status == "unchanged":
            return f"{self.name}: already in the knowledge base (same content), nothing to do"
        verb = "added" if self.status == "added" else f"updated to version {self.version}"
        return f"{self.name}: {verb}, {self.pages} pages, {self.chunks} chunks ({self.seconds:.1f} s)"


@dataclass
class _Prepared:
    """A document extracted, chunked and embedded outside the lock."""

    name: str
    sha256: str
    pages: int
    chunks: list  # list[chunking.Chunk]
    vectors: object  # np.ndarray (n_chunks, dim)
    seconds: float
    result: AddResult = field(default=None)  # type: ignore[assignment]


ProgressFn = Callable[[str, float, str], None]  # (file name, fraction 0..1, stage)


def _empty_state(embedding_spec: dict, index_bytes: bytes) -> StoreState:
    now = time.time()
    metadata = {
        "format_version": config.STORE_FORMAT_VERSION,
        "embedding": embedding_spec,  # {"model", "backend", "dim"}
        "index": {"kind": "flat"},
        "next_chunk_id": 0,
        "created": now,
        "chunks": {},
    }
    versions = {"format_version": config.STORE_FORMAT_VERSION, "documents": {}}
    return StoreState(index_bytes, metadata, versions)


def _doc_hash(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class KnowledgeBase:
    def __init__(
        self,
        directory: str | os.PathLike | None = None,
        *,
        chunking: ChunkConfig | None = None,
        embedding: EmbeddingConfig | None = None,
        index: IndexConfig | None = None,
        ingest: config.IngestConfig | None = None,
        embedder=None,
    ):
        self.store = EncryptedStore(directory)
        self.chunk_cfg = chunking or ChunkConfig()
        self.embed_cfg = embedding or EmbeddingConfig()
        self.index_cfg = index or IndexConfig()
        self.ingest_cfg = ingest or config.IngestConfig()  # caps per document, OCR
        self._embedder = embedder
        self._cache: _View | None = None  # the decrypted state while the store files are unchanged

    # -- state -------------------------------------------------------------
    def exists(self) -> bool:
        return self.store.exists()

    def state(self) -> StoreState:
        return self._view().state

    def _view(self) -> "_View":
        """The latest state, its deserialised index and (lazily) its keyword index: one decrypt per store change.

        A commit replaces the three files (new inode and mtime), so while their signature
        is unchanged the decrypted state is reused: ``documents()``, ``search()`` and
        ``embedding_spec()`` of one question share one read. Raises NoStoreError.
        """
        from . import index as faiss_index

        sig = self.store.signature()
        if self._cache is not None and sig is not None and self._cache.signature == sig:
            return self._cache
        state = self.store.read()
        idx = faiss_index.deserialize(state.index_bytes)
        _check_consistent(state, idx, self.store.dir)
        self._cache = _View(self.store.signature(), state, idx)
        return self._cache

    def _loaded(self):
        view = self._view()
        return view.state, view.index

    def documents(self) -> list[dict]:
        """Current documents (no model loaded): name, version, pages, chunks, sha256, added."""
        try:
            state = self._view().state
        except NoStoreError:
            return []
        docs = state.versions["documents"].values()
        return sorted((dict(d) for d in docs), key=lambda d: d["name"].lower())

    def chunks(self) -> list[dict]:
        """Every chunk's metadata (text, document, version, pages, id, hash), in id order."""
        state = self._view().state
        return [state.metadata["chunks"][k] for k in sorted(state.metadata["chunks"], key=int)]

    def embedding_spec(self) -> dict | None:
        try:
            return self._view().state.metadata["embedding"]
        except NoStoreError:
            return None

    def attach_embedder(self, embedder) -> None:
        """Use an already loaded embedder (an app's cached one) instead of loading another."""
        self._embedder = embedder

    # -- embedding ---------------------------------------------------------
    def embedder(self):
        """The embedder the store was built with (or the configured one for a new store)."""
        if self._embedder is None:
            from .embeddings import Embedder

            spec = self.embedding_spec()
            model = self.embed_cfg.model_name
            backend = self.embed_cfg.backend
            if spec is not None:
                _check_model(spec, model, self.store.dir)
                backend = spec.get("backend", backend)  # queries must live in the store's vector space
            self._embedder = Embedder(
                model, backend=backend, batch_size=self.embed_cfg.batch_size, max_seq_length=self.embed_cfg.max_seq_length
            )
        return self._embedder

    # -- adding ------------------------------------------------------------
    def prepare(self, name: str, data: bytes, password: str | None = None, progress: ProgressFn | None = None) -> _Prepared:
        """Extract, chunk and embed one PDF (no lock held). Raises BadDocumentError."""
        from .chunking import chunk_pages
        from .pdf import extract_pdf

        t0 = time.perf_counter()
        if progress:
            progress(name, 0.05, "reading")

        def on_page(done: int, total: int, stage: str) -> None:  # extraction is 0.05..0.3 of the bar
            if progress:
                progress(name, 0.05 + 0.25 * done / total, f"{stage} page {done}/{total}")

        cap = self.ingest_cfg.max_chunks
        doc = extract_pdf(data, name, password=password, limits=self.ingest_cfg, on_page=on_page)
        chunks = chunk_pages(doc.pages, self.chunk_cfg.chunk_size, self.chunk_cfg.chunk_overlap, self.chunk_cfg.min_chunk_chars,
                             max_chunks=cap)
        if len(chunks) > cap:
            raise LimitError(name, f"cuts into more than {cap:,} chunks, over the {cap:,} limit per document; "
                             "raise MEMCHAT_MAX_CHUNKS if you trust it")
        if not chunks:
            raise BadDocumentError(name, "no text to index after extraction (scanned image? run OCR first, e.g. ocrmypdf)")
        if progress:
            progress(name, 0.3, f"embedding {len(chunks)} chunks")
        # Embedded with the document's title (and heading, when the chunker found one): see search_text.
        vectors = self.embedder().encode(
            [search_text({"document": name, "text": c.text, "heading": c.heading}) for c in chunks])
        if progress:
            progress(name, 0.95, "saving")
        return _Prepared(name, doc.sha256, doc.num_pages, chunks, vectors, time.perf_counter() - t0)

    def add_documents(
        self,
        files: Iterable[str | os.PathLike | tuple[str, bytes]],
        *,
        passwords: dict[str, str] | None = None,
        progress: ProgressFn | None = None,
    ) -> list[AddResult]:
        """Add PDFs (paths or (name, bytes)). Bad files get an error result; the rest go in.

        Same content under the same name is a no-op; changed content becomes version N+1.
        All good files are committed together in one atomic save.
        """
        passwords = passwords or {}
        results: list[AddResult] = []
        prepared: list[_Prepared] = []
        known = {d["name"]: d["sha256"] for d in self.documents()}
        for item in files:
            if isinstance(item, tuple):
                name, data = item
            else:
                path = Path(item)
                name = path.name
                try:
                    size = path.stat().st_size
                    if size > self.ingest_cfg.max_file_bytes:  # refused before a byte of it is read into memory
                        raise LimitError(name, f"is {size:,} bytes, over the {self.ingest_cfg.max_file_bytes:,} bytes "
                                               "limit per file; raise MEMCHAT_MAX_FILE_BYTES if you trust it")
                    data = path.read_bytes()
                except LimitError as exc:
                    results.append(AddResult(name, "error", error=exc.reason))
                    if progress:
                        progress(name, 1.0, "failed")
                    continue
                except OSError as exc:
                    results.append(AddResult(name, "error", error=f"cannot read file ({exc.strerror})"))
                    if progress:
                        progress(name, 1.0, "failed")
                    continue
            name = clean_name(Path(name).name)  # never trust a directory part or control characters from an upload
            if known.get(name) == _doc_hash(data):
                results.append(AddResult(name, "unchanged"))
                if progress:
                    progress(name, 1.0, "unchanged")
                continue
            try:
                p = self.prepare(name, data, passwords.get(name), progress)
            except BadDocumentError as exc:
                results.append(AddResult(name, "error", error=exc.reason))
                if progress:
                    progress(name, 1.0, "failed")
                continue
            p.result = AddResult(name, "added", pages=p.pages, chunks=len(p.chunks), seconds=p.seconds)
            results.append(p.result)
            prepared.append(p)
        if prepared:
            self._merge(prepared)
            if progress:
                for p in prepared:
                    progress(p.name, 1.0, "done")
        return results

    def _merge(self, prepared: Sequence[_Prepared]) -> None:
        from . import index as faiss_index

        embedder = self.embedder()
        with self.store.transaction() as state:
            if state is None:
                empty = faiss_index.new_index(embedder.dim, faiss_index.FLAT, self.index_cfg)
                state = _empty_state(embedder.spec, faiss_index.serialize(empty))
            else:
                _check_model(state.metadata["embedding"], embedder.model_name, self.store.dir)
            idx = faiss_index.deserialize(state.index_bytes)
            _check_consistent(state, idx, self.store.dir)
            meta, docs = state.metadata, state.versions["documents"]
            now = time.time()
            for p in prepared:
                old = docs.get(p.name)
                if old is not None and old["sha256"] == p.sha256:  # a concurrent writer added it
                    p.result.status = "unchanged"
                    p.result.version = old["version"]
                    continue
                version = 1 if old is None else old["version"] + 1
                if old is not None:
                    stale = [cid for cid, c in meta["chunks"].items() if c["document"] == p.name]
                    idx = faiss_index.remove(idx, [int(c) for c in stale], self.index_cfg)
                    for cid in stale:
                        del meta["chunks"][cid]
                first = meta["next_chunk_id"]
                ids = list(range(first, first + len(p.chunks)))
                meta["next_chunk_id"] = first + len(p.chunks)
                faiss_index.add(idx, p.vectors, ids)
                for cid, c in zip(ids, p.chunks):
                    meta["chunks"][str(cid)] = {
                        "id": cid,
                        "document": p.name,
                        "version": version,
                        "page_start": c.page_start,
                        "page_end": c.page_end,
                        "index": c.index,
                        "text": c.text,
                        "hash": c.content_hash,
                        **({"ocr": True} if c.ocr else {}),  # read by OCR (no text layer)
                        **({"heading": c.heading} if c.heading else {}),  # nearest heading: retrieval context
                    }
                history = (old or {}).get("history", [])
                if old is not None:
                    history = history + [{k: old[k] for k in ("version", "sha256", "added", "pages", "chunks")}]
                docs[p.name] = {
                    "name": p.name,
                    "sha256": p.sha256,
                    "version": version,
                    "added": now,
                    "pages": p.pages,
                    "chunks": len(p.chunks),
                    "history": history,
                }
                p.result.status = "added" if old is None else "updated"
                p.result.version = version
            idx = faiss_index.fit_kind(idx, self.index_cfg)
            meta["index"] = {"kind": faiss_index.kind_of(idx), "approximate_threshold": self.index_cfg.approximate_threshold}
            state.index_bytes = faiss_index.serialize(idx)
            _check_consistent(state, idx, self.store.dir)
            self.store.commit(state)

    # -- removing ----------------------------------------------------------
    def remove(self, name: str) -> dict:
        """Remove a document and its chunks. Returns its record; raises MemChatError if absent."""
        from . import index as faiss_index

        with self.store.transaction() as state:
            if state is None:
                raise NoStoreError(f"No knowledge base in {self.store.dir}/. Add PDFs first: python main.py add FILE.pdf")
            docs = state.versions["documents"]
            if name not in docs:
                known = ", ".join(sorted(docs)) or "none"
                raise MemChatError(f"No document named '{name}' in the knowledge base (documents: {known}).")
            idx = faiss_index.deserialize(state.index_bytes)
            _check_consistent(state, idx, self.store.dir)
            stale = [cid for cid, c in state.metadata["chunks"].items() if c["document"] == name]
            idx = faiss_index.remove(idx, [int(c) for c in stale], self.index_cfg)
            for cid in stale:
                del state.metadata["chunks"][cid]
            record = docs.pop(name)
            state.versions.setdefault("removed", []).append({**{k: record[k] for k in ("name", "version", "sha256")}, "removed": time.time()})
            idx = faiss_index.fit_kind(idx, self.index_cfg)
            state.metadata["index"]["kind"] = faiss_index.kind_of(idx)
            state.index_bytes = faiss_index.serialize(idx)
            _check_consistent(state, idx, self.store.dir)
            self.store.commit(state)
            return record

    # -- searching ---------------------------------------------------------
    def search(self, query: str, k: int = 4, method: str = "hybrid") -> list[Hit]:
        """The best ``k`` chunks for ``query``, best first; each Hit's score is its cosine to the query.

        method: "dense" (FAISS over MiniLM vectors), "keyword" (BM25) or "hybrid" (both,
        fused by reciprocal rank fusion over their top ``k * RRF_DEPTH``).
        """
        from . import index as faiss_index

        if method not in SEARCH_METHODS:
            raise ValueError(f"method must be one of {SEARCH_METHODS}, not {method!r}")
        view = self._view()
        idx = view.index
        if idx.ntotal == 0:
            return []
        qv = self.embedder().encode_query(query)  # normalised
        depth = k if method == "dense" else k * RRF_DEPTH
        dense: list[int] = []
        cos: dict[int, float] = {}
        if method != "keyword":
            scores, ids = faiss_index.search(idx, qv, depth, self.index_cfg.hnsw_ef_search)
            for s, i in zip(scores[0], ids[0]):
                if i >= 0:
                    dense.append(int(i))
                    cos[int(i)] = float(s)
        if method == "dense":
            chosen = dense[:k]
        else:
            keyword = [cid for cid, _ in view.lexical().search(query, depth)]
            chosen = rrf_fuse([dense, keyword], k) if method == "hybrid" else keyword[:k]
            missing = [cid for cid in chosen if cid not in cos]
            if missing:  # keyword-only hits: their cosine from the stored vectors, so scores mean one thing
                cos.update(zip(missing, _cosines(idx, qv, missing)))
        return [self._hit(view.state, cid, cos[cid]) for cid in chosen]

    def rescored(self, query: str, hits: Sequence[Hit]) -> list[Hit]:
        """``hits`` (found by any query) with each score replaced by its cosine to ``query``, order kept."""
        if not hits:
            return []
        view = self._view()
        qv = self.embedder().encode_query(query)
        scores = _cosines(view.index, qv, [h.chunk_id for h in hits])
        return [replace(h, score=s) for h, s in zip(hits, scores)]

    def idf(self, word: str) -> float:
        """BM25 idf of a stemmed content word in this store (rare words weigh more)."""
        return self._view().lexical().idf(word)

    @staticmethod
    def _hit(state: StoreState, chunk_id: int, score: float) -> Hit:
        c = state.metadata["chunks"][str(chunk_id)]
        return Hit(score, chunk_id, c["document"], c["version"], c["page_start"], c["page_end"], c["text"], c.get("ocr", False))


def _cosines(idx, query_vector, chunk_ids) -> list[float]:
    """Cosines of the stored vectors of ``chunk_ids`` to a normalised query vector."""
    vecs = np.vstack([idx.reconstruct(int(cid)) for cid in chunk_ids])
    return [float(c) for c in vecs @ np.asarray(query_vector, dtype=np.float32).reshape(-1)]


SEARCH_METHODS = ("hybrid", "dense", "keyword")
RRF_K = 60  # reciprocal rank fusion constant (Cormack et al. 2009): damps the weight of the very top ranks
RRF_DEPTH = 5  # each ranking contributes its top k * 5 to the fusion: deep enough to rescue a rank-12 hit


def rrf_fuse(rankings: Sequence[Sequence[int]], k: int) -> list[int]:
    """Reciprocal rank fusion of rankings of ids: the best ``k`` by sum of 1 / (RRF_K + rank)."""
    scores: dict[int, float] = {}
    first_seen: dict[int, int] = {}
    for ranking in rankings:
        for rank, cid in enumerate(ranking):
            scores[cid] = scores.get(cid, 0.0) + 1.0 / (RRF_K + rank + 1)
            first_seen.setdefault(cid, len(first_seen))
    return sorted(scores, key=lambda c: (-scores[c], first_seen[c]))[:k]


@dataclass
class _View:
    """One decrypted store state and what is derived from it (rebuilt only when the files change)."""

    signature: tuple
    state: StoreState
    index: object  # faiss index
    _lexical: object = None

    def lexical(self):
        if self._lexical is None:
            from .lexical import LexicalIndex

            chunks = self.state.metadata["chunks"]
            ids = sorted(chunks, key=int)
            self._lexical = LexicalIndex([int(i) for i in ids], [search_text(chunks[i]) for i in ids])
        return self._lexical


def document_title(name: str) -> str:
    """A readable title from a file name: "dev2_01_Amazon_rainforest.pdf" -> "Amazon rainforest"."""
    import re

    stem = Path(name).stem
    words = [w for w in re.split(r"[_\-\s.]+", stem) if w]
    while words and (any(ch.isdigit() for ch in words[0]) or len(words[0]) <= 2 and len(words) > 1):
        words.pop(0)  # leading numbering such as "01", "dev2", "ch3"
    return " ".join(words) or stem


def search_text(chunk: dict) -> str:
    """What retrieval sees of a chunk: its document's title, its nearest heading, then its text.

    A chunk from the middle of a paper often never names the paper's subject; the title
    puts it back (for the dense vector and for BM25). The chunk's text itself, which
    answers and citations quote, is unchanged.
    """
    head = [document_title(chunk["document"])]
    if chunk.get("heading"):
        head.append(chunk["heading"])
    return ". ".join(head) + "\n" + chunk["text"]


def _check_model(spec: dict, model_name: str, directory: Path) -> None:
    if spec.get("model") != model_name:
        raise EmbeddingMismatchError(
            f"The knowledge base in {directory}/ was built with the embedding model '{spec.get('model')}' "
            f"({spec.get('dim')}-d); '{model_name}' cannot query it. Use --embedding-model '{spec.get('model')}', "
            "or start a new store (a different MEMCHAT_STORAGE_DIR) with the new model."
        )


def _check_consistent(state: StoreState, idx, directory: Path) -> None:
    from . import index as faiss_index

    meta_ids = {int(k) for k in state.metadata["chunks"]}
    index_ids = set(faiss_index.ids_of(idx).tolist())
    if meta_ids != index_ids:
        raise StoreError(
            f"{directory}/: index and metadata disagree ({len(index_ids)} vectors, {len(meta_ids)} chunks). "
            "The store is damaged; restore it from a backup or re-add the documents."
        )
    dim = state.metadata["embedding"]["dim"]
    if idx.d != dim:
        raise StoreError(f"{directory}/: index dimension {idx.d} does not match the embedding model's {dim}.")
