"""Chatting with a model on its own: the fine-tuned one in finetuned_model/, or its base.

``ChatModel`` answers a bare question (no retrieval) with exactly the prompt a model
fine-tuned by ``memchat.training`` was trained on: the chat template's user turn, or
``question<eos>`` for a model without a template (DialoGPT). ``FineTunedChat`` is a
``ChatModel`` over a fine-tuned folder: it loads the weights once, reads
``memchat_model_meta.json`` and can tell when the model is older than the knowledge
base (its lineage lists the document versions its training data came from).

``generate_response(question, max_length=512, temperature=0.7, do_sample=True)`` is
the user's guide's call, with the guide's meaning: ``max_length`` counts prompt and
answer tokens together, as in ``transformers``' ``generate``.

Deliberately left out: retrieval (``rag``/``hybrid``), loading details (``models``),
and printing (scripts print; the apps show ``notice`` and ``staleness``).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Iterator, Sequence

from . import config
from .errors import ModelUnavailableError

log = logging.getLogger(__name__)

MAKE_HINT = "Make one: python extract_faiss_data.py && python train_conversational.py"
RETRAIN_HINT = "Retrain to include them: python extract_faiss_data.py && python train_conversational.py"

# Greedy settings for evaluation and the hybrid's draft (reproducible, short).
EVAL_MAX_NEW_TOKENS = 64  # extracted answers are a sentence or two
EVAL_REPETITION_PENALTY = 1.1  # the Generator's default; small models loop without it


class ChatModel:
    """A causal LM answering one question at a time, with no retrieval.

    ``generator`` (a ``memchat.generation.Generator``) is built from ``model_name``
    on first use unless given.
    """

    def __init__(self, model_name: str | None = None, *, generator=None):
        if generator is None and not model_name:
            raise ValueError("Give a model_name or a generator.")
        self.model_name = model_name or generator.resolved.requested
        self._generator = generator

    @property
    def generator(self):
        if self._generator is None:
            from .generation import Generator

            self._generator = Generator(self.model_name)
        return self._generator

    @property
    def display_name(self) -> str:
        return self.generator.resolved.display_name

    @property
    def notice(self) -> str | None:
        return self.generator.notice

    @staticmethod
    def messages(question: str) -> list[dict]:
        """The conversation the model was fine-tuned on: one user turn, no system prompt."""
        return [{"role": "user", "content": question.strip()}]

    # -- the user's guide ----------------------------------------------------
    def generate_response(self, question: str, max_length: int = 512, temperature: float = 0.7, do_sample: bool = True) -> str:
        """The answer to ``question``; ``max_length`` = prompt + answer tokens (at least 1 new token)."""
        return self.generator.generate([self.messages(question)], **self._guide_kwargs(question, max_length, temperature, do_sample))[0].text

    def stream(self, question: str, max_length: int = 512, temperature: float = 0.7, do_sample: bool = True) -> Iterator[str]:
        """``generate_response`` piece by piece; the pieces join to the whole answer."""
        return self.generator.stream(self.messages(question), **self._guide_kwargs(question, max_length, temperature, do_sample))

    def _guide_kwargs(self, question: str, max_length: int, temperature: float, do_sample: bool) -> dict:
        gen = self.generator
        prompt_tokens = len(gen.encode(gen.format_prompt(self.messages(question))))
        return dict(max_new_tokens=max(1, max_length - prompt_tokens), temperature=temperature if do_sample else 0.0,
                    do_sample=do_sample)

    # -- evaluation and the hybrid -------------------------------------------
    def answer(self, question: str, *, max_new_tokens: int = EVAL_MAX_NEW_TOKENS) -> str:
        """Greedy answer (reproducible)."""
        return self.answer_many([question], max_new_tokens=max_new_tokens)[0]

    def answer_many(self, questions: Sequence[str], *, max_new_tokens: int = EVAL_MAX_NEW_TOKENS, batch_size: int = 16) -> list[str]:
        results = self.generator.generate(
            [self.messages(q) for q in questions], max_new_tokens=max_new_tokens, temperature=0.0,
            repetition_penalty=EVAL_REPETITION_PENALTY, batch_size=batch_size,
        )
        return [r.text for r in results]

    def loglikelihoods(self, question: str, options: Sequence[str]) -> list[float]:
        """log p(option | question) for each option: multiple choice without sampling."""
        # No leading space: training put the answer right after the prompt in both formats.
        return self.generator.loglikelihoods([(self.messages(question), o.strip()) for o in options])


class FineTunedChat(ChatModel):
    """The model in ``finetuned_model/`` (or ``model_dir``), loaded once.

    Raises ``ModelUnavailableError`` (with the command that makes one) when the
    folder is missing or holds no model, and ``MemChatError`` when its metadata is of
    another format version.
    """

    def __init__(self, model_dir: str | Path | None = None, *, generator=None, load: bool = True):
        self.model_dir = Path(model_dir) if model_dir is not None else config.finetuned_dir()
        check_model_dir(self.model_dir)
        self.meta = read_meta(self.model_dir)
        super().__init__(str(self.model_dir), generator=generator)
        if load:
            t0 = time.perf_counter()
            _ = self.generator  # load now: errors surface at start, not at the first question
            log.info("Loaded fine-tuned model from %s in %.1f s", self.model_dir, time.perf_counter() - t0)

    @property
    def display_name(self) -> str:
        base = (self.meta.get("base_model") or {}).get("display_name")
        return f"fine-tuned {base}" if base else f"fine-tuned ({self.model_dir.name})"

    @property
    def base_model(self) -> str | None:
        """The model it was fine-tuned from, as a name ``resolve_model`` finds again."""
        base = self.meta.get("base_model") or {}
        return base.get("resolved") or base.get("requested")

    @property
    def lineage_documents(self) -> list[dict] | None:
        docs = (self.meta.get("lineage") or {}).get("documents")
        return list(docs) if isinstance(docs, list) else None

    def staleness(self, documents: Sequence[dict] | None = None, kb=None) -> str | None:
        """A warning when the knowledge base holds documents the model has not seen; else None.

        ``documents``: the store's ``KnowledgeBase().documents()`` (read here when not given).
        """
        if documents is None:
            from .errors import MemChatError
            from .knowledge import KnowledgeBase

            try:
                documents = (kb or KnowledgeBase()).documents()
            except MemChatError as exc:  # a damaged or locked store: no staleness verdict, say why
                log.warning("Cannot compare the fine-tuned model with the knowledge base: %s", exc)
                return None
        return staleness_warning(self.lineage_documents, documents)


def check_model_dir(model_dir: Path) -> None:
    if not model_dir.is_dir():
        raise ModelUnavailableError(f"No fine-tuned model in {model_dir}/. {MAKE_HINT}")
    if not (model_dir / "config.json").is_file():
        raise ModelUnavailableError(f"{model_dir}/ holds no model (no config.json). {MAKE_HINT}")


def read_meta(model_dir: Path) -> dict:
    """The model's memchat_model_meta.json; {} for a folder made elsewhere (no lineage to check)."""
    if not (model_dir / config.FINETUNED_META_FILENAME).exists():
        log.info("%s has no %s: its lineage is unknown", model_dir, config.FINETUNED_META_FILENAME)
        return {}
    from .formats import read_model_meta  # (not .training: reading a meta file needs no trainer)

    return read_model_meta(model_dir)


