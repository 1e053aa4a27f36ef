"""``FAISSDataExtractor``: the orchestrator of the extraction, knowledge base -> ``training_data/``.

One run:

  1. read the store through ``KnowledgeBase`` (same key rules and errors as the app);
  2. load the progress file ``training_data/extract_progress.jsonl`` (``memchat.formats``):
     one line per finished chunk, keyed by the chunk's content hash and a fingerprint of
     every setting that changes what the model is asked (model, prompts, pairs, ...);
  3. the chunks with no result yet (new, changed, or never reached) are processed in
     groups of ``batch_size`` chunks by ``memchat.extraction_stages`` (one batched
     ``generate`` call per stage: questions -> retry -> answers -> paraphrases). After
     each group its results are appended to the progress file and fsynced, so a killed
     run loses at most one group; with greedy decoding a resumed run writes the same records;
  4. assemble the training mix: (a) each chunk's text, (b) its question families with
     (c) their paraphrases (framings fill up where the generator wrote too few), and
     (d) the generator-free restatements (``memchat.restatements``); near-duplicate
     questions across chunks dropped; the family split (``qa.assign_family_splits``:
     every chunk trained on, whole question families held out, no restatement close to
     a validation question); then the dataset, the stats (``memchat.extraction_stats``)
     and the ``messages`` exports are written atomically, owner-only, encrypted with the
     store's key when asked. Progress lines of chunks no longer in the store are pruned.

The per-chunk logic (prompts, parsing, repair, grounding) is ``memchat.qa``.
Deliberately left out: printing (the script prints; this logs) and model loading
details (``memchat.generation``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from . import config, extraction_stats, formats, fsperm, qa, restatements
from .config import ExtractConfig
from .errors import MemChatError
from .extraction_stages import GroupStages
from .formats import PROGRESS_FILENAME, Progress
from .text import content_words

log = logging.getLogger(__name__)

MAX_PAIRS = 5  # the ceiling: more questions per ~1000-char chunk repeat each other

GroupHook = Callable[[int, list[dict]], None]  # (group number, chunk results) after each saved group


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
        self.stage_seconds: Counter = Counter()  # this run's seconds per stage (questions, retrying, answering, ...)

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
        # "auto" resolves from the model, which the key already names; the reader's own settings change its spans.
        settings["answer_writer"] = c.answer_writer
        settings["paraphrase_writer"] = c.paraphrase_writer if c.augment else None
        if c.answer_writer == "reader":
            r, rag = config.ReaderConfig(), config.RAGConfig()
            settings["reader"] = {"weights": list(r.weights), "lm_rerank": r.lm_rerank,
                                  "sentences": rag.reader_sentences, "threshold": rag.auto_generative_params}
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
        if c.probe_questions_per_chunk < 0:
            raise MemChatError(f"probe_questions_per_chunk must be 0 or more, got {c.probe_questions_per_chunk}.")
        if c.augment and c.variations_per_question < 1:
            raise MemChatError("variations_per_question must be at least 1 when augment is on.")
        if c.paraphrase_writer not in config.PARAPHRASE_WRITERS:
            raise MemChatError(f"paraphrase_writer must be one of {', '.join(config.PARAPHRASE_WRITERS)}, "
                               f"got {c.paraphrase_writer!r}.")
        if c.answer_writer not in config.ANSWER_WRITERS:
            raise MemChatError(f"answer_writer must be one of {', '.join(config.ANSWER_WRITERS)}, got {c.answer_writer!r}.")

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
            self._say("no generator: the chunks' text and restatements only (no questions or paraphrases; "
                      "validation is the span probes)")
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
        stats["run"] = extraction_stats.run_stats(wall, self._load_seconds, self._generator, len(selected), len(pending),
                                                  reused, generate_calls, gen_stats_before, self.stage_seconds)
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
        stages = GroupStages(self.cfg, self.embedder, self._generate,
                             note=lambda bar, text: bar is not None and self._postfix(bar, text),
                             answer_writer=self.answer_writer(), reader=self._reader(), idf=self.kb.idf,
                             reader_sentences=config.RAGConfig().reader_sentences,
                             model_paraphrases=self.paraphrase_writer() == "model")
        self.stage_seconds = stages.seconds
        try:
            for number, group in enumerate(groups, start=1):
                works, group_calls = stages.process_group(group, bar)
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

    def _small_model(self) -> bool:
        """An in-process model below ``RAGConfig.auto_generative_params`` (an external engine counts as large):
        what "auto" answers and paraphrases without generating for."""
        from .rag import model_parameters

        params = model_parameters(self.generator)
        return params is not None and params < config.RAGConfig().auto_generative_params

    def answer_writer(self) -> str:
        """``cfg.answer_writer`` with "auto" resolved: "sentence" for a small model, else "model"."""
        if self.cfg.answer_writer != "auto":
            return self.cfg.answer_writer
        return "sentence" if self._small_model() else "model"

    def paraphrase_writer(self) -> str:
        """``cfg.paraphrase_writer`` with "auto" resolved: "template" for a small model, else "model"."""
        if self.cfg.paraphrase_writer != "auto":
            return self.cfg.paraphrase_writer
        return "template" if self._small_model() else "model"

    def _reader(self):
        """The extractive reader that answers the questions, or None when the model writes them."""
        if self.answer_writer() != "reader":
            return None
        from .rag import build_reader

        return build_reader(self.generator, self.kb.idf, config.ReaderConfig())

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
        return records, extraction_stats.dataset_stats(selected, results, records, drops, display)

    def _restatements(self, selected: list[dict], val_questions: list[str], drops: dict[str, Counter]) -> list[dict]:
        """(d): generator-free items from each chunk's sentences (train), and the span probes (validation).

        The leakage rule holds for them too: an item whose question is (nearly) a validation
        question is dropped, so validation stays a question the model never saw. The span probes
        are not part of that rule: a probe and a trained item of the same sentence read alike but
        ask for different answers, and ``_span_probes`` keeps them apart by answer instead.
        """
        from .chunking import split_sentences

        cfg = self.cfg
        items: list[tuple[dict, int, restatements.Item]] = []
        probes: list[tuple[dict, int, restatements.Item]] = []
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
            if cfg.probe_questions_per_chunk:
                candidates = restatements.probe_items(sentences, spans_per_sentence=cfg.restatement_spans_per_sentence)
                probes += [(c, n, it) for n, it in enumerate(candidates)]
        if not items:
            return []
        out = self._span_probes(probes, items, seen) if probes else []
        val_keys = {qa.normalize(q) for q in val_questions}
        leak = [qa.normalize(it.question) in val_keys for _, _, it in items]
        if val_questions:
            vq = self.embedder.encode(val_questions)
            vi = self.embedder.encode([it.question for _, _, it in items])
            close = (vi @ vq.T).max(axis=1) >= cfg.near_duplicate_threshold
            leak = [a or bool(b) for a, b in zip(leak, close)]
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

    def _span_probes(self, probes, items, trained_questions: set[str]) -> list[dict]:
        """Validation records: per chunk, ``probe_questions_per_chunk`` wh questions about spans no training item
        asks about (``restatements.probe_items``), chosen by a hash of (chunk, question) like the families.

        A probe is dropped when a trained wh/cloze item has its answer and most of its words: the same sentence
        cut differently at a chunk boundary asks the same thing. Nothing is taken out of training.
        """
        cfg = self.cfg
        trained: dict[str, list[set[str]]] = {}  # answer -> content words of the trained questions asking for it
        for _, _, it in items:
            if it.kind in ("wh", "cloze"):
                trained.setdefault(qa.normalize(it.answer), []).append(content_words(it.question))

        def leaks(it) -> bool:
            words = content_words(it.question)
            return qa.normalize(it.question) in trained_questions or any(
                len(words & t) >= 0.8 * max(1, len(words)) for t in trained.get(qa.normalize(it.answer), []))

        by_chunk: dict[str, list[tuple[dict, int, restatements.Item]]] = {}
        for c, n, it in probes:
            if not leaks(it):
                by_chunk.setdefault(c["hash"], []).append((c, n, it))
        out = []
        taken: set[str] = set()  # overlapping chunks share sentences: a question is probed once
        for h, group in by_chunk.items():
            ranked = sorted(group, key=lambda g: (qa.split_score(f"{h}:{qa.normalize(g[2].question)}", cfg.seed), g[1]))
            ranked = [g for g in ranked if qa.normalize(g[2].question) not in taken]
            for c, n, it in sorted(ranked[: cfg.probe_questions_per_chunk], key=lambda g: g[1]):
                taken.add(qa.normalize(it.question))
                out.append({"id": f"p{c['id']}-{n}", "question": it.question, "answer": it.answer, "kind": it.kind,
                            "split": "validation", **_where(c), "answer_source": "sentence",
                            "answer_kind": it.answer_kind, "family": f"p{c['id']}-{n}"})
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


read_dataset = formats.read_dataset  # (kept for callers of the old name)


__all__ = ["FAISSDataExtractor", "RunReport", "read_dataset", "PROGRESS_FILENAME"]
