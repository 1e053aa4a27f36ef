"""Retrieve -> select evidence -> answer (extractive or generative) or abstain, with citations (file, page).

Three answer modes (``config.RAGConfig.mode``, ``MEMCHAT_ANSWER_MODE``, ``main.py ask --mode``):

  extractive  The answer is a span copied from the best evidence sentences
              (``reader.ExtractiveReader``), so it can never state what the documents
              do not say; it cites the page of the sentence it came from. The model only
              scores the best few candidate spans (it writes nothing); the default for
              small models. The reader's rules are English ones: from evidence in another
              language the answer is the best evidence sentence, copied whole.
  generative  An instruct model writes the answer from the evidence sentences; the
              answer is then *verified*: the words it adds beyond the question must be
              found in the evidence (``verify``), else it is not shown as fact ("the
              documents don't answer this clearly") and the closest passage is shown.
  auto        (default) extractive for the bundled or small models (< 1B parameters),
              generative + verification for larger ones (Qwen2.5-1.5B and up) and for an
              external engine.

In every mode the pipeline first asks whether the documents are about the question
at all (``relevance``): ``coverage``, the share of the question's idf-weighted content
words that the best evidence passage contains, plus the top chunk's cosine to the
question. The two fail apart: an unrelated question may share a rare word with some
passage, or sit near a chunk in embedding space, but seldom both. Below
``min_relevance`` the answer is "I don't know", with the best passage shown.

Retrieval is hybrid (BM25 + dense, reciprocal rank fusion; ``knowledge``). The
evidence sentences are ranked by the same embedding model plus idf-weighted word
overlap and the chunk's own score; the best sentence and its neighbours form the
passage shown under the answer.

Deliberately left out: how models load (``generation``/``models``) and the store (``knowledge``).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import numpy as np

from . import text as T
from .config import ANSWER_MODES, GenerationConfig, RAGConfig, ReaderConfig
from .knowledge import Hit, KnowledgeBase

log = logging.getLogger(__name__)

SYSTEM_PROMPT = (
    "You are a careful assistant. Answer the question using only the numbered context. "
    "Reply with a short, direct answer (a few words or one sentence). "
    "If the context does not contain the answer, say: I don't know."
)

ANSWERED, UNSUPPORTED, NO_ANSWER, NO_DOCUMENTS = "answered", "unsupported", "no_answer", "no_documents"
PHRASE, SENTENCE = "phrase", "sentence"  # what an extractive answer copied (Answer.picked)
IDK_TEXT = "I don't know: the documents don't seem to answer this."
UNSUPPORTED_TEXT = "The documents don't answer this clearly."
_NO_CONTEXT = "The knowledge base has no documents yet. Add PDFs first."
SENTENCE_CACHE_CHUNKS = 4096  # chunks whose sentence vectors are kept (~4096 x 8 x 384 floats = 50 MB at most)


@dataclass
class Evidence:
    sentence: str
    score: float
    hit: Hit
    position: int = 0  # index of the sentence in its chunk (for neighbouring windows)

    @property
    def citation(self) -> str:
        return self.hit.citation


@dataclass
class Answer:
    question: str
    text: str  # the answer alone (a span, a generated answer, or the abstention line)
    hits: list[Hit]
    evidence: list[Evidence]
    model: str = ""
    seconds: float = 0.0
    timings: dict = field(default_factory=dict)
    mode: str = ""  # "extractive" | "generative" (the mode that produced it)
    status: str = ANSWERED  # ANSWERED | UNSUPPORTED (generative, failed verification) | NO_ANSWER | NO_DOCUMENTS
    confidence: float = 0.0  # extractive: the span's share of the reader's probability; generative: support
    coverage: float = 0.0  # idf-weighted share of the question's words in the best passage
    relevance: float = 0.0  # coverage + the top chunk's cosine to the question (``relevance``): the abstention gate
    passage: str = ""  # the best sentence with its neighbours: shown as the closest passage
    generated: str = ""  # generative: the model's text before verification (kept for inspection)
    source: Evidence | None = None  # the evidence sentence the answer came from
    picked: str = ""  # extractive: PHRASE (the reader's span) or SENTENCE (the best sentence: evidence not English)

    @property
    def abstained(self) -> bool:
        return self.status in (UNSUPPORTED, NO_ANSWER, NO_DOCUMENTS)

    @property
    def citations(self) -> list[str]:
        seen: dict[str, None] = {}
        if self.source is not None:
            seen.setdefault(self.source.citation, None)
        for e in self.evidence or []:
            seen.setdefault(e.citation, None)
        for h in self.hits:
            seen.setdefault(h.citation, None)
        return list(seen)

    @property
    def note(self) -> str:
        """What an extractive answer is, for the line under it ("" for any other answer)."""
        if self.mode != "extractive" or self.status != ANSWERED:
            return ""
        if self.picked == SENTENCE:
            return "Copied from the document: the best-matching sentence; phrases are picked from English text only"
        return f"Copied from the document; the reader's confidence in this phrase: {self.confidence:.0%}"

    @property
    def evidence_line(self) -> str:
        best = self.source or (self.evidence[0] if self.evidence else None)
        if best is None:
            return ""
        label = "Closest passage" if self.abstained else "Evidence"
        return f'{label}: "{self.passage or best.sentence}" ({best.citation})'

    def render(self) -> str:
        """Answer + evidence + sources, as the CLI prints it."""
        parts = [self.text.strip()]
        if self.evidence_line:
            parts.append(self.evidence_line)
        if self.hits:
            parts.append("Sources: " + "; ".join(self.citations))
        return "\n\n".join(parts)


def _chunk_sentences(text: str) -> list[str]:
    """A chunk's sentences, white space collapsed: the units evidence is chosen from and passages are built of."""
    from .chunking import split_sentences

    return [" ".join(s.split()) for s in split_sentences(text)]


