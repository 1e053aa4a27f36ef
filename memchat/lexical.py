"""Keyword search over the chunks: BM25, built in memory from the decrypted chunks.

Dense MiniLM vectors find paraphrases but blur rare exact terms (a gene name, a
model number, "CALIPSO"); BM25 finds those. ``knowledge.KnowledgeBase.search``
fuses the two rankings by reciprocal rank fusion. The index lives only in memory
and is rebuilt when the store changes: no plaintext term list is written to disk.

Tokens are ``text.content_word_list`` (lower-cased, stemmed, no stop words), the
same words the reader and the abstention check count, so "support" means the same
thing everywhere. Deliberately left out: the dense side (``index``) and fusion
(``knowledge``).
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from typing import Sequence

import numpy as np

from .text import content_word_list


PRIOR_CHUNKS = 100  # pseudo-chunks for idf smoothing (see LexicalIndex.idf)


class LexicalIndex:
    """BM25 (Robertson/Lucene variant, k1=1.5, b=0.75 as bm25s defaults) over ``texts``, keyed by ``ids``."""

    def __init__(self, ids: Sequence[int], texts: Sequence[str]):
        import bm25s

        logging.getLogger("bm25s").setLevel(logging.WARNING)  # it sets itself to DEBUG and would print every build
        self.ids = np.asarray(list(ids), dtype=np.int64)
        tokens = [content_word_list(t) for t in texts]
        self.n_docs = len(tokens)
        self.df: Counter = Counter()
        for toks in tokens:
            self.df.update(set(toks))
        self._bm25 = None
        if self.n_docs and any(tokens):
            self._bm25 = bm25s.BM25()
            self._bm25.index([t or ["\x00"] for t in tokens], show_progress=False)

    def idf(self, word: str) -> float:
        """Smoothed idf of a (stemmed) content word: high for rare words, low for words in most chunks.

        log((N + PRIOR_CHUNKS) / (df + 1)): as if the store also held PRIOR_CHUNKS chunks
        that lack the word, so a store of three chunks does not call every word absent
        from it infinitely rare, nor every word it has worthless.
        """
        return math.log((self.n_docs + PRIOR_CHUNKS) / (self.df.get(word, 0) + 1.0))

    def search(self, query: str, k: int) -> list[tuple[int, float]]:
        """(chunk id, BM25 score) of the best ``k`` chunks with any query word, best first."""
        words = [w for w in content_word_list(query) if w in self.df]
        if self._bm25 is None or not words:
            return []
        scores = np.asarray(self._bm25.get_scores(words), dtype=np.float64)
        k = min(k, int((scores > 0).sum()))
        if k <= 0:
            return []
        top = np.argpartition(-scores, k - 1)[:k]
        top = top[np.argsort(-scores[top], kind="stable")]
        return [(int(self.ids[i]), float(scores[i])) for i in top]
