"""Hybrid answering: the fine-tuned model drafts, the documents decide.

A fine-tuned model has read the documents, but small ones misremember; RAG reads
the right page, but a small instruct model often words its answer poorly or
misses the fact in front of it. The hybrid uses each for what it is good at:

  verify  (default) The fine-tuned model drafts an answer (greedy, short). The
          knowledge base is searched twice, with the question and with
          "question + draft" (the draft speaks the document's vocabulary: a
          HyDE-style expansion, Gao et al. 2022), and the two rankings are merged by
          reciprocal rank fusion, so a wrong draft can add chunks but never push out
          the ones the question found by itself. The RAG model answers from the
          evidence sentences of the merged chunks, as in ``rag``. Then the evidence
          decides: the draft replaces the grounded answer only when the evidence
          sentences contain clearly more of the draft's content words than of the
          grounded answer's (``support``: at least VERIFY_MIN_SUPPORT, and
          VERIFY_MARGIN more). Either way the answer is shown with that evidence and
          its citations, so a reader can check it.
  expand  The same without the final check: always the grounded answer.
  route   One retrieval; if its best score is below ``route_threshold`` (the
          question is not about the documents) the fine-tuned model answers alone,
          else RAG answers. The cheapest: one model per question.

Measured with ``test_finetuned_model.py --eval`` on ../shared/data/qa_dev (49
SQuAD questions, 4 PDFs; SmolLM2-135M for both models, fine-tuned on the
extraction's pairs): token F1 / contains-gold were RAG 8.7 / 24.5%, fine-tuned
11.9 / 32.7%, expand 9.6 / 26.5%, verify 14.8 / 42.9%; route sent every question
to RAG (all are about the documents) and scored as RAG. Hence verify. Its
thresholds were set before measuring and not tuned on that set (0.5-0.7 and
margins 0.1-0.4 all scored F1 13.9-16.2).

Deliberately left out: loading models (``finetuned``, ``generation``) and the UI.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Iterator, Sequence

from .knowledge import Hit
from .rag import _NO_CONTEXT, Answer, Evidence, RAGPipeline
from .text import content_words as _content_words

STRATEGIES = ("verify", "expand", "route")
DEFAULT_STRATEGY = "verify"
RRF_K = 60  # reciprocal rank fusion constant (Cormack et al. 2009): damps the top ranks' weight
DRAFT_MAX_NEW_TOKENS = 48  # a draft only needs the key words; longer drafts dilute the query
ROUTE_THRESHOLD = 0.35  # cosine of MiniLM: below it, the best chunk is rarely about the question
VERIFY_MARGIN = 0.25  # the draft must beat the grounded answer's support by this much
VERIFY_MIN_SUPPORT = 0.6  # ...and have at least this share of its words in the evidence
VERIFY_EVIDENCE = 4  # evidence sentences a draft's words are checked against


@dataclass
class HybridAnswer(Answer):
    draft: str = ""  # the fine-tuned model's draft ("" when the strategy made none)
    route: str = ""  # what produced ``text``: "grounded" | "draft" | "finetuned"
    strategy: str = ""


def support(text: str, evidence: Sequence[Evidence], n: int = VERIFY_EVIDENCE) -> float:
    """Share of ``text``'s content words that appear in the top ``n`` evidence sentences (0..1)."""
    words = _content_words(text)
    if not words:
        return 0.0
    found: set[str] = set()
    for e in evidence[:n]:
        found |= _content_words(e.sentence)
    return len(words & found) / len(words)


def fuse(rankings: Sequence[Sequence[Hit]], k: int) -> list[Hit]:
    """Reciprocal rank fusion of several rankings of chunks; the best ``k``, each with its best cosine."""
    scores: dict[int, float] = {}
    best: dict[int, Hit] = {}
    for ranking in rankings:
        for rank, hit in enumerate(ranking):
            scores[hit.chunk_id] = scores.get(hit.chunk_id, 0.0) + 1.0 / (RRF_K + rank + 1)
            if hit.chunk_id not in best or hit.score > best[hit.chunk_id].score:
                best[hit.chunk_id] = hit
    order = sorted(scores, key=lambda cid: (-scores[cid], -best[cid].score))
    return [best[cid] for cid in order[:k]]


