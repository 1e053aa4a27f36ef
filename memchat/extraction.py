"""``FAISSDataExtractor``: the encrypted knowledge base -> ``training_data/`` (records + stats).

One run:

  1. read the store through ``KnowledgeBase`` (same key rules and errors as the app);
  2. load the progress file ``training_data/extract_progress.jsonl``: one line per
     finished chunk, keyed by the chunk's content hash and a fingerprint of every
     setting that changes what the model is asked (model, prompts, pairs, ...);
  3. the chunks with no result yet (new, changed, or never reached) are processed in
     groups of ``batch_size`` chunks. Each stage of a group is ONE batched
     ``generate`` call over all its prompts: questions -> (a stricter retry for
     chunks that came up short) -> answers -> paraphrases. After each group its
     results are appended to the progress file and fsynced, so a killed run loses
     at most one group, and a resumed run forms the same groups from the same
     remaining chunks: with greedy decoding it writes the same records;
  4. assemble: records for every current chunk, near-duplicate questions across
     chunks dropped, the split by chunk hash, then the dataset and the stats are
     written atomically. Progress lines of chunks no longer in the store are
     pruned: a removed document's questions do not linger in ``training_data/``.

The per-chunk logic (prompts, parsing, repair, grounding) is ``memchat.qa``.
Deliberately left out: printing (the script prints; this logs), model loading
details (``memchat.generation``), and encryption: ``training_data/`` is plain text.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import numpy as np

from . import config, formats, fsperm, qa, restatements
from .config import ExtractConfig
from .errors import MemChatError
from .formats import PROGRESS_FILENAME, Progress

log = logging.getLogger(__name__)

MAX_PAIRS = 5  # the ceiling: more questions per ~1000-char chunk repeat each other

GroupHook = Callable[[int, list[dict]], None]  # (group number, chunk results) after each saved group


def _now_iso() -> str:
    return datetime.now(timezone.utc).astimezone().isoformat(timespec="seconds")


def _counter_dict(c: Counter | dict) -> dict:
    return {k: v for k, v in sorted(c.items()) if v}


# ---------------------------------------------------------------------------
# Working state of one chunk while its group is generated
# ---------------------------------------------------------------------------
@dataclass
class _Work:
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


@dataclass
class RunReport:
    """What one ``create_training_dataset`` call did (also in training_stats.json)."""

    dataset_path: Path
    stats_path: Path
    records: int
    chunks_selected: int
    chunks_generated: int
    chunks_reused: int
    stats: dict


class FAISSDataExtractor:
    """Turn the knowledge base into question/answer training data; see the module docstring.

    ``knowledge_base``, ``generator`` and ``embedder`` may be given (tests, apps that
    already hold them); otherwise the store's own ``KnowledgeBase``, the embedder it
    was built with and ``Generator(config.model_name)`` are used. The generator is
    only loaded when some chunk still needs generating.
    """

    def __init__(
        self,
        knowledge_base=None,
        generator=None,
        *,
        extract_config: ExtractConfig | None = None,
        output_dir: str | os.PathLike | None = None,
        embedder=None,
        progress: bool = True,
        on_group_done: GroupHook | None = None,
        notify: Callable[[str], None] | None = None,
    ):
        self.cfg = extract_config or ExtractConfig()
        self.output_dir = Path(output_dir) if output_dir is not None else config.training_dir()
        self._kb = knowledge_base
        self._generator = generator
        self._embedder = embedder
        self.show_progress = progress
        self.on_group_done = on_group_done
        self.notify = notify  # one line per event for a user (the script prints them); else logged
        self.report: RunReport | None = None
        self.notices: list[str] = []
        self.last_generate_calls = 0
        self._kept = 0  # questions kept so far in this run (progress bar)
        self._load_seconds = 0.0  # loading the generator and the embedder: not part of the per-token cost

    # -- collaborators -------------------------------------------------------
    @property
    def kb(self):
        if self._kb is None:
            from .knowledge import KnowledgeBase

            self._kb = KnowledgeBase(embedder=self._embedder)
        return self._kb

    @property
    def embedder(self):
        if self._embedder is None:
            start = time.perf_counter()
            self._embedder = self.kb.embedder()
            self._load_seconds += time.perf_counter() - start
        return self._embedder

    @property
    def generator(self):
        if self._generator is None:
            from .generation import Generator

            start = time.perf_counter()
            self._generator = Generator(self.cfg.model_name)
            self._load_seconds += time.perf_counter() - start
            if self._generator.notice:
                self.notices.append(self._generator.notice)
                self._say(f"Note: {self._generator.notice}")
        return self._generator

    def _say(self, message: str) -> None:
        if self.notify is not None:
            self.notify(message)
        else:
            log.info("%s", message)

    def _model_id(self) -> tuple[str, str]:
        """(stable id, display name) of the generator, without loading it when possible."""
        if self._generator is not None:
            r = self._generator.resolved
            return getattr(r, "model_id", r.display_name), r.display_name
        from .models import resolve_model

        r = resolve_model(self.cfg.model_name, kind="llm")
        return r.model_id, r.display_name

    # -- settings ------------------------------------------------------------
    def _generation_settings(self, model_id: str) -> dict:
        """Everything that changes what a chunk's result is: its hash is the progress key."""
        c = self.cfg
        keep = (
            "max_pairs_per_chunk augment variations_per_question max_new_tokens answer_max_new_tokens "
            "repetition_penalty near_duplicate_threshold variation_duplicate_threshold min_variation_cosine min_question_support "
            "min_answer_support min_answer_cosine evidence_chars"
        ).split()
        settings = {k: getattr(c, k) for k in keep}
        settings["variations_per_question"] = c.variations_per_question if c.augment else 0
        settings.update(model=model_id, pipeline_version=qa.PIPELINE_VERSION, embedding=self._embedding_id())
        return settings

    def _embedding_id(self) -> str:
        spec = getattr(self._embedder, "spec", None) or self.kb.embedding_spec() or {}
        return f"{spec.get('model')}/{spec.get('backend')}"

    @staticmethod
    def _key(settings: dict) -> str:
        return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]

    # -- the public call -----------------------------------------------------
    def create_training_dataset(
        self,
        max_pairs_per_chunk: int | None = None,
        augment: bool | None = None,
        *,
        max_chunks: int | None = None,
        restart: bool = False,
    ) -> Path:
        """Generate (or bring up to date) the training data; returns the dataset's path."""
        if max_pairs_per_chunk is not None:
            self.cfg.max_pairs_per_chunk = max_pairs_per_chunk
        if augment is not None:
            self.cfg.augment = augment
        if max_chunks is not None:
            self.cfg.max_chunks = max_chunks
        self._validate()
        start = time.perf_counter()

        state = self.kb.state()  # NoStoreError / WrongKeyError / StoreError, before any model loads
        all_chunks = [state.metadata["chunks"][k] for k in sorted(state.metadata["chunks"], key=int)]
        if not all_chunks:
            raise MemChatError(
                f"The knowledge base in {self.kb.store.dir}/ has no documents (all removed?). "
                "Add PDFs first: python main.py add FILE.pdf"
            )
        selected = all_chunks[: self.cfg.max_chunks] if self.cfg.max_chunks else all_chunks

        fsperm.private_dir(self.output_dir)
        self._codec = formats.codec(self.cfg.encrypt, self.kb.store.dir)
        from filelock import FileLock, Timeout

        lock = FileLock(str(self.output_dir / ".extract.lock"))
        try:
            lock.acquire(timeout=0)
        except Timeout:
            raise MemChatError(
                f"Another extract_faiss_data.py is writing {self.output_dir}/. Wait for it to finish, or stop it."
            ) from None
        try:
            return self._run(state, all_chunks, selected, restart, start)
        finally:
            lock.release()

    def _validate(self) -> None:
        c = self.cfg
        if not 1 <= c.max_pairs_per_chunk <= MAX_PAIRS:
            raise MemChatError(f"max_pairs_per_chunk must be 1 to {MAX_PAIRS}, got {c.max_pairs_per_chunk}.")
        if c.batch_size < 1:
            raise MemChatError(f"batch_size must be at least 1, got {c.batch_size}.")
        if c.max_chunks is not None and c.max_chunks < 1:
            raise MemChatError(f"max_chunks must be at least 1, got {c.max_chunks}.")
        if c.validation_families_per_chunk < 0:
            raise MemChatError(f"validation_families_per_chunk must be 0 or more, got {c.validation_families_per_chunk}.")
        if c.augment and c.variations_per_question < 1:
            raise MemChatError("variations_per_question must be at least 1 when augment is on.")

    def _run(self, state, all_chunks: list[dict], selected: list[dict], restart: bool, start: float) -> Path:
        model_id, display = self._model_id()
        settings = self._generation_settings(model_id)
        progress = Progress(self.output_dir / PROGRESS_FILENAME, self._key(settings), self._codec)
        if restart:
            for name in (PROGRESS_FILENAME, config.DATASET_FILENAME, config.STATS_FILENAME, formats.TRAIN_JSONL,
                         formats.VALIDATION_JSONL, formats.DOCUMENTS_JSONL):
                (self.output_dir / name).unlink(missing_ok=True)
        progress.load()
        if progress.stale:
            self._say(f"{progress.stale} chunks finished earlier were made with other settings (model, prompts, "
                      "pairs or filters); they are generated again")
        if progress.stale or progress.torn:
            progress.rewrite()

        # Pending: unique chunk hashes of the selection without a result, in chunk order.
        pending: list[dict] = []
        seen: set[str] = set()
        for c in selected if self.cfg.generate_questions else []:  # (no generator: documents + restatements only)
            if c["hash"] not in progress.results and c["hash"] not in seen:
                seen.add(c["hash"])
                pending.append(c)
        reused = len({c["hash"] for c in selected} - seen) if self.cfg.generate_questions else 0
        if not self.cfg.generate_questions:
            self._say("no generator: the chunks' text and restatements only (no questions, paraphrases or validation)")
        elif reused:
            self._say(f"reusing {reused} chunks finished earlier; {len(pending)} to generate")

        gen_stats_before = None
        generate_calls = 0
        if pending:
            gen = self.generator
            gen_stats_before = dataclasses.replace(gen.stats) if hasattr(gen, "stats") else None
            generate_calls = self._generate_all(pending, progress)
            display = gen.resolved.display_name
        self.last_generate_calls = generate_calls

        # Prune lines of chunks no longer in the store (never those merely outside --max-chunks).
        current = {c["hash"] for c in all_chunks}
        if set(progress.results) - current:
            progress.rewrite(keep=current)

        results = progress.results if self.cfg.generate_questions else {}
        records, stats = self._assemble(state, selected, results, settings, display)
        wall = time.perf_counter() - start
        stats["run"] = self._run_stats(wall, len(selected), len(pending), reused, generate_calls, gen_stats_before)
        stats["generation"]["model"] = display
        if self.notices:
            stats["generation"]["notice"] = self.notices[0]

        dataset = formats.dataset_document(generator_model=model_id, settings={**dataclasses.asdict(self.cfg), **settings},
                                           lineage=self._lineage(state, selected), records=records)
        dataset_path = self.output_dir / config.DATASET_FILENAME
        stats_path = self.output_dir / config.STATS_FILENAME
        formats.write_json(dataset_path, dataset, self._codec)
        formats.write_json(stats_path, stats, self._codec)
        formats.write_exports(self.output_dir, records, self._codec)
        self.report = RunReport(dataset_path, stats_path, len(records), len(selected), len(pending), reused, stats)
        return dataset_path

    # -- generation ----------------------------------------------------------
    def _generate_all(self, pending: list[dict], progress: Progress) -> int:
        size = self.cfg.batch_size
        groups = [pending[i : i + size] for i in range(0, len(pending), size)]
        bar = None
        if self.show_progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(pending), unit="chunk", desc="Extracting", dynamic_ncols=True)
        self._kept = 0
        calls = 0
        try:
            for number, group in enumerate(groups, start=1):
                works, group_calls = self._process_group(group, bar)
                calls += group_calls
                items = [(w.chunk["hash"], w.result()) for w in works]
                progress.append(items)
                self._kept += sum(len(w.questions) for w in works)
                if bar is not None:
                    bar.update(len(group))
                    self._postfix(bar, "")
                if self.on_group_done is not None:
                    self.on_group_done(number, [r for _, r in items])
        finally:
            if bar is not None:
                bar.close()
        return calls

    def _postfix(self, bar, doing: str) -> None:
        """Progress bar tail: questions kept so far, generation speed, what the current group is doing."""
        text = f"{self._kept} questions kept, {_tok_s(self.generator):.1f} tok/s"
        bar.set_postfix_str(f"{text}, {doing}" if doing else text)

    def _generate(self, prompts: list[list[dict]], max_new_tokens: int, stop=None):
        kwargs = dict(
            max_new_tokens=min(max_new_tokens, self.cfg.max_new_tokens),
            temperature=0.0,
            repetition_penalty=self.cfg.repetition_penalty,
            batch_size=self.cfg.batch_size,
        )
        if stop:
            kwargs["stop"] = stop
        return self.generator.generate(prompts, **kwargs)

    def _process_group(self, group: list[dict], bar=None) -> tuple[list[_Work], int]:
        """Questions -> retry -> answers -> paraphrases for a group of chunks; one generate call per stage."""
        from .chunking import split_sentences

        cfg = self.cfg
        n = cfg.max_pairs_per_chunk
        emb = self.embedder
        calls = 0

        def stage(text: str) -> None:
            if bar is not None:
                self._postfix(bar, text)

        # Sentences of every chunk, embedded once: evidence, retries and the extractive repair use them.
        sentence_lists = [[s for s in (" ".join(x.split()) for x in split_sentences(c["text"])) if s] for c in group]
        flat = [s for ss in sentence_lists for s in ss]
        vecs = emb.encode(flat) if flat else np.zeros((0, 1), np.float32)
        works, pos = [], 0
        for c, ss in zip(group, sentence_lists):
            works.append(_Work(c, ss, vecs[pos : pos + len(ss)], qa.content_words(c["text"])))
            pos += len(ss)

        # 1. questions
        stage(f"questions for {len(group)} chunks")
        results = self._generate([qa.question_prompt(w.chunk["text"], n) for w in works], qa.question_tokens(n),
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
            for s in self._retry_sentences(w, missing):
                retry_prompts.append(qa.strict_question_prompt(s))
                retry_owner.append((w, s))
            w.counts["retried"] += 1
        for w in works:
            w.candidates = []
        if retry_prompts:
            stage(f"retrying {len(retry_prompts)} questions")
            results = self._generate(retry_prompts, 48)
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
        if asks:
            stage(f"answering {len(asks)} questions")
            prompts = [qa.answer_prompt(q["question"], self._evidence(w, q)) for w, q in asks]
            results = self._generate(prompts, cfg.answer_max_new_tokens, stop=qa.ANSWER_STOP)
            calls += 1
            for (w, q), r in zip(asks, results):
                _count_tokens(w, r)
            self._check_answers(asks, [r for r in results], [r.finish_reason == "length" for r in results])

        # 4. paraphrases that share the answer
        for w in works:
            for q in w.questions:
                q["variations"] = []
        if cfg.augment:
            asks = [(w, q) for w in works for q in w.questions]
            if asks:
                v = cfg.variations_per_question
                stage(f"paraphrasing {len(asks)} questions")
                results = self._generate([qa.variation_prompt(q["question"], v) for _, q in asks], qa.variation_tokens(v),
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

    def _accept_questions(self, works: list[_Work], n: int) -> None:
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
                if qa.support(q, w.words) < cfg.min_question_support:
                    reason = "not_in_chunk"
                elif any(float(vec @ k["vec"]) >= cfg.near_duplicate_threshold for k in w.questions):
                    reason = "near_duplicate"
                elif len(w.questions) >= n:
                    reason = "over_limit"
                if reason:
                    w.q_tally.dropped[reason] += 1
                    continue
                w.questions.append({"question": q, "origin": origin, "sentence": sentence, "vec": vec})

    def _retry_sentences(self, w: _Work, missing: int) -> list[str]:
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

    def _evidence(self, w: _Work, q: dict) -> str:
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

    def _check_answers(self, asks: list[tuple[_Work, dict]], results, truncated: list[bool]) -> None:
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
                best = qa.best_sentence(qa.content_words(q["question"]), w.sentences, q["vec"], w.sentence_vecs)
                if best is None:
                    w.q_tally.dropped["not_answerable"] += 1
                    continue
                sentence = w.sentences[best[0]]
                if qa.word_count(sentence) > qa.MAX_ANSWER_WORDS:
                    w.q_tally.dropped["not_answerable"] += 1
                    continue
                q["answer"], q["answer_source"] = sentence, "extractive"
                w.counts["answers_extractive"] += 1
            keep.setdefault(id(w), []).append(q)
        for w in {id(w): w for w, _ in asks}.values():
            w.questions = keep.get(id(w), [])

    def _filter_variations(self, asks: list[tuple[_Work, dict]], limit: int) -> None:
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

    # -- assembly ------------------------------------------------------------
    def _assemble(self, state, selected: list[dict], results: dict[str, dict], settings: dict, display: str):
        """Records for the selected chunks (chunk order), cross-chunk near-duplicates dropped, split by chunk hash."""
        cfg = self.cfg
        families = []  # (chunk, question index, question dict)
        for c in selected:
            r = results.get(c["hash"])
            for i, q in enumerate((r or {}).get("questions", [])):
                families.append((c, i, q))
        drops: dict[str, Counter] = {}  # document -> reason -> n
        texts = [q["question"] for _, _, q in families]
        vecs = self.embedder.encode(texts) if texts else np.zeros((0, 1), np.float32)
        dup_of = qa.near_duplicates(vecs, cfg.near_duplicate_threshold)
        kept_families = []
        for (c, i, q), d in zip(families, dup_of):
            if d is None:
                kept_families.append((c, i, q))
            else:
                drops.setdefault(c["document"], Counter())["near_duplicate_across_chunks"] += 1
        # Paraphrases near-duplicating another family's question would leak across the split.
        var_items = [(f, v) for f, (_, _, q) in enumerate(kept_families) for v in q.get("variations", [])]
        var_drop: set[tuple[int, str]] = set()
        if var_items:
            orig_vecs = vecs[[k for k, d in enumerate(dup_of) if d is None]]
            all_vecs = np.concatenate([orig_vecs, self.embedder.encode([v for _, v in var_items])])
            groups = list(range(len(kept_families))) + [f for f, _ in var_items]
            dups = qa.near_duplicates(all_vecs, cfg.near_duplicate_threshold, groups=groups)
            for (f, v), d in zip(var_items, dups[len(kept_families):]):
                if d is not None:
                    var_drop.add((f, v))
                    drops.setdefault(kept_families[f][0]["document"], Counter())["variation_near_duplicate"] += 1

        splits = qa.assign_family_splits([(c["hash"], q["question"]) for c, _, q in kept_families],
                                         cfg.validation_families_per_chunk, cfg.seed)
        records = []
        for c in selected if cfg.include_documents else []:  # (a) the documents' own text
            records.append({"id": f"d{c['id']}", "kind": formats.DOCUMENT_KIND, "text": qa.flatten(c["text"]),
                            "split": "train", **_where(c)})
        val_questions: list[str] = []
        for f, (c, i, q) in enumerate(kept_families):
            qid = f"q{c['id']}-{i}"
            split = splits[f]
            base = {"split": split, **_where(c), "answer_source": q["answer_source"], "family": qid}
            records.append({"id": f"r{c['id']}-{i}", "question": q["question"], "answer": q["answer"],
                            "kind": "original", "source_question_id": qid, **base})
            if split == "validation":
                val_questions.append(q["question"])
            kept = [v for v in q.get("variations", []) if (f, v) not in var_drop]
            made = []
            if cfg.augment and cfg.template_paraphrases and len(kept) < cfg.variations_per_question:
                made = restatements.template_paraphrases(q["question"], cfg.variations_per_question - len(kept))
            for j, v in enumerate(kept + made, start=1):
                records.append({"id": f"r{c['id']}-{i}-v{j}", "question": v, "answer": q["answer"],
                                "kind": "variation", "source_question_id": qid, **base,
                                "paraphrase_source": "model" if j <= len(kept) else "template"})
                if split == "validation":
                    val_questions.append(v)
        if cfg.include_restatements:
            records += self._restatements(selected, val_questions, drops)
        return records, self._stats(selected, results, records, drops, display)

    def _restatements(self, selected: list[dict], val_questions: list[str], drops: dict[str, Counter]) -> list[dict]:
        """(d): generator-free items from each chunk's sentences, all train.

        The leakage rule holds for them too: an item whose question is (nearly) a validation
        question is dropped, so validation stays a question the model never saw.
        """
        from .chunking import split_sentences

        cfg = self.cfg
        items: list[tuple[dict, int, restatements.Item]] = []
        seen: set[str] = set()  # overlapping chunks repeat sentences: one item per question
        for c in selected:
            sentences = [s for s in (" ".join(x.split()) for x in split_sentences(qa.flatten(c["text"]))) if s]
            made = restatements.restate(sentences, spans_per_sentence=cfg.restatement_spans_per_sentence,
                                        fact_lists=cfg.fact_lists)
            for n, it in enumerate(made):
                key = qa.normalize(it.question)
                if key in seen:
                    continue
                seen.add(key)
                items.append((c, n, it))
        if not items:
            return []
        val_keys = {qa.normalize(q) for q in val_questions}
        leak = [qa.normalize(it.question) in val_keys for _, _, it in items]
        if val_questions:
            vq = self.embedder.encode(val_questions)
            vi = self.embedder.encode([it.question for _, _, it in items])
            close = (vi @ vq.T).max(axis=1) >= cfg.near_duplicate_threshold
            leak = [a or bool(b) for a, b in zip(leak, close)]
        out = []
        for (c, n, it), bad in zip(items, leak):
            if bad:
                drops.setdefault(c["document"], Counter())["restatement_near_validation"] += 1
                continue
            rec = {"id": f"s{c['id']}-{n}", "question": it.question, "answer": it.answer, "kind": it.kind,
                   "split": "train", **_where(c), "answer_source": "sentence"}
            if it.answer_kind:
                rec["answer_kind"] = it.answer_kind
            out.append(rec)
        return out

    def _stats(self, selected, results, records, drops, display) -> dict:
        per_doc: dict[str, dict] = {}
        for c in selected:
            d = per_doc.setdefault(c["document"], _empty_doc_stats(c["version"]))
            d["chunks"] += 1
            r = results.get(c["hash"])
            if r is None:
                d["chunks_without_result"] += 1
                continue
            cnt = r["counts"]
            d["questions_generated"] += cnt.get("questions_generated", 0)
            d["retry_prompts"] += cnt.get("retry_prompts", 0)
            d["questions_from_retry"] += cnt.get("retry_kept", 0)
            d["variations_generated"] += cnt.get("variations_generated", 0)
            d["answers"]["model"] += cnt.get("answers_model", 0)
            d["answers"]["extractive"] += cnt.get("answers_extractive", 0)
            d["generated_tokens"] += r.get("tokens", {}).get("new", 0)
            for part, key in (("questions_tally", "questions"), ("answers_tally", "answers_parse"),
                              ("variations_tally", "variations")):
                t = r.get(part, {})
                d["repaired"][key].update(t.get("repaired", {}))
                d["dropped"][key].update(t.get("dropped", {}))
        for doc, reasons in drops.items():
            for reason, n in reasons.items():
                key = ("variations" if reason.startswith("variation_") else
                       "restatements" if reason.startswith("restatement_") else "questions")
                per_doc[doc]["dropped"][key][reason] += n
        for rec in records:
            d = per_doc[rec["document"]]
            d["records"] += 1
            d["records_" + rec["split"]] += 1
            d["records_by_kind"][rec["kind"]] += 1
            if rec["split"] == "validation":
                d["validation_by_kind"][rec["kind"]] += 1
            if rec["kind"] == "original":
                d["questions_kept"] += 1
                d["families_" + rec["split"]] += 1
            elif rec["kind"] == "variation":
                d["variations_kept"] += 1
            if rec.get("answer_kind"):
                d["span_answers_by_kind"][rec["answer_kind"]] += 1
        overall = _empty_doc_stats(None)
        for d in per_doc.values():
            _add_into(overall, d)
        out_docs = {name: _finish_doc(d) for name, d in sorted(per_doc.items())}
        overall = _finish_doc(overall)
        overall.pop("version", None)
        return {
            "format": formats.STATS_FORMAT,
            "format_version": formats.STATS_FORMAT_VERSION,
            "created": _now_iso(),
            "overall": overall,
            "documents": out_docs,
            "generation": {"model": display},
            "notes": {
                "answers.extractive": "answers repaired with the chunk sentence that best answers the question, "
                "used where the model's answer was unusable or not grounded in the chunk",
                "dropped": "by reason; questions: parsing problems and filters; answers_parse: why a model answer "
                "was rejected before the extractive repair (the question is kept when the repair succeeds); "
                "restatements: items too close to a validation question (the leakage rule)",
                "records_by_kind": "document = a chunk's text (LM loss on all tokens); original = generated question; "
                "variation = its paraphrase; wh / cloze = a sentence's answer span asked for; about = a sentence "
                "asked for by its topic; facts = the sentences about one name, as a list",
                "split": "validation holds out question families (a question and its paraphrases) of chunks that "
                "are also trained on; every chunk is in training",
            },
        }

    def _run_stats(self, wall, selected, generated, reused, calls, before) -> dict:
        out = {
            "wall_time_s": round(wall, 2),
            "model_load_s": round(self._load_seconds, 2),
            "chunks_selected": selected,
            "chunks_generated": generated,
            "chunks_reused": reused,
            "generate_calls": calls,
        }
        gen = self._generator
        if before is not None and gen is not None:
            s = gen.stats
            new = s.new_tokens - before.new_tokens
            secs = s.seconds - before.seconds
            out.update(
                generated_tokens=new,
                prompt_tokens=s.prompt_tokens - before.prompt_tokens,
                prompts=s.prompts - before.prompts,
                generation_time_s=round(secs, 2),
                tokens_per_s=round(new / secs, 1) if secs > 0 else None,
                # everything but loading models, over the time inside generate: the pipeline's overhead
                wall_over_generation=round((wall - self._load_seconds) / secs, 3) if secs > 0 else None,
            )
        return out

    def _lineage(self, state, selected: list[dict]) -> dict:
        names = {c["document"] for c in selected}
        docs = state.versions["documents"]
        return {
            "documents": [
                {"name": n, "version": docs[n]["version"], "sha256": docs[n]["sha256"]} for n in sorted(names) if n in docs
            ],
            "store_generation": state.generation,
        }


def _where(c: dict) -> dict:
    """Where a record comes from (document, version, pages, chunk)."""
    return {"document": c["document"], "doc_version": c["version"], "page_start": c["page_start"],
            "page_end": c["page_end"], "chunk_id": c["id"], "chunk_hash": c["hash"]}


def _tok_s(gen) -> float:
    stats = getattr(gen, "stats", None)
    return stats.tokens_per_s if stats is not None else 0.0


def _count_tokens(w: _Work, r) -> None:
    w.tokens["new"] += r.new_tokens
    w.tokens["prompt"] += r.prompt_tokens
    w.tokens["prompts"] += 1


def _empty_doc_stats(version) -> dict:
    return {
        "version": version,
        "chunks": 0,
        "chunks_without_result": 0,
        "questions_generated": 0,
        "retry_prompts": 0,
        "questions_from_retry": 0,
        "questions_kept": 0,
        "variations_generated": 0,
        "variations_kept": 0,
        "records": 0,
        "records_train": 0,
        "records_validation": 0,
        "families_train": 0,
        "families_validation": 0,
        "records_by_kind": Counter(),
        "validation_by_kind": Counter(),
        "span_answers_by_kind": Counter(),
        "answers": Counter(),
        "repaired": {k: Counter() for k in ("questions", "answers_parse", "variations")},
        "dropped": {k: Counter() for k in ("questions", "answers_parse", "variations", "restatements")},
        "generated_tokens": 0,
    }


def _add_into(total: dict, d: dict) -> None:
    for k, v in d.items():
        if k == "version":
            continue
        if isinstance(v, dict) and not isinstance(v, Counter):
            for kk, c in v.items():
                total[k][kk].update(c)
        elif isinstance(v, Counter):
            total[k].update(v)
        else:
            total[k] += v


def _finish_doc(d: dict) -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, Counter):
            out[k] = {"model": v.get("model", 0), "extractive": v.get("extractive", 0)} if k == "answers" else _counter_dict(v)
        elif isinstance(v, dict):
            out[k] = {kk: _counter_dict(c) for kk, c in v.items()}
        else:
            out[k] = v
    out["dropped_total"] = {k: sum(c.values()) for k, c in out["dropped"].items()}
    return out


read_dataset = formats.read_dataset  # (kept for callers of the old name)


__all__ = ["FAISSDataExtractor", "RunReport", "read_dataset", "PROGRESS_FILENAME"]
