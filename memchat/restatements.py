"""Restatements of a chunk's facts that need no generator: part (d) of the training mix.

Knowledge-injection studies find that a fact seen in one phrasing is stored but not
extractable; many diverse restatements make it answerable (Allen-Zhu & Li 2023,
arXiv 2309.14316; Ovadia et al. 2023, arXiv 2312.05934). A 135M generator writes few
usable questions, so these are made from the sentences themselves, with the
candidate answer spans of ``memchat.text.answer_spans`` (the same spans the RAG
reader scores, so span answers look alike in RAG and fine-tuning):

- ``wh``     the span replaced by its question word: "Who proposed the theory of ...?" -> "Maxwell"
- ``cloze``  the sentence with the span blanked:   "Fill in the blank: ___ proposed ..." -> "Maxwell"
- ``about``  "What does the document say about X?" (X a name or phrase of the sentence) -> the sentence
- ``facts``  "List the facts about X." for a name in two or more sentences -> those sentences, one per line

Short span answers stand next to the sentence-level ``about`` answer, so the model learns
both the fact's sentence and its short answer. Deliberately left out: model calls, the
split and files (``memchat.extraction``); grammar beyond swapping a span for its
question word (an echo question such as "The Rhine flows into what?" is a fine cue).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .text import DATE, NAME, NUMBER, PHRASE, answer_spans, content_words, normalize, wh_word

MIN_SENTENCE_WORDS = 6  # shorter pieces are headings, captions, page furniture
MAX_SPAN_SHARE = 0.6  # a span covering most of its sentence leaves nothing to ask with
MAX_PHRASE_WORDS = 4  # longer "phrases" are clauses, not answers
_KIND_RANK = {DATE: 0, NUMBER: 1, NAME: 2, PHRASE: 3}  # facts people ask about first
_LEAD_PREPOSITION = re.compile(r"\b(in|on|by|since|until|from|during|at)\s+$", re.IGNORECASE)


@dataclass(frozen=True)
class Item:
    kind: str  # "wh" | "cloze" | "about" | "facts"
    question: str
    answer: str
    answer_kind: str | None = None  # the span's kind (date/number/name/phrase) for wh and cloze


def _clean(sentence: str) -> str:
    return " ".join(sentence.split())


def choose_spans(sentence: str, limit: int):
    """Up to ``limit`` non-overlapping spans worth asking about, dates/numbers/names first."""
    n_words = len(sentence.split())
    picked = []
    spans = [s for s in answer_spans(sentence)
             if content_words(s.text) and s.words <= MAX_SPAN_SHARE * n_words
             and not (s.kind == PHRASE and s.words > MAX_PHRASE_WORDS)]
    # prefer: kind, then longer (a whole name over its first word), then earlier
    spans.sort(key=lambda s: (_KIND_RANK[s.kind], -s.words, s.start))
    for s in spans:
        if len(picked) >= limit:
            break
        if any(s.start < p.end and p.start < s.end for p in picked):
            continue
        picked.append(s)
    return sorted(picked, key=lambda s: s.start)


def wh_question(sentence: str, span) -> str:
    """The sentence as a question whose answer is ``span``: the span replaced by its question word."""
    before, after = sentence[: span.start], sentence[span.end :]
    # "who" only opens a sentence (a subject is most often a person); inside one a name is
    # as often a place or a body, so "what"
    word = wh_word(span.kind) if span.kind != NAME or not before.strip() else "What"
    if span.kind == DATE:  # "in 1867" -> "when"
        before = _LEAD_PREPOSITION.sub("", before)
    after = after.rstrip().rstrip(".!;:")
    if not before.strip():
        q = f"{word} {after.lstrip(' ,')}"
    else:
        q = f"{before.rstrip()} {word.lower()}{after}" if not before.endswith(" ") else f"{before}{word.lower()}{after}"
    q = " ".join(q.split()).rstrip(" ,")
    return q[0].upper() + q[1:] + "?"


def cloze_question(sentence: str, span) -> str:
    return "Fill in the blank: " + sentence[: span.start] + "___" + sentence[span.end :]


def topic_of(sentence: str):
    """The name (else the longest phrase) a sentence is about, or None."""
    spans = [s for s in answer_spans(sentence) if content_words(s.text)]
    names = [s for s in spans if s.kind == NAME]
    if names:
        return max(names, key=lambda s: (s.words, -s.start))
    phrases = [s for s in spans if s.kind == PHRASE and 1 <= s.words <= 3]
    return max(phrases, key=lambda s: (s.words, -s.start)) if phrases else None


def restate(sentences: list[str], *, spans_per_sentence: int = 2, fact_lists: bool = True,
            max_fact_sentences: int = 4) -> list[Item]:
    """The restatements of one chunk's sentences (in document order, duplicates removed)."""
    items: list[Item] = []
    usable = _usable(sentences)
    for s in usable:
        for span in choose_spans(s, spans_per_sentence):
            items.append(Item("wh", wh_question(s, span), span.text, span.kind))
            items.append(Item("cloze", cloze_question(s, span), span.text, span.kind))
        topic = topic_of(s)
        if topic is not None:
            items.append(Item("about", f"What does the document say about {topic.text}?", s))
    if fact_lists:
        by_name: dict[str, list[str]] = {}
        shown: dict[str, str] = {}
        for s in usable:
            for span in answer_spans(s):
                if span.kind == NAME and content_words(span.text):
                    key = normalize(span.text)
                    shown.setdefault(key, span.text)
                    if s not in by_name.setdefault(key, []):
                        by_name[key].append(s)
        for key, ss in by_name.items():
            if len(ss) >= 2:
                facts = "\n".join(f"- {x}" for x in ss[:max_fact_sentences])
                items.append(Item("facts", f"List the facts the document gives about {shown[key]}.", facts))
    seen: set[str] = set()
    out = []
    for it in items:
        key = normalize(it.question)
        if key and key not in seen:
            seen.add(key)
            out.append(it)
    return out


