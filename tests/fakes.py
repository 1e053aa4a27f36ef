"""Deterministic, countable fakes (importable from subprocesses too)."""

from __future__ import annotations

import hashlib
import re

import numpy as np


class FakeEmbedder:
    """Bag-of-words hashed into 64 dims, L2-normalised: same words -> same vector.

    Counts how many texts it embedded, so tests can check work is not redone.
    """

    def __init__(self, model_name: str = "sentence-transformers/all-MiniLM-L6-v2", dim: int = 64):
        self.model_name = model_name
        self.backend = "fake"
        self.dim = dim
        self.notice = None
        self.calls = 0
        self.texts_embedded = 0

    @property
    def spec(self) -> dict:
        return {"model": self.model_name, "backend": self.backend, "dim": self.dim}

    def encode(self, texts, progress: bool = False) -> np.ndarray:
        self.calls += 1
        self.texts_embedded += len(texts)
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for i, t in enumerate(texts):
            for w in re.findall(r"\w+", t.lower()):
                h = int(hashlib.md5(w.encode()).hexdigest()[:8], 16)
                out[i, h % self.dim] += 1.0
            n = np.linalg.norm(out[i])
            out[i] = out[i] / n if n else out[i]
            if not n:
                out[i, 0] = 1.0
        return out

    def encode_query(self, text: str) -> np.ndarray:
        return self.encode([text])[0]
