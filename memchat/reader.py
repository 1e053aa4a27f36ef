"""Extractive reading: the answer is a span copied from the evidence.

A small instruct model asked to *write* an answer echoes the question or invents
one. So the reader proposes the candidate spans of the best evidence sentences
(``text.answer_spans``: dates, numbers, names, phrases, enumerations "A, B, and C",
clauses for how/why questions) and ranks them by a linear score over ``FEATURES``,
each with a reason (an answer rarely repeats the question's words; the question word
asks for a kind; the answer sits beside the question's words; SQuAD questions are the
sentence with the answer replaced by a wh-word, so the words before a question word
left in place are the words before the answer). The weights are fitted by bench/fit_reader.py
and live in ``config.ReaderConfig``.

With a ``SpanScorer`` the best few candidates are also scored by the language model,
as the complete answer after the question and the evidence:

    log p(span, <end> | system, evidence, question)     (summed over tokens)

and again with a question that asks for nothing in particular (``NULL_QUESTION``): the
difference, the span's pointwise mutual information with the question, tells the spans
the question makes likely from the ones the model likes anyway (short, frequent words).

The two prompts share everything up to their question: that runs once, and its key/value
cache is shared by every candidate, so scoring costs one pass over the context plus one
pass over both questions and all the spans' few tokens, packed into one row (each span
sees the context, its own question and itself only).

Deliberately left out: retrieval and evidence selection (``rag``), and deciding
whether to answer at all (``rag``'s abstention uses ``Reading.confidence``).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Sequence

from . import text as T

READER_SYSTEM = (
    "Answer the question with a short phrase copied exactly from the context. "
    "Do not write a sentence."
)
# Worked examples before the real question (in-context demonstrations): they show a small model that the answer
# is the shortest exact span, of the kind the question asks for (a date, a name, a mechanism, a measure). Made up
# for this purpose, none from the dev sets. On the dev sets' candidates they raised the LM-only pick's F1 on
# qa_dev_covid 19.5 -> 22.4 (squad2 33.5 either way) and the fitted reader's held-out figures by about +1.
# They are the same for every question, so their key/value cache is computed once (``SpanScorer``).
READER_SHOTS = (
    ("The Eiffel Tower was completed in 1889 for the World's Fair in Paris, and it was the tallest structure "
     "in the world until 1930.", "When was the Eiffel Tower completed?", "1889"),
    ("Penicillin was discovered in 1928 by Alexander Fleming, a Scottish physician working at St Mary's "
     "Hospital in London.", "Who discovered penicillin?", "Alexander Fleming"),
    ("The patients were treated with remdesivir, an antiviral drug that blocks the viral RNA polymerase.",
     "How does remdesivir work?", "blocks the viral RNA polymerase"),
    ("The Danube flows through ten countries and is about 2,850 kilometres long, the second longest river "
     "in Europe.", "How long is the Danube?", "about 2,850 kilometres"),
)


# The question of the "pmi" feature's reference prompt: the same context, asking for nothing in particular (the
# domain-conditional PMI of Holtzman et al. 2021, "Surface Form Competition", with the context as the domain).
NULL_QUESTION = "What does the context mention?"


@dataclass
class Candidate:
    span: T.Span
    sentence_index: int  # which evidence sentence (0 = best)
    logprob: float = 0.0  # log p(span tokens + end | prompt)
    tokens: int = 0
    echo: float = 0.0  # share of the span's content words that are in the question
    kind_match: bool = False
    score: float = 0.0


@dataclass
class Reading:
    answer: str  # "" when no candidate
    sentence_index: int = -1
    candidates: list[Candidate] = field(default_factory=list)
    confidence: float = 0.0  # softmax probability of the chosen span among the candidates


def _last_logits_only(model) -> dict:
    """``logits_to_keep=1`` where the model takes it: the vocabulary projection for the last position only."""
    import inspect

    return {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}


class SpanScorer:
    """Scores candidate continuations after one shared prompt, with a causal LM (a ``generation.Generator``)."""

    def __init__(self, generator):
        self.gen = generator
        tok = generator.tokenizer
        self.end_id = generator.eos_ids[0]
        self._tok = tok
        self._prefix: tuple[list[int], object] | None = None  # (token ids, KV cache) of the static messages

    def encode_continuation(self, text: str) -> list[int]:
        return self._tok(text, add_special_tokens=False)["input_ids"]

    def _prompt_cache(self, prompt_ids: list[int], static: int, cache_kw: str):
        """The key/value cache after ``prompt_ids``. Its first ``static`` tokens (the messages every question
        shares) are computed once and copied; the rest runs on top of the copy."""
        import torch
        from transformers import DynamicCache

        model, device = self.gen.model, self.gen.device
        last = _last_logits_only(model)  # no logits needed here: the packed row predicts every span's tokens
        if static and self._prefix is not None and self._prefix[0] == prompt_ids[:static]:
            cache = copy.deepcopy(self._prefix[1])
        else:
            cache = DynamicCache()
            if static:
                model(input_ids=torch.tensor([prompt_ids[:static]], device=device), use_cache=True,
                      **{cache_kw: cache}, **last)
                self._prefix = (prompt_ids[:static], copy.deepcopy(cache))
        if len(prompt_ids) > static:
            model(input_ids=torch.tensor([prompt_ids[static:]], device=device), use_cache=True, **{cache_kw: cache},
                  **last)
        return cache

    def score(self, messages, continuations: Sequence[str], static_messages: int = 0) -> list[tuple[float, int]]:
        """(sum log p(tokens + end), token count) per continuation, natural log.

        ``static_messages``: how many leading messages are the same on every call (the system prompt and the
        worked examples); their tokens are encoded once per scorer and their cache reused.
        """
        return self.score_prompts([messages], continuations, static_messages)[0]

    def score_prompts(self, prompts: Sequence, continuations: Sequence[str],
                      static_messages: int = 0) -> list[list[tuple[float, int]]]:
        """``score`` for each of several prompts (message lists) that share their beginning, in one pass.

        The prompts' common tokens (the worked examples and the context) run once. Then every prompt's own
        remaining tokens (its question) and each continuation after it go in ONE row: a block-diagonal causal
        mask lets each continuation see the common prefix, its own prompt's tail and its own earlier tokens only,
        at the positions it would have alone. No padding and no per-candidate copy of the cache.
        """
        import torch

        from .generation import cache_keyword, eval_mode, format_chat

        gen = self.gen
        encoded = [gen.encode(gen.format_prompt(m)) for m in prompts]
        shortest = min(len(ids) for ids in encoded)
        common = 0  # every prompt keeps at least one token of its own: its last position predicts a span's first
        while common < shortest - 1 and all(ids[common] == encoded[0][common] for ids in encoded):
            common += 1
        static = 0
        if static_messages:
            head = gen.encode(format_chat(gen.tokenizer, prompts[0][:static_messages], add_generation_prompt=False))
            # The chat template renders each message on its own, so the shared messages' tokens are a prefix of
            # the whole prompt's. A template that breaks that gets everything encoded each time.
            static = len(head) if len(head) <= common and encoded[0][: len(head)] == head else 0
        conts = [self.encode_continuation(c) + [self.end_id] for c in continuations]
        if not conts:
            return [[] for _ in prompts]
        # The packed row: per prompt, its tail, then each continuation but its last token. Each piece is
        # (tokens, position of the first, index of the prompt tail it sees: None for a tail itself).
        pieces: list[tuple[list[int], int, int | None]] = []
        tails = []  # per prompt, the index of its tail piece; its continuations follow it
        for ids in encoded:
            tails.append(len(pieces))
            pieces.append((ids[common:], common, None))
            pieces += [(c[:-1], len(ids), tails[-1]) for c in conts]
        starts, at = [], 0
        for tokens, _, _ in pieces:
            starts.append(at)
            at += len(tokens)
        width = at
        model = gen.model
        cache_kw = cache_keyword(model)
        with eval_mode(model), torch.inference_mode():
            cache = self._prompt_cache(encoded[0][:common], static, cache_kw)
            ids = torch.tensor([[t for tokens, _, _ in pieces for t in tokens]], dtype=torch.long, device=gen.device)
            positions = torch.tensor([[first + j for tokens, first, _ in pieces for j in range(len(tokens))]],
                                     device=gen.device)
            allowed = torch.zeros((width, common + width), dtype=torch.bool)
            allowed[:, :common] = True
            for n, (tokens, _, tail) in enumerate(pieces):
                k, a = len(tokens), starts[n]
                allowed[a : a + k, common + a : common + a + k] = torch.tril(torch.ones((k, k), dtype=torch.bool))
                if tail is not None:
                    t0, tk = starts[tail], len(pieces[tail][0])
                    allowed[a : a + k, common + t0 : common + t0 + tk] = True
            dtype = next(model.parameters()).dtype
            mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)
            logits = model(input_ids=ids, position_ids=positions, attention_mask=mask[None, None].to(gen.device),
                           use_cache=True, **{cache_kw: cache}).logits[0]
            lps = torch.log_softmax(logits.float(), dim=-1)  # (width, V): row t predicts the token after t
            out = []
            for tail in tails:
                last = starts[tail] + len(pieces[tail][0]) - 1  # the prompt's last token predicts the first
                row = []
                for i, c in enumerate(conts):
                    n = tail + 1 + i
                    total = float(lps[last, c[0]])
                    if len(c) > 1:
                        tgt = torch.tensor(c[1:], device=lps.device)
                        total += float(lps[starts[n] : starts[n] + len(c) - 1].gather(1, tgt[:, None]).sum())
                    row.append((total, len(c)))
                out.append(row)
        return out


# Two embedding columns were dropped in stop 27: "cloze" (the question's cosine to the sentence with the span
# replaced by its wh-word) and "gain" (that minus the sentence's own cosine). Fitted on articles the fit never saw
# they added nothing ("near", "slot" and the LM carry what they did; bench/README "Stop 27"), and they cost a
# MiniLM pass over a rewritten sentence per candidate on every question.
FEATURES = (
    "near",  # idf-weighted closeness of the question's words, outside the span, to the span (answers sit beside them)
    "echo",  # share of the span's content words that the question already has (an answer rarely repeats it)
    "kind_match",  # the span is the kind the question word asks for (who -> name, when -> date, ...)
    "kind_other",  # the question asks for a kind and the span is another one
    "first_sentence",  # the span is in the best evidence sentence
    "sentence_score",  # that sentence's evidence score
    "log_words",  # log of the span's length in words
    "is_name", "is_number", "is_date",  # base rates of the kinds (phrase is the reference)
    "lm",  # the language model's log p(span + end | prompt) minus the best candidate's (0 without a model)
    "is_clause",  # a clause (only proposed for how/why/what-methods questions: text.asks_for_description)
    # lm minus the same span's log p after the same context and NULL_QUESTION (pointwise mutual information with
    # the question): the LM alone also rewards spans that are likely whatever was asked (short, frequent ones)
    "pmi",
    # the words just before the span match the words just before the question's slot (``text.slot_words``: "lined
    # with what?" -> "lined with [an epithelium]"; a preposition stranded at the end of a fronted question)
    "slot",
)


def features(question: str, sentences: Sequence[str], sentence_scores: Sequence[float], idf,
             max_words: int = T.MAX_SPAN_WORDS) -> tuple[list[tuple[int, T.Span]], object]:
    """Candidate spans of ``sentences`` and their feature rows (n, len(FEATURES)); ``lm`` and ``pmi`` left at 0."""
    import numpy as np

    qkind = T.question_kind(question)
    qwords = T.content_words(question)
    slot = T.slot_words(question)
    q_idf = sum(idf(w) for w in qwords) or 1.0
    describe = T.asks_for_description(question)
    cands: list[tuple[int, T.Span]] = []
    for si, s in enumerate(sentences):
        spans = T.answer_spans(s, max_words=max_words, clauses=describe, lists=True)
        if describe:
            spans += _clause_tails(s, qwords, {(sp.start, sp.end) for sp in spans})
        for sp in spans:
            if T.content_words(sp.text) and not T.content_words(sp.text) <= qwords:  # pure echoes never answer
                cands.append((si, sp))
    if not cands:
        return [], np.zeros((0, len(FEATURES)), dtype=np.float32)
    toks = [T.tokens(s) for s in sentences]
    X = np.zeros((len(cands), len(FEATURES)), dtype=np.float32)
    for n, (si, sp) in enumerate(cands):
        words = T.content_words(sp.text)
        near = 0.0
        inside = [i for i, t in enumerate(toks[si]) if t.start >= sp.start and t.end <= sp.end]
        a, b = (inside[0], inside[-1]) if inside else (0, 0)
        seen: set[str] = set()
        for i, t in enumerate(toks[si]):
            w = T.stem(t.text.lower())
            if a <= i <= b or w not in qwords or w in seen:
                continue
            seen.add(w)
            near += idf(w) / (a - i if i < a else i - b)
        X[n] = (
            near / q_idf, len(words & qwords) / max(1, len(words)),
            float(T.kind_matches(qkind, sp.kind)), float(qkind is not None and not T.kind_matches(qkind, sp.kind)),
            float(si == 0), float(sentence_scores[si]), math.log(max(1, sp.words)),
            float(sp.kind == T.NAME), float(sp.kind == T.NUMBER), float(sp.kind == T.DATE), 0.0,
            float(sp.kind == T.CLAUSE), 0.0,
            T.slot_match(slot, T.words_before(toks[si], sp.start)) if slot else 0.0,
        )
    return cands, X


_CLAUSE_END = {",", ";", ":", "(", ")", ".", "?", "!"}


def _clause_tails(sentence: str, qwords: set[str], taken: set[tuple[int, int]]) -> list[T.Span]:
    """What follows the question's words up to the end of their clause: "... validated [using cultured viruses ...]"."""
    toks = T.tokens(sentence)
    out = []
    for i, t in enumerate(toks):
        if T.stem(t.text.lower()) not in qwords:
            continue
        j = i + 1
        while j < len(toks) and (T.stem(toks[j].text.lower()) in qwords or not toks[j].text[:1].isalnum()) \
                and toks[j].text not in _CLAUSE_END:
            j += 1  # skip the rest of the question's words
        k = j
        while k < len(toks) and toks[k].text not in _CLAUSE_END:
            k += 1
        words = [x for x in toks[j:k] if x.text[:1].isalnum()]
        if 2 <= len(words) <= T.MAX_CLAUSE_WORDS:
            start, end = words[0].start, words[-1].end
            if (start, end) not in taken:
                taken.add((start, end))
                out.append(T.Span(sentence[start:end], start, end, T.CLAUSE))
    return out