def probe_items(sentences: list[str], *, spans_per_sentence: int = 2) -> list[Item]:
    """wh questions about the spans ``restate`` does NOT ask about, for held-out validation.

    ``restate`` asks about the first ``spans_per_sentence`` spans of each sentence (``choose_spans``'s order);
    these ask about the next ones. The sentence is trained on (the chunk's text, its "about" item, the wh and
    cloze items of its other spans), but never this question or this answer: a short-answer question about a
    fact the model was taught, the shape of a question people ask. Nothing is taken out of training for them.
    """
    items: list[Item] = []
    seen: set[str] = set()
    for s in _usable(sentences):
        # choose_spans picks greedily, so its first picks are restate's; the rest overlap none of them
        trained = {(sp.start, sp.end) for sp in choose_spans(s, spans_per_sentence)}
        for span in choose_spans(s, len(s.split())):
            question = wh_question(s, span)
            key = normalize(question)
            if (span.start, span.end) not in trained and key and key not in seen:
                seen.add(key)
                items.append(Item("wh", question, span.text, span.kind))
    return items


def _usable(sentences: list[str]) -> list[str]:
    """Whole sentences long enough to ask about."""
    usable = [_clean(s) for s in sentences]
    # a piece that starts in lower case is the tail of a sentence cut at the chunk's start (overlap)
    return [s for s in usable if len(s.split()) >= MIN_SENTENCE_WORDS and not s.endswith("?") and not s[:1].islower()]


# Surface paraphrases for when the generator writes none (SmolLM2-135M keeps about 1 in 64):
# the same question in other framings, so the answer is not tied to one exact prompt.
_FRAMES = (
    "According to the document, {q}",
    "{Q} Answer from the document.",
    "Based on what you read: {Q}",
    "Quick question: {Q}",
    "From the text, {q}",
)


def template_paraphrases(question: str, n: int) -> list[str]:
    """``n`` framings of ``question`` (deterministic: chosen by a hash of the question)."""
    import hashlib

    q = question.strip()
    if not q or n <= 0:
        return []
    start = int(hashlib.md5(normalize(q).encode()).hexdigest()[:8], 16) % len(_FRAMES)
    lower = q[0].lower() + q[1:] if not (len(q) > 1 and q[1].isupper()) else q
    out = []
    for k in range(min(n, len(_FRAMES))):
        out.append(_FRAMES[(start + k) % len(_FRAMES)].format(q=lower, Q=q))
    return out
