"""Hybrid answering: the fine-tuned model drafts, the documents decide.

A fine-tuned model has read the documents, but small ones misremember; RAG reads
the right page, but picks the wrong phrase of it now and then. The hybrid uses each
for what it is good at:

  verify  (default) The fine-tuned model drafts a short answer (greedy). The knowledge
          base is searched twice, with the question and with "question + draft" (the
          draft speaks the document's vocabulary: a HyDE-style expansion, Gao et al.
          2022), and the two rankings are merged by reciprocal rank fusion, so a wrong
          draft can add chunks but never push out the ones the question found. Then the
          RAG answer is made in the RAG's mode (``rag.RAGPipeline.resolved_mode``):
          - extractive: the answer is the reader's span of the documents. With a
            ``draft_vote`` above 0 the draft also *votes* among the candidate spans (a
            bonus of draft_vote x the model's measured knowledge F1 x the span's token F1
            with the draft); a draft that misremembers still cannot put its words in the
            documents' mouth. The default vote is 0 (DRAFT_VOTE: over the fine-tuned
            models measured so far, a vote lost more than it gained);
          - generative: the grounded answer is generated; the draft replaces it only
            when the evidence supports the draft clearly better (``rag.support`` at
            least VERIFY_MIN_SUPPORT and VERIFY_MARGIN more); the RAG's verification
            then applies to whichever was chosen.
  expand  The same without the vote or the choice: always the grounded answer.
  route   One retrieval; if its best score is below ``route_threshold`` (the question is
          not about the documents) the fine-tuned model answers alone, else RAG answers.

Abstention is the RAG's: a question the documents are not about gets "I don't know".
Measured figures: bench/README.md (bench/knowledge.py's hybrid row).

Deliberately left out: loading models (``finetuned``, ``generation``) and the UI.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Iterator, Sequence

from .knowledge import Hit, rrf_fuse
from .text import token_f1
from .rag import ANSWERED, Answer, Evidence, RAGPipeline, support

STRATEGIES = ("verify", "expand", "route")
# HybridAnswer.route: the evidence's answer; the same, which the draft agreed with (or, with a vote, chose); the
# draft itself, backed by the evidence (generative mode); the fine-tuned model alone (strategy "route").
ROUTES = ("grounded", "draft+grounded", "draft", "finetuned")
DEFAULT_STRATEGY = "verify"
DRAFT_MAX_NEW_TOKENS = 48  # a draft only needs the key words; longer drafts dilute the query
ROUTE_THRESHOLD = 0.35  # cosine of MiniLM: below it, the best chunk is rarely about the question
VERIFY_MARGIN = 0.25  # the draft must beat the grounded answer's support by this much
VERIFY_MIN_SUPPORT = 0.6  # ...and have at least this share of its words in the evidence
VERIFY_EVIDENCE = 4  # evidence sentences a draft's words are checked against
# Extractive RAG: a span's bonus per unit of token F1 with the fine-tuned draft, for a model that knows the
# documents perfectly; scaled by the model's own measured knowledge (draft_trust). The bonus is added to the
# reader's scores, which are log-odds (a conditional logit): a bonus of 1 gives a span its draft matches e times the
# odds. Measured (bench/hybrid_vote.py, bench/README.md), F1 against RAG at vote 0 (the draft only widens
# retrieval) / 2.5 (the vote before), four SmolLM2-135M models, each at its latest measurement: +0.0 / -1.4 and
# +0.6 / -1.5 on qa_dev_squad2, +0.0 / +4.2 and +0.0 / -3.1 on qa_dev (the last with today's reader, which the
# draft's spans must now beat: drafts that match a span exactly pick F1 29.4 against the reader's 61.0). Vote 0 is
# better pooled over the 462 questions (+0.2 against -1.0) and in the worst case (0.0 against -3.1). Nothing the
# model says about itself told the good votes from the bad (`hybrid_vote.py --signals`: its closed-book span
# likelihoods, its confidence in the draft, the reader's own doubt), and the probe's knowledge F1 ranks the models
# wrongly (0.535 for the one that knows least). So the draft widens retrieval and does not vote, until a model is
# measured that picks spans better than the reader; a larger fine-tuned model in generative mode goes through
# _choose instead, which the vote does not touch.
DRAFT_VOTE = 0.0
UNMEASURED_TRUST = 0.25  # a model without a knowledge measurement (made elsewhere) gets a modest say


def draft_trust(chat) -> float:
    """How far to trust the fine-tuned model's drafts, 0..1: its best knowledge F1 on the held-out question
    families (``memchat_model_meta.json`` results; memchat.probe), else UNMEASURED_TRUST."""
    results = (getattr(chat, "meta", None) or {}).get("results") or {}
    scores = [p.get("knowledge_f1") for p in results.get("curve") or [] if isinstance(p, dict)]
    scores = [float(x) for x in scores if isinstance(x, (int, float))]
    return max(0.0, min(1.0, max(scores) / 100.0)) if scores else UNMEASURED_TRUST


@dataclass
class HybridAnswer(Answer):
    draft: str = ""  # the fine-tuned model's draft ("" when the strategy made none)
    route: str = ""  # what produced ``text``: one of ROUTES
    strategy: str = ""


def fuse(rankings: Sequence[Sequence[Hit]], k: int) -> list[Hit]:
    """Reciprocal rank fusion (``knowledge.rrf_fuse``) of several rankings of chunks; each kept with its best cosine."""
    best: dict[int, Hit] = {}
    for ranking in rankings:
        for hit in ranking:
            if hit.chunk_id not in best or hit.score > best[hit.chunk_id].score:
                best[hit.chunk_id] = hit
    return [best[cid] for cid in rrf_fuse([[h.chunk_id for h in r] for r in rankings], k)]


class HybridPipeline:
    """``rag`` (knowledge base + instruct model) and ``chat`` (a ``finetuned.ChatModel``)."""

    def __init__(self, rag: RAGPipeline, chat, *, strategy: str = DEFAULT_STRATEGY,
                 route_threshold: float = ROUTE_THRESHOLD, draft_max_new_tokens: int = DRAFT_MAX_NEW_TOKENS,
                 draft_vote: float = DRAFT_VOTE):
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, not {strategy!r}")
        self.rag = rag
        self.chat = chat
        self.strategy = strategy
        self.route_threshold = route_threshold
        self.draft_max_new_tokens = draft_max_new_tokens
        self.draft_vote = draft_vote

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
        """The question's chunks fused with those of the question + draft; every score is the cosine to the
        question alone, as in RAG. A draft is written in the documents' own words, so its cosine to their chunks
        is high even for a question they do not answer: it must not lift the abstention gate (rag.relevance)."""
        k = self.rag.cfg.top_k
        plain = self.rag.retrieve(question, k)
        if not draft.strip():
            return plain
        expanded = self.rag.retrieve(f"{question} {draft}", k)
        return self.rag.kb.rescored(question, fuse([plain, expanded], k))

    def _grounded(self, question: str, draft: str) -> tuple[list[Hit], list[Evidence], list[dict], dict]:
        t0 = time.perf_counter()
        hits = self.retrieve(question, draft)
        t1 = time.perf_counter()
        evidence = self.rag.select_evidence(question, hits)
        t2 = time.perf_counter()
        return hits, evidence, self.rag.build_messages(question, evidence), {"retrieve_s": t1 - t0, "evidence_s": t2 - t1}

    def _choose(self, question: str, grounded: str, draft: str, evidence: list[Evidence]) -> tuple[str, str]:
        if self.strategy == "verify" and draft.strip():
            sentences = [e.sentence for e in evidence[:VERIFY_EVIDENCE]]
            d, g = support(draft, question, sentences), support(grounded, question, sentences)
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
        """verify/expand: the draft widens retrieval; the RAG answer is made in the RAG's mode.

        Extractive (small models): the answer is still a span of the evidence; with ``verify`` and a
        ``draft_vote`` above 0 the draft votes among the candidate spans (draft_vote x trust x the
        span's token F1 with the draft), and a draft that misremembers cannot put words in the
        documents' mouth. Generative: the grounded answer is generated, and the evidence decides
        between it and the draft (``_choose``), then the RAG's verification applies to whichever
        was chosen.
        """
        t0 = time.perf_counter()
        if self.strategy == "route":
            out = self._route_many(questions, batch_size)
        else:
            mode = self.rag.resolved_mode()
            drafts = self.drafts(questions, batch_size)
            vote = self.draft_vote * draft_trust(self.chat)  # one model, one trust: read its meta once per batch
            out, todo, prompts = [], [], []
            for q, d in zip(questions, drafts):
                hits, ev, messages, timings = self._grounded(q, d)
                a = self.rag.start(q, hits, ev, timings, mode)
                h = HybridAnswer(**{f: getattr(a, f) for f in _ANSWER_FIELDS}, draft=d, route="grounded",
                                 strategy=self.strategy)
                if h.status == ANSWERED:
                    if mode == "extractive":
                        self.rag.extract(h, hint=d if self.strategy == "verify" else "",
                                         hint_weight=vote)
                        if self.strategy == "verify" and d.strip() and token_f1(h.text, [d]) > 0:
                            h.route = "draft+grounded"  # the draft agreed with the span (or, with a vote, chose it)
                    else:
                        todo.append(len(out))
                        prompts.append(messages)
                out.append(h)
            if prompts:
                results = self.rag.generator.generate(prompts, batch_size=batch_size, **self.rag.gen_kwargs())
                for i, r in zip(todo, results):
                    h = out[i]
                    chosen, h.route = self._choose(h.question, r.text, h.draft, h.evidence)
                    self.rag.verify(h, chosen)
                    h.model = self.display_name
        per = (time.perf_counter() - t0) / max(1, len(questions))
        for a in out:
            a.seconds = per
            a.model = a.model or self.display_name
        return out

    def _route_many(self, questions: Sequence[str], batch_size: int) -> list[HybridAnswer]:
        """One retrieval each: weak retrieval -> the fine-tuned model alone (no citations claimed), else RAG."""
        first = [self.rag.retrieve(q, 1) for q in questions]
        to_chat = [i for i, hits in enumerate(first) if not hits or hits[0].score < self.route_threshold]
        chat_set = set(to_chat)
        to_rag = [i for i in range(len(questions)) if i not in chat_set]
        out: list[HybridAnswer | None] = [None] * len(questions)
        chat_answers = self.chat.answer_many([questions[i] for i in to_chat], batch_size=batch_size,
                                             max_new_tokens=self.rag.gen_cfg.max_new_tokens)  # the same cap as RAG's
        for i, text in zip(to_chat, chat_answers):
            out[i] = HybridAnswer(questions[i], text.strip(), [], [], self.chat.display_name, 0.0, {},
                                  route="finetuned", strategy="route")
        for i, a in zip(to_rag, self.rag.answer_many([questions[i] for i in to_rag], batch_size=batch_size)):
            out[i] = HybridAnswer(**{f: getattr(a, f) for f in _ANSWER_FIELDS}, route="grounded", strategy="route")
        return out

    def stream(self, question: str) -> tuple[Iterator[str], HybridAnswer]:
        """Pieces of the answer; the returned ``HybridAnswer`` is complete once they are exhausted.

        ``expand`` with a generative RAG streams the grounded answer token by token (it is
        verified at the end: if unsupported, ``text`` differs from the pieces). Every other
        combination must see the whole answer before choosing, so it comes in one piece.
        """
        t0 = time.perf_counter()
        result = HybridAnswer(question, "", [], [], self.display_name, 0.0, {}, strategy=self.strategy)

        def pieces() -> Iterator[str]:
            if self.strategy != "expand" or self.rag.resolved_mode() == "extractive":
                answer = self.answer(question)
                for name in _ANSWER_FIELDS + ("draft", "route"):
                    setattr(result, name, getattr(answer, name))
                result.seconds = time.perf_counter() - t0
                yield answer.text
                return
            result.draft = self.drafts([question], 1)[0]
            hits, evidence, messages, timings = self._grounded(question, result.draft)
            a = self.rag.start(question, hits, evidence, timings, "generative")
            for name in _ANSWER_FIELDS:
                setattr(result, name, getattr(a, name))
            result.route = "grounded"
            if result.status != ANSWERED:
                yield result.text
                return
            buf = []
            for piece in self.rag.generator.stream(messages, **self.rag.gen_kwargs()):
                buf.append(piece)
                yield piece
            self.rag.verify(result, "".join(buf))
            result.model = self.display_name
            result.seconds = time.perf_counter() - t0

        return pieces(), result


_ANSWER_FIELDS = tuple(f.name for f in dataclasses.fields(Answer))