class ExtractiveReader:
    """Picks the answer span: a linear score over ``FEATURES`` (weights in ``config.ReaderConfig``).

    With ``scorer`` (a ``SpanScorer``), the best ``lm_rerank`` candidates by the other
    features also get the model's log-likelihood; without one the reader needs no LM.
    """

    def __init__(self, weights: Sequence[float], *, idf=None, scorer: SpanScorer | None = None,
                 lm_rerank: int = 0, max_words: int = T.MAX_SPAN_WORDS):
        if len(weights) != len(FEATURES):
            raise ValueError(f"{len(FEATURES)} reader weights needed, got {len(weights)}")
        import numpy as np

        self.idf = idf or (lambda word: 1.0)  # the store's BM25 idf (KnowledgeBase.idf); flat without one
        self.w = np.asarray(weights, dtype=np.float32)
        self.scorer = scorer
        self.lm_rerank = lm_rerank
        self.max_words = max_words

    def features(self, question: str, sentences: Sequence[str], sentence_scores: Sequence[float]):
        return features(question, sentences, sentence_scores, self.idf, self.max_words)

    def scored(self, question: str, sentences: Sequence[str], sentence_scores: Sequence[float], *,
               hint: str = "", hint_weight: float = 0.0, every_column: bool = False):
        """(candidates, feature rows with the ``lm`` column filled, per-candidate bonus from ``hint``).

        The best ``lm_rerank`` candidates by the other features (and the bonus) get log p(span)
        minus the best one's, and the same for its PMI with the question; the rest a value worse than
        any of them. This is the one place the LM columns are made, for answering (``read``) and for
        fitting (bench/fit_reader.py, with ``every_column``: each LM column made, even one weighted 0).
        """
        import numpy as np

        cands, X = self.features(question, sentences, sentence_scores)
        bonus = np.zeros(len(cands), dtype=np.float32)
        if hint and hint_weight:
            bonus += hint_weight * np.array([T.token_f1(sp.text, [hint]) for _, sp in cands], dtype=np.float32)
        lm_col, pmi_col = FEATURES.index("lm"), FEATURES.index("pmi")
        want_pmi = bool(every_column or self.w[pmi_col])
        if cands and self.scorer is not None and self.lm_rerank and (want_pmi or self.w[lm_col]):
            top = np.argsort(-(X @ self.w + bonus))[: self.lm_rerank]
            texts = [cands[i][1].text for i in top]
            messages = reader_messages(question, sentences)
            prompts = [messages]
            if want_pmi:
                prompts.append(reader_messages(NULL_QUESTION, sentences))  # the same context: scored in one pass
            scores = self.scorer.score_prompts(prompts, texts, static_messages=len(messages) - 1)
            lps = np.array([lp for lp, _ in scores[0]])
            columns = [(lm_col, lps)]
            if want_pmi:
                columns.append((pmi_col, lps - np.array([lp for lp, _ in scores[1]])))
            for col, values in columns:
                fill_reranked(X[:, col], top, values)
        return cands, X, bonus

    def read(self, question: str, sentences: Sequence[str], sentence_scores: Sequence[float], *,
             hint: str = "", hint_weight: float = 0.0) -> Reading:
        """The best span. ``hint``: another system's answer (the hybrid's fine-tuned draft); a candidate
        gets ``hint_weight`` x its token F1 with the hint, so the draft votes among the document's spans."""
        import numpy as np

        cands, X, bonus = self.scored(question, sentences, sentence_scores, hint=hint, hint_weight=hint_weight)
        if not cands:
            return Reading("")
        scores = X @ self.w + bonus
        p = np.exp(scores - scores.max())
        p /= p.sum()
        best = int(np.argmax(scores))
        out = [Candidate(sp, si, score=float(scores[i])) for i, (si, sp) in enumerate(cands)]
        return Reading(cands[best][1].text, cands[best][0], out, float(p[best]))


def fill_reranked(column, top, values) -> None:
    """Fill a feature column (in place) that only the reranked candidates ``top`` have: their ``values`` minus
    the best of them, and for every other candidate a value worse than any reranked one."""
    import numpy as np

    column[top] = values - values.max()
    column[np.setdiff1d(np.arange(len(column)), top)] = min(column[top].min() - 1.0, -10.0)


def reader_messages(question: str, sentences: Sequence[str]) -> list[dict]:
    """System prompt, the worked examples (READER_SHOTS) as earlier turns, then this question: all but the
    last message are the same for every question."""
    messages = [{"role": "system", "content": READER_SYSTEM}]
    for context, q, answer in READER_SHOTS:
        messages += [{"role": "user", "content": f"Context:\n{context}\n\nQuestion: {q}"},
                     {"role": "assistant", "content": answer}]
    context = "\n".join(sentences)
    return messages + [{"role": "user", "content": f"Context:\n{context}\n\nQuestion: {question}"}]
