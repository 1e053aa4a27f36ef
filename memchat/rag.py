"""Retrieve -> select evidence -> prompt -> answer, with citations (file, page).

Small instruct models answer far better from a few focused sentences than from
whole pasted chunks, so after retrieving the top-k chunks we rank their
sentences against the question with the same embedding model (plus a small
bonus for the chunk's own score and for shared words) and hand the model only
the best few, in document order, each tagged with its citation. The best
sentence is shown under the answer as the evidence, so a reader can check the
answer against the document at a glance.

Deliberately left out: how the model is loaded (``generation``/``models``) and
the store (``knowledge``).
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np

from .config import GenerationConfig, RAGConfig
from .knowledge import Hit, KnowledgeBase

SYSTEM_PROMPT = (
    "You are a careful assistant. Answer the question using only the numbered context. "
    "Reply with a short, direct answer (a few words or one sentence). "
    "If the context does not contain the answer, say: I don't know."
)

_WORD = re.compile(r"\w+", re.UNICODE)
_STOP = set(
    "a an the of in on at to for from by with and or is are was were be been what which who whom whose when where "
    "why how did does do that this these those it its as than into about after before during many much".split()
)


@dataclass
class Evidence:
    sentence: str
    score: float
    hit: Hit

    @property
    def citation(self) -> str:
        return self.hit.citation


@dataclass
class Answer:
    question: str
    text: str  # the model's answer alone
    hits: list[Hit]
    evidence: list[Evidence]
    model: str = ""
    seconds: float = 0.0
    timings: dict = field(default_factory=dict)

    @property
    def citations(self) -> list[str]:
        seen: dict[str, None] = {}
        for e in self.evidence or []:
            seen.setdefault(e.citation, None)
        for h in self.hits:
            seen.setdefault(h.citation, None)
        return list(seen)

    @property
    def evidence_line(self) -> str:
        if not self.evidence:
            return ""
        best = self.evidence[0]
        return f'Evidence: "{best.sentence}" ({best.citation})'

    def render(self) -> str:
        """Answer + evidence + sources, as the CLI prints it and the scorer reads it."""
        parts = [self.text.strip()]
        if self.evidence_line:
            parts.append(self.evidence_line)
        if self.hits:
            parts.append("Sources: " + "; ".join(self.citations))
        return "\n\n".join(parts)


def _content_words(text: str) -> set[str]:
    return {w for w in _WORD.findall(text.lower()) if w not in _STOP and len(w) > 1}


class RAGPipeline:
    def __init__(
        self,
        kb: KnowledgeBase,
        generator=None,
        *,
        rag: RAGConfig | None = None,
        generation: GenerationConfig | None = None,
    ):
        self.kb = kb
        self.cfg = rag or RAGConfig()
        self.gen_cfg = generation or GenerationConfig()
        self._generator = generator

    @property
    def generator(self):
        if self._generator is None:
            from .generation import Generator

            self._generator = Generator(self.gen_cfg.model_name)
        return self._generator

    # -- retrieval -----------------------------------------------------------
    def retrieve(self, question: str, k: int | None = None) -> list[Hit]:
        return self.kb.search(question, k or self.cfg.top_k)

    def select_evidence(self, question: str, hits: list[Hit]) -> list[Evidence]:
        """Best sentences of the retrieved chunks, best first."""
        from .chunking import split_sentences

        cands: list[tuple[str, Hit]] = []
        seen: set[str] = set()
        for h in hits:
            for s in split_sentences(h.text):
                s = " ".join(s.split())
                if len(s) < 12 or s in seen:
                    continue
                seen.add(s)
                cands.append((s, h))
        if not cands:
            return []
        emb = self.kb.embedder()
        vecs = emb.encode([question] + [s for s, _ in cands])  # (1 + n, dim), normalised
        cos = vecs[1:] @ vecs[0]
        qwords = _content_words(question)
        scores = []
        for (s, h), c in zip(cands, cos):
            overlap = len(qwords & _content_words(s)) / max(1, len(qwords))
            # weights: sentence similarity dominates; the chunk's score and word overlap break ties
            scores.append(float(c) + 0.3 * h.score + 0.25 * overlap)
        order = np.argsort(scores)[::-1]
        return [Evidence(cands[i][0], scores[i], cands[i][1]) for i in order]

    # -- prompting -----------------------------------------------------------
    def build_messages(self, question: str, evidence: list[Evidence]) -> list[dict]:
        chosen, used = [], 0
        for e in evidence[: self.cfg.evidence_sentences]:
            if used + len(e.sentence) > self.cfg.max_context_chars and chosen:
                break
            chosen.append(e)
            used += len(e.sentence)
        lines = [f"[{i}] ({e.citation}) {e.sentence}" for i, e in enumerate(chosen, 1)]
        context = "\n".join(lines) if lines else "(no context found)"
        user = f"Context:\n{context}\n\nQuestion: {question}\nAnswer:"
        return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user}]

    def _gen_kwargs(self) -> dict:
        g = self.gen_cfg
        return dict(
            max_new_tokens=g.max_new_tokens, temperature=g.temperature, top_p=g.top_p, repetition_penalty=g.repetition_penalty
        )

    # -- answering -----------------------------------------------------------
    def prepare(self, question: str) -> tuple[list[Hit], list[Evidence], list[dict], dict]:
        t0 = time.perf_counter()
        hits = self.retrieve(question)
        t1 = time.perf_counter()
        evidence = self.select_evidence(question, hits)
        t2 = time.perf_counter()
        return hits, evidence, self.build_messages(question, evidence), {"retrieve_s": t1 - t0, "evidence_s": t2 - t1}

    def answer(self, question: str) -> Answer:
        t0 = time.perf_counter()
        hits, evidence, messages, timings = self.prepare(question)
        text = self.generator.generate([messages], **self._gen_kwargs())[0].text if hits else _NO_CONTEXT
        return Answer(question, text.strip(), hits, evidence, self.generator.resolved.display_name if hits else "",
                      time.perf_counter() - t0, timings)

    def answer_many(self, questions: list[str], batch_size: int = 8) -> list[Answer]:
        """Batched: one generate call per batch of questions (for evaluation)."""
        t0 = time.perf_counter()
        prepared = [self.prepare(q) for q in questions]
        texts = self.generator.generate([m for _, _, m, _ in prepared], batch_size=batch_size, **self._gen_kwargs())
        per = (time.perf_counter() - t0) / max(1, len(questions))
        return [
            Answer(q, r.text.strip(), h, e, self.generator.resolved.display_name, per, t)
            for q, (h, e, _, t), r in zip(questions, prepared, texts)
        ]

    def stream(self, question: str) -> tuple[Iterator[str], Answer]:
        """Pieces of the answer as they are generated; ``Answer.text`` is filled when exhausted."""
        t0 = time.perf_counter()
        hits, evidence, messages, timings = self.prepare(question)
        result = Answer(question, "", hits, evidence, "", 0.0, timings)

        def pieces() -> Iterator[str]:
            if not hits:
                result.text = _NO_CONTEXT
                yield _NO_CONTEXT
                return
            result.model = self.generator.resolved.display_name
            buf = []
            for piece in self.generator.stream(messages, **self._gen_kwargs()):
                buf.append(piece)
                yield piece
            result.text = "".join(buf).strip()
            result.seconds = time.perf_counter() - t0

        return pieces(), result


_NO_CONTEXT = "The knowledge base has no documents yet. Add PDFs first."
