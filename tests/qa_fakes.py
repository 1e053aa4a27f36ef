"""A scripted, countable stand-in for ``memchat.generation.Generator`` (importable from subprocesses).

It reads each prompt the way ``memchat.qa`` writes them and answers the way a small
model does: questions in mixed formats (numbered, labelled, run together, a
question about "the text"), some chunks short of questions (so the stricter retry
runs), answers with a preamble, some answers made up (so the extractive repair
runs), paraphrases one per line. Deterministic: the same prompt gets the same
output whatever batch it is in.
"""

from __future__ import annotations

import hashlib
import re
import time
from dataclasses import dataclass

from memchat import qa
from memchat.chunking import split_sentences
from memchat.generation import GenerationResult, GenerationStats


@dataclass
class _Resolved:
    display_name: str = "scripted-model"
    model_id: str = "tests/scripted-model"
    source: str = "local"
    notice: str | None = None


def _h(text: str) -> int:
    return int(hashlib.md5(text.encode()).hexdigest()[:8], 16)


def _words(sentence: str, k: int) -> str:
    ws = [w for w in re.findall(r"[A-Za-z]{4,}", sentence) if w.lower() not in qa._STOP]
    return " ".join(ws[:k]) or "this topic"


class ScriptedGenerator:
    def __init__(self, *, delay: float = 0.0, fail_after_calls: int | None = None):
        self.resolved = _Resolved()
        self.notice = None
        self.stats = GenerationStats()
        self.delay = delay  # seconds per generate call (lets a test kill a run mid-way)
        self.fail_after_calls = fail_after_calls
        self.calls = 0
        self.prompts: list[list[dict]] = []

    # -- the Generator interface ------------------------------------------------
    def generate(self, batch, *, max_new_tokens=256, batch_size=16, stop=None, **kwargs):
        if self.fail_after_calls is not None and self.calls >= self.fail_after_calls:
            raise RuntimeError("injected failure")
        self.calls += 1
        start = time.perf_counter()
        if self.delay:
            time.sleep(self.delay)
        out = []
        for messages in batch:
            self.prompts.append(messages)
            text = self._reply(messages)
            toks = text.split()
            finish = "eos"
            if len(toks) > max_new_tokens:
                text, finish = " ".join(toks[:max_new_tokens]), "length"
            prompt_tokens = sum(len(m["content"].split()) for m in messages)
            out.append(GenerationResult(text=text, prompt_tokens=prompt_tokens, new_tokens=len(text.split()) + 1,
                                        finish_reason=finish))
        self.stats.calls += 1
        self.stats.prompts += len(batch)
        self.stats.prompt_tokens += sum(r.prompt_tokens for r in out)
        self.stats.new_tokens += sum(r.new_tokens for r in out)
        self.stats.seconds += time.perf_counter() - start + 1e-3
        return out

    # -- what a small model would write ----------------------------------------
    def _reply(self, messages) -> str:
        system = next((m["content"] for m in messages if m["role"] == "system"), "")
        user = messages[-1]["content"]
        if system == qa.QUESTION_SYSTEM:
            return self._questions(user)
        if user.startswith("Sentence:"):
            sentence = user.split("\n", 1)[0][len("Sentence:"):].strip()
            return f"What does {_words(sentence, 4)} mean here?"
        if system == qa.ANSWER_SYSTEM:
            question = user.rsplit("Question:", 1)[-1].strip()
            evidence = user.split("Text:\n", 1)[1].rsplit("\n\nQuestion:", 1)[0]
            if _h(question) % 4 == 0:
                return "Answer: Bananas are purple cosmic vegetables grown on Jupiter."
            first = split_sentences(evidence, max_chars=None)[0]
            return f"Answer: According to the text, {first}\nQuestion: and what else?"
        if user.startswith("Rewrite the question"):
            source = user.rsplit("Question:", 1)[-1].strip().rstrip("?")
            return f"Q: Could you tell me {source[0].lower() + source[1:]}?\nQ: {source}, please?\nQ: {source}?"
        return "I am not sure what you want."

    def _questions(self, user: str) -> str:
        text = user.split('"""')[1]
        sentences = [s for s in split_sentences(text, max_chars=None) if len(s.split()) >= 6]
        style = _h(text) % 3
        if style == 0:  # a chunk that comes up short: one real question, one about the text
            return f"Q: What is {_words(sentences[0], 3) if sentences else 'it'}?\nQ: What does the text say?"
        qs = [f"What about {_words(s, 3)}?" for s in sentences[:3]] or ["What is this?"]
        if style == 1:
            return "\n".join(f"{i}. Question: {q}" for i, q in enumerate(qs, 1))
        return " ".join(qs) + "\nAnswer: " + (sentences[0] if sentences else "")