class HybridPipeline:
    """``rag`` (knowledge base + instruct model) and ``chat`` (a ``finetuned.ChatModel``)."""

    def __init__(self, rag: RAGPipeline, chat, *, strategy: str = DEFAULT_STRATEGY,
                 route_threshold: float = ROUTE_THRESHOLD, draft_max_new_tokens: int = DRAFT_MAX_NEW_TOKENS):
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, not {strategy!r}")
        self.rag = rag
        self.chat = chat
        self.strategy = strategy
        self.route_threshold = route_threshold
        self.draft_max_new_tokens = draft_max_new_tokens

    @property
    def generator(self):
        return self.rag.generator

    @property
    def display_name(self) -> str:
        return f"{self.chat.display_name} + {self.rag.generator.resolved.display_name} ({self.strategy})"

    # -- the steps -----------------------------------------------------------
    def drafts(self, questions: Sequence[str], batch_size: int = 16) -> list[str]:
        return self.chat.answer_many(questions, max_new_tokens=self.draft_max_new_tokens, batch_size=batch_size)

    def retrieve(self, question: str, draft: str) -> list[Hit]:
        k = self.rag.cfg.top_k
        plain = self.rag.retrieve(question, k)
        if not draft.strip():
            return plain
        expanded = self.rag.retrieve(f"{question} {draft}", k)
        return fuse([plain, expanded], k)

    def _grounded(self, question: str, draft: str) -> tuple[list[Hit], list[Evidence], list[dict], dict]:
        t0 = time.perf_counter()
        hits = self.retrieve(question, draft)
        t1 = time.perf_counter()
        evidence = self.rag.select_evidence(question, hits)
        t2 = time.perf_counter()
        return hits, evidence, self.rag.build_messages(question, evidence), {"retrieve_s": t1 - t0, "evidence_s": t2 - t1}

    def _choose(self, grounded: str, draft: str, evidence: list[Evidence]) -> tuple[str, str]:
        if self.strategy == "verify" and draft.strip():
            d, g = support(draft, evidence), support(grounded, evidence)
            if d >= VERIFY_MIN_SUPPORT and d >= g + VERIFY_MARGIN:
                return draft.strip(), "draft"
        return grounded.strip(), "grounded"

    def scorer(self, question: str):
        """(generator, messages) for multiple-choice scoring: the model that answers, after its own prompt.

        verify/expand: the RAG model after the grounded prompt of the widened retrieval
        (the choice between draft and grounded answer is about wording, not options).
        """
        if self.strategy == "route":
            hits = self.rag.retrieve(question)
            if not hits or hits[0].score < self.route_threshold:
                return self.chat.generator, self.chat.messages(question)
            return self.rag.generator, self.rag.build_messages(question, self.rag.select_evidence(question, hits))
        draft = self.drafts([question], 1)[0]
        return self.rag.generator, self._grounded(question, draft)[2]

    # -- answering -----------------------------------------------------------
    def answer(self, question: str) -> HybridAnswer:
        return self.answer_many([question], batch_size=1)[0]

    def answer_many(self, questions: Sequence[str], batch_size: int = 8) -> list[HybridAnswer]:
        t0 = time.perf_counter()
        if self.strategy == "route":
            out = self._route_many(questions, batch_size)
        else:
            drafts = self.drafts(questions, batch_size)
            prepared = [self._grounded(q, d) for q, d in zip(questions, drafts)]
            todo = [i for i, p in enumerate(prepared) if p[0]]
            texts = [_NO_CONTEXT] * len(questions)
            results = self.rag.generator.generate([prepared[i][2] for i in todo], batch_size=batch_size, **self.rag._gen_kwargs())
            for i, r in zip(todo, results):
                texts[i] = r.text
            out = []
            for q, d, (hits, ev, _, timings), text in zip(questions, drafts, prepared, texts):
                chosen, route = self._choose(text, d, ev) if hits else (text, "grounded")
                out.append(HybridAnswer(q, chosen, hits, ev, self.display_name, 0.0, timings, draft=d, route=route,
                                        strategy=self.strategy))
        per = (time.perf_counter() - t0) / max(1, len(questions))
        for a in out:
            a.seconds = per
        return out

    def _route_many(self, questions: Sequence[str], batch_size: int) -> list[HybridAnswer]:
        prepared = [self.rag.prepare(q) for q in questions]
        to_chat = [i for i, (hits, *_ ) in enumerate(prepared) if not hits or hits[0].score < self.route_threshold]
        to_rag = [i for i in range(len(questions)) if i not in set(to_chat)]
        texts = [""] * len(questions)
        chat_answers = self.chat.answer_many([questions[i] for i in to_chat], batch_size=batch_size,
                                             max_new_tokens=self.rag.gen_cfg.max_new_tokens)  # the same cap as RAG's
        for i, t in zip(to_chat, chat_answers):
            texts[i] = t
        for i, r in zip(to_rag, self.rag.generator.generate([prepared[i][2] for i in to_rag], batch_size=batch_size,
                                                           **self.rag._gen_kwargs())):
            texts[i] = r.text
        out = []
        for i, (q, (hits, ev, _, timings)) in enumerate(zip(questions, prepared)):
            if i in to_chat:  # not about the documents: no citations claimed
                out.append(HybridAnswer(q, texts[i].strip(), [], [], self.chat.display_name, 0.0, timings,
                                        route="finetuned", strategy="route"))
            else:
                out.append(HybridAnswer(q, texts[i].strip(), hits, ev, self.display_name, 0.0, timings,
                                        route="grounded", strategy="route"))
        return out

    def stream(self, question: str) -> tuple[Iterator[str], HybridAnswer]:
        """Pieces of the answer; the returned ``HybridAnswer`` is complete once they are exhausted.

        The grounded answer streams token by token. ``verify`` must see the whole
        grounded answer before it can choose, so it yields its choice in one piece.
        """
        t0 = time.perf_counter()
        result = HybridAnswer(question, "", [], [], self.display_name, 0.0, {}, strategy=self.strategy)

        def pieces() -> Iterator[str]:
            if self.strategy == "route" or self.strategy == "verify":
                answer = self.answer(question)
                for name in ("text", "hits", "evidence", "model", "timings", "draft", "route"):
                    setattr(result, name, getattr(answer, name))
                result.seconds = time.perf_counter() - t0
                yield answer.text
                return
            result.draft = self.drafts([question], 1)[0]
            hits, evidence, messages, timings = self._grounded(question, result.draft)
            result.hits, result.evidence, result.timings, result.route = hits, evidence, timings, "grounded"
            if not hits:
                result.text = _NO_CONTEXT
                yield _NO_CONTEXT
                return
            buf = []
            for piece in self.rag.generator.stream(messages, **self.rag._gen_kwargs()):
                buf.append(piece)
                yield piece
            result.text = "".join(buf).strip()
            result.seconds = time.perf_counter() - t0

        return pieces(), result