def coverage(question: str, passage: str, idf) -> float:
    """Share of the question's content words (weighted by idf) that ``passage`` contains, 0..1."""
    qwords = T.content_words(question)
    total = sum(idf(w) for w in qwords)
    if total <= 0:
        return 0.0
    return sum(idf(w) for w in qwords & T.content_words(passage)) / total


MIN_EVIDENCE_CHARS = 12  # shorter "sentences" are headings, labels and page furniture


def relevance(question: str, hits: Sequence[Hit], evidence: Sequence[Evidence], idf, passage) -> tuple[float, float]:
    """(coverage, relevance): are the documents about the question at all?

    ``coverage`` is the best of the top 3 evidence passages (``passage(e)``: a sentence and its neighbours);
    ``relevance`` adds the top chunk's cosine to the question. Lexical overlap and embedding similarity are two
    views of "about the question" that fail apart, so their sum separates answerable from unrelated questions
    better than either (bench/rag_quality.py and ``RAGConfig.min_relevance``).
    """
    cov = max((coverage(question, passage(e), idf) for e in evidence[:3]), default=0.0)
    return cov, cov + (float(hits[0].score) if hits else 0.0)


def evidence_score(cos: float, question: str, sentence: str, idf, chunk_score: float = 0.0) -> float:
    """How good a sentence is as evidence: its similarity to the question dominates; rare shared words and the
    chunk's retrieval score break ties. The extractor ranks one chunk's sentences with it (no chunk score)."""
    return float(cos) + 0.3 * chunk_score + 0.5 * coverage(question, sentence, idf)


def support(answer: str, question: str, evidence: Sequence[str]) -> float:
    """Share of the content words ``answer`` adds beyond the question that the evidence contains (0 if none added)."""
    added = T.content_words(answer) - T.content_words(question)
    if not added:
        return 0.0  # an answer that only repeats the question says nothing the evidence could back
    found: set[str] = set()
    for s in evidence:
        found |= T.content_words(s)
    return len(added & found) / len(added)