def staleness_warning(lineage: Sequence[dict] | None, documents: Sequence[dict]) -> str | None:
    """Compare the documents a model was trained from with the store's current ones.

    Documents are matched by name, and counted as changed when their content hash
    (or, lacking one, version) differs. Removed documents do not make a model stale
    for answering, but they are mentioned: the model still knows their content.
    """
    if lineage is None:
        return None
    seen = {d.get("name"): d for d in lineage if isinstance(d, dict)}
    added, changed = [], []
    for doc in documents:
        old = seen.get(doc["name"])
        if old is None:
            added.append(doc["name"])
        elif (old.get("sha256") and doc.get("sha256") and old["sha256"] != doc["sha256"]) or (
            not (old.get("sha256") and doc.get("sha256")) and old.get("version") != doc.get("version")
        ):
            same_version = old.get("version") == doc.get("version")
            changed.append(f"{doc['name']} (" + ("content changed" if same_version else
                           f"now v{doc.get('version')}, trained on v{old.get('version')}") + ")")
    current = {d["name"] for d in documents}
    removed = sorted(n for n in seen if n not in current)
    if not (added or changed):
        return None
    parts = []
    if added:
        parts.append("added since: " + ", ".join(added))
    if changed:
        parts.append("changed since: " + ", ".join(changed))
    if removed:
        parts.append("removed since (the model still knows them): " + ", ".join(removed))
    return f"The fine-tuned model is older than the knowledge base ({'; '.join(parts)}). {RETRAIN_HINT}"
