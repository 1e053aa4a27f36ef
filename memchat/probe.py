"""The knowledge probe: does the model being trained answer its validation questions?

Each evaluation the trainer asks the held-out question families (``memchat.qa``'s
family split: questions never trained on, about chunks that were) and the span probes
(``restatements.probe_items``: short-answer questions about spans of trained sentences
that no training item asks for) greedily, in
batches, with short answers, and scores them with the evaluation's own metrics
(``memchat.evaluate``: SQuAD token F1 and contains-gold). The golds of a question are
its answer and the date / number / name spans of that answer the question does not
already hold (``memchat.text.answer_spans``), so a short right answer counts as well as
the whole sentence.

``knowledge_f1`` and ``knowledge_contains`` go into the evaluation metrics, next to the
answer-token loss: TensorBoard plots them, and the best checkpoint and early stopping
use them (``TrainConfig.metric_for_best``). Deliberately left out: the trainer's loop
(``memchat.training``) and loading models.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from itertools import zip_longest
from typing import Sequence

from .evaluate import contains_gold, normalize_answer, token_f1
from .prompting import prompt_ids
from .text import DATE, NAME, NUMBER, answer_spans, content_words

log = logging.getLogger(__name__)

METRICS = ("knowledge_f1", "knowledge_contains", "loss")
# The checkpoint is chosen by ``selection_score``: the knowledge metric, ties broken by the lower answer-token loss.
# Greedy answers of a few dozen questions often come out identical for several late epochs (qa_dev, 6 epochs:
# knowledge F1 53.5 at epochs 4, 5 and 6, bench/README.md); then the epoch that fits the held-out answers best is
# kept, not the first. 1e-3 x a loss of at most a few nats moves the score by < 0.01: never past a real difference
# (one question of 64 changing its token F1 by 0.1 moves knowledge_f1 by 0.16).
LOSS_TIE_BREAK = 1e-3
SELECTION_KEY = "knowledge_selection"


def selection_score(knowledge: float, loss: float | None) -> float:
    """What picks the saved epoch and stops early: ``knowledge`` (0-100), ties broken by ``loss``."""
    return knowledge - LOSS_TIE_BREAK * (loss if loss is not None else 0.0)


def golds_for(question: str, answer: str) -> list[str]:
    """The answer, plus its date/number/name spans that the question does not already hold."""
    out = [answer.strip()]
    qwords = content_words(question)
    for span in answer_spans(answer):
        if span.kind in (DATE, NUMBER, NAME) and not content_words(span.text) <= qwords:
            out.append(span.text)
    return list(dict.fromkeys(out))


@dataclass
class ProbeQuestion:
    question: str
    golds: list[str]


@dataclass
class KnowledgeProbe:
    """The validation questions, answered greedily each evaluation; see the module docstring."""

    questions: list[ProbeQuestion]
    max_new_tokens: int = 32
    batch_size: int = 16
    history: list[dict] = field(default_factory=list)  # one entry per evaluation: epoch, step, metrics
    last_predictions: list[str] = field(default_factory=list)

    @classmethod
    def from_records(cls, records: Sequence[dict], limit: int = 0, **kwargs) -> "KnowledgeProbe":
        """One question per family (its original) and every span probe (kind "wh"), in record order, the two
        kinds taken in turn so that ``limit`` > 0 keeps the first N of both alike."""
        seen, kinds = set(), {"original": [], "wh": []}
        for r in records:
            kind = r.get("kind", "original")
            key = normalize_answer(r["question"])
            if kind not in kinds or key in seen:
                continue
            seen.add(key)
            # a span probe's answer is already the short answer: its pieces would count "Laboratory" right
            golds = [r["answer"].strip()] if kind == "wh" else golds_for(r["question"], r["answer"])
            kinds[kind].append(ProbeQuestion(r["question"].strip(), golds))
        families, spans = kinds["original"], kinds["wh"]
        out = [q for pair in zip_longest(families, spans) for q in pair if q is not None]
        return cls(out[:limit] if limit > 0 else out, **kwargs)

    def answer(self, model, tokenizer) -> list[str]:
        """Greedy answers (left-padded batches), cut at eos; the model is left as it was found."""
        import torch

        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        eos = tokenizer.eos_token_id
        stop = {eos} if eos is not None else set()
        gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        stop |= set(gen_eos if isinstance(gen_eos, list) else [gen_eos] if gen_eos is not None else [])
        out: list[str] = []
        try:
            with torch.no_grad():
                for lo in range(0, len(self.questions), self.batch_size):
                    batch = [prompt_ids(tokenizer, q.question) for q in self.questions[lo : lo + self.batch_size]]
                    width = max(len(p) for p in batch)
                    ids = torch.full((len(batch), width), pad, dtype=torch.long)
                    mask = torch.zeros((len(batch), width), dtype=torch.long)
                    for row, p in enumerate(batch):
                        ids[row, width - len(p):] = torch.tensor(p)
                        mask[row, width - len(p):] = 1
                    gen = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                         max_new_tokens=self.max_new_tokens, do_sample=False, num_beams=1,
                                         pad_token_id=pad, eos_token_id=sorted(stop) or None, use_cache=True)
                    for row in gen[:, width:].tolist():
                        cut = next((i for i, t in enumerate(row) if t in stop), len(row))
                        out.append(tokenizer.decode(row[:cut], skip_special_tokens=True).strip())
        finally:
            if was_training:
                model.train()
        return out

    def score(self, predictions: Sequence[str]) -> dict[str, float]:
        n = max(1, len(predictions))
        return {
            "knowledge_f1": 100.0 * sum(token_f1(p, q.golds) for p, q in zip(predictions, self.questions)) / n,
            "knowledge_contains": 100.0 * sum(contains_gold(p, q.golds) for p, q in zip(predictions, self.questions)) / n,
        }

    def run(self, model, tokenizer, *, epoch: float | None = None, step: int | None = None) -> dict[str, float]:
        preds = self.answer(model, tokenizer)
        metrics = _same_on_every_process(self.score(preds))
        self.last_predictions = preds
        self.history.append({"epoch": epoch, "step": step, **{k: round(v, 2) for k, v in metrics.items()}})
        return metrics


def _same_on_every_process(metrics: dict[str, float]) -> dict[str, float]:
    """Under DDP (accelerate launch / torchrun) every process must pick the same best checkpoint, or one
    process's checkpoint rotation deletes the folder another will load: take process 0's figures."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return metrics
    keys = sorted(metrics)
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    values = torch.tensor([float(metrics[k]) for k in keys], dtype=torch.float64, device=device)
    dist.broadcast(values, src=0)
    return dict(zip(keys, values.tolist()))