def model_parameters(generator) -> float | None:
    """Parameter count of an in-process generator's model; None for an external engine."""
    model = getattr(generator, "model", None)
    if model is None or not hasattr(model, "parameters"):
        return None
    return float(sum(p.numel() for p in model.parameters()))


def build_reader(generator, idf, cfg: ReaderConfig):
    """The extractive reader RAG answers with (and the extractor, with ``answer_writer="reader"``). An in-process
    model scores the spans; an external engine (no local weights) leaves the reader LM-free."""
    from .reader import ExtractiveReader, SpanScorer

    scorer = SpanScorer(generator) if cfg.lm_rerank and model_parameters(generator) else None
    return ExtractiveReader(cfg.weights, idf=idf, scorer=scorer, lm_rerank=cfg.lm_rerank)


class RAGPipeline:
    def __init__(
        self,
        kb: KnowledgeBase,
        generator=None,
        *,
        rag: RAGConfig | None = None,
        generation: GenerationConfig | None = None,
        reader: ReaderConfig | None = None,
        mode: str | None = None,
    ):
        self.kb = kb
        self.cfg = rag or RAGConfig()
        self.gen_cfg = generation or GenerationConfig()
        self.reader_cfg = reader or ReaderConfig()
        self._generator = generator
        self._reader = None
        self._sentence_cache: dict[int, tuple[str, list[str], np.ndarray]] = {}  # chunk id -> (text, sentences, vecs)
        self.mode = mode or self.cfg.mode
        if self.mode not in ANSWER_MODES:
            raise ValueError(f"mode must be one of {ANSWER_MODES}, not {self.mode!r}")

    @property
    def generator(self):
        if self._generator is None:
            from .generation import Generator

            self._generator = Generator(self.gen_cfg.model_name)
        return self._generator

    def resolved_mode(self, mode: str | None = None) -> str:
        """"extractive" or "generative" for ``mode`` (default: the pipeline's), resolving "auto".

        auto: a bundled fallback is small by definition (decided without loading it);
        otherwise the loaded model's size decides, and an external engine counts as large.
        """
        mode = mode or self.mode
        if mode != "auto":
            return mode
        if self._generator is None:
            from .models import resolve_model

            if resolve_model(self.gen_cfg.model_name).source == "bundled":
                return "extractive"
        params = model_parameters(self.generator)
        return "generative" if params is None or params >= self.cfg.auto_generative_params else "extractive"

    @property
    def reader(self):
        if self._reader is None:
            self._reader = build_reader(self.generator, self.kb.idf, self.reader_cfg)
        return self._reader

    # -- retrieval -----------------------------------------------------------
    def retrieve(self, question: str, k: int | None = None) -> list[Hit]:
        return self.kb.search(question, k or self.cfg.top_k, method=self.cfg.retrieval)

    def select_evidence(self, question: str, hits: list[Hit]) -> list[Evidence]:
        """Sentences of the retrieved chunks, best first: embedding similarity, idf-weighted overlap, chunk score."""
        cands: list[Evidence] = []
        vecs: list[np.ndarray] = []
        seen: set[str] = set()
        for h in hits:
            sentences, sentence_vecs = self._sentences(h)
            for pos, (s, v) in enumerate(zip(sentences, sentence_vecs)):
                if len(s) < MIN_EVIDENCE_CHARS or s in seen:
                    continue
                seen.add(s)
                cands.append(Evidence(s, 0.0, h, pos))
                vecs.append(v)
        if not cands:
            return []
        qv = np.asarray(self.kb.embedder().encode_query(question)).reshape(-1)
        cos = np.vstack(vecs) @ qv
        for e, c in zip(cands, cos):
            e.score = evidence_score(c, question, e.sentence, self.kb.idf, e.hit.score)
        order = np.argsort([-e.score for e in cands], kind="stable")
        return [cands[i] for i in order]

    def _sentences(self, hit: Hit) -> tuple[list[str], np.ndarray]:
        """A chunk's sentences and their vectors, embedded once per chunk (chunk ids are never reused)."""
        cached = self._sentence_cache.get(hit.chunk_id)
        if cached is None or cached[0] != hit.text:
            sentences = _chunk_sentences(hit.text)
            vecs = self.kb.embedder().encode(sentences) if sentences else np.zeros((0, 1), dtype=np.float32)
            if len(self._sentence_cache) >= SENTENCE_CACHE_CHUNKS:
                self._sentence_cache.pop(next(iter(self._sentence_cache)))  # oldest first
            cached = self._sentence_cache[hit.chunk_id] = (hit.text, sentences, vecs)
        return cached[1], cached[2]

    def passage(self, ev: Evidence) -> str:
        """The evidence sentence with its neighbours in its chunk (the window a reader checks)."""
        cached = self._sentence_cache.get(ev.hit.chunk_id)
        sents = cached[1] if cached is not None and cached[0] == ev.hit.text else _chunk_sentences(ev.hit.text)
        if ev.position >= len(sents) or sents[ev.position] != ev.sentence:
            return ev.sentence
        return " ".join(sents[max(0, ev.position - 1) : ev.position + 2])

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

    def gen_kwargs(self) -> dict:
        g = self.gen_cfg
        return dict(
            max_new_tokens=g.max_new_tokens, temperature=g.temperature, top_p=g.top_p, repetition_penalty=g.repetition_penalty
        )

    _gen_kwargs = gen_kwargs  # the name callers used before it was public

    # -- the steps -----------------------------------------------------------
    def prepare(self, question: str) -> tuple[list[Hit], list[Evidence], list[dict], dict]:
        if not question.strip():
            raise ValueError("The question is empty.")  # callers check user input first (main.py ask, serve, apps)
        t0 = time.perf_counter()
        hits = self.retrieve(question)
        t1 = time.perf_counter()
        evidence = self.select_evidence(question, hits)
        t2 = time.perf_counter()
        return hits, evidence, self.build_messages(question, evidence), {"retrieve_s": t1 - t0, "evidence_s": t2 - t1}

    def start(self, question: str, hits: list[Hit], evidence: list[Evidence], timings: dict, mode: str) -> Answer:
        """The answer so far: abstains when there are no documents or the passage is not about the question."""
        a = Answer(question, "", hits, evidence, timings=timings, mode=mode)
        if not hits:
            a.status, a.text = NO_DOCUMENTS, _NO_CONTEXT
            return a
        if evidence:
            a.passage = self.passage(evidence[0])
            a.coverage, a.relevance = relevance(question, hits, evidence, self.kb.idf, self.passage)
        if not evidence or a.relevance < self.cfg.min_relevance:
            a.status, a.text = NO_ANSWER, IDK_TEXT
        return a

    def extract(self, a: Answer, hint: str = "", hint_weight: float = 0.0) -> Answer:
        """Fill ``a`` with the reader's span from its evidence (``hint``: see ``ExtractiveReader.read``)."""
        t0 = time.perf_counter()
        ev = a.evidence[: self.cfg.reader_sentences]
        rc = self.reader_cfg
        if ev and not T.reads_as_english(" ".join(e.sentence for e in ev), rc.min_english_share, rc.min_language_words):
            a.text, a.source, a.picked, a.confidence = ev[0].sentence, ev[0], SENTENCE, 0.0
            a.passage = self.passage(ev[0])
            a.model = "best evidence sentence (not English text: the reader picks phrases in English only)"
            a.timings["read_s"] = time.perf_counter() - t0
            return a
        reading = self.reader.read(a.question, [e.sentence for e in ev], [e.score for e in ev], hint=hint,
                                   hint_weight=hint_weight)
        a.timings["read_s"] = time.perf_counter() - t0
        if not reading.answer:
            a.status, a.text = NO_ANSWER, IDK_TEXT
            return a
        a.text, a.confidence, a.picked = reading.answer, reading.confidence, PHRASE
        a.source = ev[reading.sentence_index]
        a.passage = self.passage(a.source)
        if reading.confidence < self.cfg.min_confidence:
            a.generated, a.text, a.status = reading.answer, UNSUPPORTED_TEXT, UNSUPPORTED
        a.model = "extractive reader"
        return a

    def verify(self, a: Answer, text: str) -> Answer:
        """Show a generated ``text`` as the answer only if the evidence supports it."""
        a.generated = text.strip()
        sentences = [e.sentence for e in a.evidence[: self.cfg.evidence_sentences]]
        a.confidence = support(a.generated, a.question, sentences)
        unchecked = self.cfg.min_support <= 0  # verification off: the text is shown as written
        if unchecked or (a.confidence >= self.cfg.min_support and "i don't know" not in a.generated.lower()):
            a.text, a.status = a.generated, ANSWERED
            added = T.content_words(a.generated) - T.content_words(a.question)
            a.source = max(a.evidence[: self.cfg.evidence_sentences],
                           key=lambda e: len(added & T.content_words(e.sentence)), default=None)
            if a.source is not None:
                a.passage = self.passage(a.source)
        else:
            a.text, a.status = UNSUPPORTED_TEXT, UNSUPPORTED
        return a

    # -- answering -----------------------------------------------------------
    def answer(self, question: str, mode: str | None = None) -> Answer:
        return self.answer_many([question], batch_size=1, mode=mode)[0]

    def answer_many(self, questions: Sequence[str], batch_size: int = 8, mode: str | None = None) -> list[Answer]:
        """Answers in input order; generative ones batched (one generate call per batch)."""
        mode = self.resolved_mode(mode)
        t0 = time.perf_counter()
        out: list[Answer] = []
        prompts: list[tuple[int, list[dict]]] = []
        for q in questions:
            hits, evidence, messages, timings = self.prepare(q)
            a = self.start(q, hits, evidence, timings, mode)
            if a.status == ANSWERED:
                if mode == "extractive":
                    self.extract(a)
                else:
                    prompts.append((len(out), messages))
            out.append(a)
        if prompts:
            texts = self.generator.generate([m for _, m in prompts], batch_size=batch_size, **self.gen_kwargs())
            for (i, _), r in zip(prompts, texts):
                self.verify(out[i], r.text)
                out[i].model = self.generator.resolved.display_name
        per = (time.perf_counter() - t0) / max(1, len(questions))
        for a in out:
            a.seconds = per
        return out

    def stream(self, question: str, mode: str | None = None) -> tuple[Iterator[str], Answer]:
        """Pieces of the answer as they are made; the ``Answer`` is complete once they are exhausted.

        Extractive and abstaining answers come in one piece. Generative ones stream
        token by token as a draft; if verification then fails, ``Answer.text`` (and
        ``status``) differ from the joined pieces and the caller must show ``text``.
        """
        t0 = time.perf_counter()
        mode = self.resolved_mode(mode)
        hits, evidence, messages, timings = self.prepare(question)
        result = self.start(question, hits, evidence, timings, mode)

        def pieces() -> Iterator[str]:
            if result.status == ANSWERED and mode == "extractive":
                self.extract(result)
            elif result.status == ANSWERED:
                result.model = self.generator.resolved.display_name
                buf = []
                for piece in self.generator.stream(messages, **self.gen_kwargs()):
                    buf.append(piece)
                    yield piece
                self.verify(result, "".join(buf))
                result.seconds = time.perf_counter() - t0
                return
            result.seconds = time.perf_counter() - t0
            yield result.text

        return pieces(), result
