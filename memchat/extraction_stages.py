"""The per-group generation stages of the extraction: questions -> retry -> answers -> paraphrases.

For a group of chunks, each stage is ONE batched ``generate`` call over all its prompts;
between stages the results are parsed, grounded and filtered (``memchat.qa``) with the
chunk's sentences embedded once. ``process_group`` returns each chunk's working state,
whose ``result()`` is what the progress file stores.

The answer stage generates only when the model writes the answers (``ExtractConfig.answer_writer``):
with "sentence" each answer is the chunk sentence that best answers the question (the repair a
failed written answer gets), with "reader" the span the extractive reader (``reader.ExtractiveReader``,
what RAG's extractive mode answers with) picks from the chunk's best sentences. For small models,
whose written answers fail grounding, the extractor asks for sentences and leaves out the
paraphrase stage too (``ExtractConfig.paraphrase_writer``).

Deliberately left out: which chunks to generate, files and resume (``memchat.extraction``),
and the counts across chunks (``memchat.extraction_stats``).
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from . import qa
from .config import ExtractConfig


@dataclass
class Work:
    chunk: dict
    sentences: list[str]
    sentence_vecs: np.ndarray  # (n_sentences, dim)
    words: set[str]
    questions: list[dict] = field(default_factory=list)  # {"question", "origin", "vec", ...}
    q_tally: qa.Tally = field(default_factory=qa.Tally)  # question parsing and filtering
    a_tally: qa.Tally = field(default_factory=qa.Tally)  # answer parsing and grounding
    v_tally: qa.Tally = field(default_factory=qa.Tally)  # paraphrases
    counts: Counter = field(default_factory=Counter)
    tokens: Counter = field(default_factory=Counter)  # new / prompt tokens, prompts
    candidates: list = field(default_factory=list)  # (question, origin, source sentence) awaiting the filters

    def result(self) -> dict:
        return {
            "questions": [
                {k: q[k] for k in ("question", "answer", "answer_source", "origin", "variations")} for q in self.questions
            ],
            "counts": dict(self.counts),
            "questions_tally": self.q_tally.as_dict(),
            "answers_tally": self.a_tally.as_dict(),
            "variations_tally": self.v_tally.as_dict(),
            "tokens": dict(self.tokens),
        }


def _count_tokens(w: Work, r) -> None:
    w.tokens["new"] += r.new_tokens
    w.tokens["prompt"] += r.prompt_tokens
    w.tokens["prompts"] += 1



class GroupStages:
    """The stages of one group; ``generate(prompts, max_new_tokens, stop)`` is the extractor's batched call."""

    def __init__(self, cfg: ExtractConfig, embedder, generate: Callable, note: Callable = lambda bar, text: None, *,
                 answer_writer: str = "model", reader=None, idf: Callable[[str], float] | None = None,
                 reader_sentences: int = 3, model_paraphrases: bool = True):
        self.cfg = cfg
        self.embedder = embedder
        self.generate = self._timed(generate)
        self.note = note  # (progress bar, what the group is doing) -> None
        if answer_writer not in ("model", "sentence", "reader") or (answer_writer == "reader") != (reader is not None):
            raise ValueError(f"answer_writer {answer_writer!r} (a reader is given exactly for 'reader')")
        self.answer_writer = answer_writer  # "model" (generated, then grounded), "sentence" or "reader"
        self.reader = reader
        self.idf = idf or (lambda word: 1.0)
        self.reader_sentences = reader_sentences
        self.model_paraphrases = model_paraphrases  # False: no paraphrase stage (the assembly's framings fill in)
        self.seconds: Counter = Counter()  # stage -> seconds, summed over groups (the run's stats)
        self._stage = ""

    def _timed(self, generate: Callable) -> Callable:
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return generate(*args, **kwargs)
            finally:
                self.seconds[self._stage] += time.perf_counter() - start
        return timed

    def process_group(self, group: list[dict], bar=None) -> tuple[list[Work], int]:
        """Questions -> retry -> answers -> paraphrases for a group of chunks; one generate call per stage."""
        from .chunking import split_sentences

        cfg = self.cfg
        n = cfg.max_pairs_per_chunk
        emb = self.embedder
        calls = 0

        def stage(text: str) -> None:
            self._stage = text.split()[0]  # questions, retrying, answering / picking / reading, paraphrasing
            if bar is not None:
                self.note(bar, text)

        # Sentences of every chunk, embedded once: evidence, retries and the extractive repair use them.
        sentence_lists = [[s for s in (" ".join(x.split()) for x in split_sentences(c["text"])) if s] for c in group]
        flat = [s for ss in sentence_lists for s in ss]
        vecs = emb.encode(flat) if flat else np.zeros((0, 1), np.float32)
        works, pos = [], 0
        for c, ss in zip(group, sentence_lists):
            works.append(Work(c, ss, vecs[pos : pos + len(ss)], qa.content_words(c["text"])))
            pos += len(ss)

        # 1. questions
        stage(f"questions for {len(group)} chunks")
        results = self.generate([qa.question_prompt(w.chunk["text"], n) for w in works], qa.question_tokens(n),
                                 stop=qa.LIST_STOP)
        calls += 1
        for w, r in zip(works, results):
            _count_tokens(w, r)
            parsed = qa.parse_questions(r.text, truncated=r.finish_reason == "length")
            w.q_tally.update(parsed.tally)
            w.counts["questions_generated"] += len(parsed.items)
            w.candidates = [(q, "chunk", None) for q in parsed.items]
        self._accept_questions(works, n)

        # 2. one stricter retry for chunks that came up short: one question per unused sentence
        retry_prompts, retry_owner = [], []
        for w in works:
            missing = n - len(w.questions)
            if missing <= 0:
                continue
            for s in self._retry_sentences(w, missing + cfg.retry_spare_sentences):
                retry_prompts.append(qa.strict_question_prompt(s))
                retry_owner.append((w, s))
            w.counts["retried"] += 1
        for w in works:
            w.candidates = []
        if retry_prompts:
            stage(f"retrying {len(retry_prompts)} questions")
            results = self.generate(retry_prompts, 48)
            calls += 1
            for (w, s), r in zip(retry_owner, results):
                _count_tokens(w, r)
                w.counts["retry_prompts"] += 1
                parsed = qa.parse_questions(r.text, truncated=r.finish_reason == "length", limit=1)
                w.q_tally.update(parsed.tally)
                w.counts["questions_generated"] += len(parsed.items)
                w.candidates += [(q, "retry", s) for q in parsed.items]
            before = {id(w): len(w.questions) for w in works}
            self._accept_questions(works, n)
            for w in works:
                w.counts["retry_kept"] += len(w.questions) - before[id(w)]

        # 3. answers, from each question's best sentences
        asks = [(w, q) for w in works for q in w.questions]
        if asks and self.answer_writer != "model":
            stage(f"{'reading' if self.reader is not None else 'picking'} {len(asks)} answers")
            start = time.perf_counter()
            self._extract_answers(asks)
            self.seconds[self._stage] += time.perf_counter() - start
        elif asks:
            stage(f"answering {len(asks)} questions")
            prompts = [qa.answer_prompt(q["question"], self._evidence(w, q)) for w, q in asks]
            results = self.generate(prompts, cfg.answer_max_new_tokens, stop=qa.ANSWER_STOP)
            calls += 1
            for (w, q), r in zip(asks, results):
                _count_tokens(w, r)
            self._check_answers(asks, [r for r in results], [r.finish_reason == "length" for r in results])

        # 4. paraphrases that share the answer
        for w in works:
            for q in w.questions:
                q["variations"] = []
        if cfg.augment and self.model_paraphrases:
            asks = [(w, q) for w in works for q in w.questions]
            if asks:
                v = cfg.variations_per_question
                stage(f"paraphrasing {len(asks)} questions")
                results = self.generate([qa.variation_prompt(q["question"], v) for _, q in asks], qa.variation_tokens(v),
                                         stop=qa.LIST_STOP)
                calls += 1
                for (w, q), r in zip(asks, results):
                    _count_tokens(w, r)
                    parsed = qa.parse_variations(r.text, q["question"], v + 2, truncated=r.finish_reason == "length")
                    w.v_tally.update(parsed.tally)
                    w.counts["variations_generated"] += len(parsed.items)
                    q["variation_candidates"] = parsed.items
                self._filter_variations(asks, v)
        for w in works:
            w.counts["questions_kept"] = len(w.questions)
            w.counts["variations_kept"] = sum(len(q["variations"]) for q in w.questions)
        return works, calls

    def _accept_questions(self, works: list[Work], n: int) -> None:
        """Filter each chunk's candidate questions; near-duplicates (within the chunk) dropped."""
        cfg = self.cfg
        texts = [q for w in works for q, _, _ in w.candidates]
        vecs = self.embedder.encode(texts) if texts else None
        pos = 0
        for w in works:
            for q, origin, sentence in w.candidates:
                vec = vecs[pos]
                pos += 1
                reason = None
                if qa.share_in(q, w.words) < cfg.min_question_support:
                    reason = "not_in_chunk"
                elif any(float(vec @ k["vec"]) >= cfg.near_duplicate_threshold for k in w.questions):
                    reason = "near_duplicate"
                elif len(w.questions) >= n:
                    reason = "over_limit"
                if reason:
                    w.q_tally.dropped[reason] += 1
                    continue
                w.questions.append({"question": q, "origin": origin, "sentence": sentence, "vec": vec})

    def _retry_sentences(self, w: Work, missing: int) -> list[str]:
        """The chunk's informative sentences no kept question is about yet, best first."""
        covered: set[int] = set()
        for q in w.questions:
            if len(w.sentences):
                covered.add(int(np.argmax(w.sentence_vecs @ q["vec"])))
        candidates = [
            (len(qa.content_words(s)), i) for i, s in enumerate(w.sentences)
            if i not in covered and qa.word_count(s) >= 6 and not s.rstrip().endswith("?")
        ]
        candidates.sort(key=lambda t: (-t[0], t[1]))
        return [w.sentences[i] for _, i in candidates[:missing]]

    def _evidence(self, w: Work, q: dict) -> str:
        """The sentences of the chunk most related to the question, in document order."""
        if not w.sentences:
            return w.chunk["text"][: self.cfg.evidence_chars]
        qwords = qa.content_words(q["question"])
        scores = [
            float(w.sentence_vecs[i] @ q["vec"]) + 0.25 * len(qwords & qa.content_words(s)) / max(1, len(qwords))
            for i, s in enumerate(w.sentences)
        ]
        chosen: list[int] = []
        used = 0
        for i in sorted(range(len(w.sentences)), key=lambda i: -scores[i]):
            if chosen and used + len(w.sentences[i]) > self.cfg.evidence_chars:
                continue
            chosen.append(i)
            used += len(w.sentences[i])
        return " ".join(w.sentences[i] for i in sorted(chosen))

    def _extract_answers(self, asks: list[tuple[Work, dict]]) -> None:
        """Answers copied from the chunk, nothing generated: the reader's span from the chunk's best sentences
        (ranked by RAG's ``evidence_score``), or with no reader (or no span) the best-sentence repair."""
        from .rag import MIN_EVIDENCE_CHARS, evidence_score

        keep: dict[int, list[dict]] = {}
        for w, q in asks:
            answer = ""
            if self.reader is not None and len(w.sentences):
                scores = w.sentence_vecs @ q["vec"]
                ranked = sorted(
                    ((evidence_score(c, q["question"], s, self.idf), i)
                     for i, (s, c) in enumerate(zip(w.sentences, scores)) if len(s) >= MIN_EVIDENCE_CHARS),
                    reverse=True)[: self.reader_sentences]
                if ranked:
                    reading = self.reader.read(q["question"], [w.sentences[i] for _, i in ranked],
                                               [sc for sc, _ in ranked])
                    answer = reading.answer
            if answer:
                q["answer"], q["answer_source"] = answer, "reader"
                w.counts["answers_reader"] += 1
            elif not self._repair(w, q):
                continue
            keep.setdefault(id(w), []).append(q)
        for w in {id(w): w for w, _ in asks}.values():
            w.questions = keep.get(id(w), [])

    def _repair(self, w: Work, q: dict) -> bool:
        """The extractive repair: the chunk sentence that best answers ``q`` (False: none short enough)."""
        best = qa.best_sentence(qa.content_words(q["question"]), w.sentences, q["vec"], w.sentence_vecs)
        if best is None or qa.word_count(w.sentences[best[0]]) > qa.MAX_ANSWER_WORDS:
            w.q_tally.dropped["not_answerable"] += 1
            return False
        q["answer"], q["answer_source"] = w.sentences[best[0]], "extractive"
        w.counts["answers_extractive"] += 1
        return True

    def _check_answers(self, asks: list[tuple[Work, dict]], results, truncated: list[bool]) -> None:
        """Parse and ground each answer; a failed one is repaired with the best chunk sentence."""
        cfg = self.cfg
        parsed = []
        for (w, q), r, cut in zip(asks, results, truncated):
            answer, tally = qa.parse_answer(r.text, q["question"], truncated=cut)
            w.a_tally.update(tally)
            parsed.append(answer)
        texts = [a for a in parsed if a]
        vecs = self.embedder.encode(texts) if texts else None
        pos = 0
        keep: dict[int, list[dict]] = {}
        for (w, q), answer in zip(asks, parsed):
            reason = None
            if answer is None:
                reason = "unusable"  # the parse tally holds the cause (empty, refused, truncated, ...)
            else:
                vec = vecs[pos]
                pos += 1
                grounded, reason, trimmed = qa.ground_answer(answer, q["question"], w.words, cfg.min_answer_support)
                if reason is None and len(w.sentences) and float(np.max(w.sentence_vecs @ vec)) < cfg.min_answer_cosine:
                    reason = "off_topic"
                if reason is None:
                    answer = grounded
                    if trimmed:
                        w.a_tally.repaired["ungrounded_sentences_cut"] += 1
            if reason is None:
                q["answer"], q["answer_source"] = answer, "model"
                w.counts["answers_model"] += 1
            else:
                if reason != "unusable":  # unusable ones are already counted by cause in the parse tally
                    w.a_tally.dropped[reason] += 1
                if not self._repair(w, q):
                    continue
            keep.setdefault(id(w), []).append(q)
        for w in {id(w): w for w, _ in asks}.values():
            w.questions = keep.get(id(w), [])

    def _filter_variations(self, asks: list[tuple[Work, dict]], limit: int) -> None:
        """Drop paraphrases too close to their source or a sibling, or too far from the source; keep ``limit``."""
        thr = self.cfg.variation_duplicate_threshold
        texts = [v for _, q in asks for v in q["variation_candidates"]]
        vecs = self.embedder.encode(texts) if texts else None
        pos = 0
        for w, q in asks:
            kept_vecs = [q["vec"]]
            for v in q.pop("variation_candidates"):
                vec = vecs[pos]
                pos += 1
                if any(float(vec @ k) >= thr for k in kept_vecs):
                    w.v_tally.dropped["near_duplicate"] += 1
                elif float(vec @ q["vec"]) < self.cfg.min_variation_cosine:
                    w.v_tally.dropped["meaning_changed"] += 1
                elif len(q["variations"]) >= limit:
                    w.v_tally.dropped["over_limit"] += 1
                else:
                    q["variations"].append(v)
                    kept_vecs.append(vec)
