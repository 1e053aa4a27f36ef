"""Questions, answers and paraphrases from chunks: prompts, tolerant parsing, repair, filters, split.

Small instruct models (SmolLM2-135M, Qwen2.5 0.5B-7B) break structured output all
the time, so nothing here asks for JSON. The prompts ask for the simplest format a
small model follows (one question per line after "Q:"; a plain answer), and the
parsers accept what they actually write: numbered lists, "Question 1:" labels,
several questions run together on one line, an answer after each question,
markdown, a missing "?", an echo of the question, a sentence cut at the token
limit. Every repair and every rejection is counted by cause in a ``Tally``; no
input makes a parser raise.

The grounding checks are lexical (content words of the answer found in the chunk)
so they are cheap, deterministic and explainable; the extractor adds the
embedding checks (near-duplicates, answer-vs-chunk cosine) on top. When a model's
answer fails them, ``best_sentence`` gives the extractive repair: the chunk
sentence that best answers the question.

Deliberately left out: models and embeddings (the caller passes vectors in),
files and resume (``memchat.extraction``).
"""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from .chunking import split_sentences
from .text import STOPWORDS, WORD as _WORD, content_words, normalize  # noqa: F401  (qa.normalize, qa.content_words stay importable)

# Bump when a prompt's wording, a parser or a per-chunk filter changes: cached chunk
# results made by another version are regenerated instead of being mixed in.
PIPELINE_VERSION = 2  # 2: model answers split by chunking.split_sentences; names keep their initials

Messages = list[dict]

# ---------------------------------------------------------------------------
# Prompts
# ---------------------------------------------------------------------------
QUESTION_SYSTEM = "You write exam questions about a text. Every question must be answered by the text itself."
ANSWER_SYSTEM = "You answer questions using only the given text. Answer in one or two complete sentences."


def flatten(text: str) -> str:
    """PDF line breaks inside paragraphs -> spaces; paragraphs kept apart (small models read prose better)."""
    paragraphs = (" ".join(p.split()) for p in re.split(r"\n\s*\n", text))
    return "\n\n".join(p for p in paragraphs if p)


def question_prompt(text: str, n: int) -> Messages:
    """Ask for ``n`` questions about one chunk, one per line after "Q:"."""
    ask = (
        'Write one question that this text answers. Start it with "Q:". Write only the question, no answer.'
        if n == 1
        else f"Write {n} different questions that this text answers. Put each question on its own line "
        'and start it with "Q:". Write only the questions, no answers.'
    )
    user = f'Text:\n"""\n{flatten(text)}\n"""\n\n{ask}'
    return [{"role": "system", "content": QUESTION_SYSTEM}, {"role": "user", "content": user}]


def strict_question_prompt(sentence: str) -> Messages:
    """The stricter retry: one question about one sentence, nothing else to format."""
    user = f"Sentence: {sentence.strip()}\n\nWrite one question that this sentence answers. Reply with the question only."
    return [{"role": "user", "content": user}]


def answer_prompt(question: str, evidence: str) -> Messages:
    """Ask for a self-contained answer from the chunk's most relevant sentences."""
    user = f"Text:\n{evidence.strip()}\n\nQuestion: {question.strip()}"
    return [{"role": "system", "content": ANSWER_SYSTEM}, {"role": "user", "content": user}]


def variation_prompt(question: str, n: int) -> Messages:
    """Ask for ``n`` paraphrases of a question, one per line after "Q:"."""
    user = (
        f"Rewrite the question below in {n} different ways that keep its meaning. "
        f'Write each on its own line, starting with "Q:".\n\nQuestion: {question.strip()}'
    )
    return [{"role": "user", "content": user}]


# Stop strings: a small model that keeps going after its answer starts a new
# "Question:" turn; cutting there saves the tokens and the cleanup.
ANSWER_STOP = ["\nQuestion:", "\nQ:", "\n\n\n"]
# An empty label repeated ("Q: Q: Q: ...") is a loop SmolLM2 falls into; nothing useful follows it.
LIST_STOP = ["Q: Q:", "Q:\nQ:"]


def question_tokens(n: int) -> int:
    """Token budget for n questions (~20 tokens each plus slack; SmolLM2 rambles past it)."""
    return 24 * n + 24


def variation_tokens(n: int) -> int:
    return 22 * n + 16


# ---------------------------------------------------------------------------
# Counting
# ---------------------------------------------------------------------------
@dataclass
class Tally:
    """Counts by cause: what was repaired, what was dropped (and why)."""

    repaired: Counter = field(default_factory=Counter)
    dropped: Counter = field(default_factory=Counter)

    def update(self, other: "Tally") -> None:
        self.repaired.update(other.repaired)
        self.dropped.update(other.dropped)

    def as_dict(self) -> dict:
        return {"repaired": dict(sorted(self.repaired.items())), "dropped": dict(sorted(self.dropped.items()))}


# ---------------------------------------------------------------------------
# Text helpers
# ---------------------------------------------------------------------------
_STOP = STOPWORDS  # one stop-word list for the query path and the training data (memchat.text)
_INTERROGATIVE = frozenset(
    """what who whom whose which when where why how is are was were do does did can could should would will
    has have had in on at according name list describe explain""".split()
)


def share_in(text: str, source_words: set[str]) -> float:
    """Fraction of ``text``'s content words found in ``source_words`` (1.0 for none). Not `rag.support`, which counts
    only the words an answer adds beyond its question."""
    words = content_words(text)
    if not words:
        return 1.0
    return len(words & source_words) / len(words)


def word_count(text: str) -> int:
    return len(text.split())


_CLOSERS = "\"')]}»”’"


def ends_sentence(text: str) -> bool:
    return text.rstrip(_CLOSERS + " ").endswith((".", "!", "?", "…", "。"))


# ---------------------------------------------------------------------------
# Question parsing
# ---------------------------------------------------------------------------
_FENCE = re.compile(r"```[a-zA-Z]*")
_SPECIAL = re.compile(r"<\|[^|>]{1,30}\|>")
_MARKUP = re.compile(r"\*\*|__|(?<!\w)\*(?!\s)|`")
# A label that starts a question: "Q:", "Q1.", "Question 2:", "1.", "2)", "- ", "•"...
_LABEL = re.compile(
    r"^\s*(?:[-*•>#]+\s*)?(?:\(?\d{1,2}\s*[.):\]]\s*)?"
    r"(?:(?:q|question|variation|paraphrase|rewrite|rephrased|version|option)\s*#?\d{0,2}\s*[:.)\-]\s*|[a-d]\s*[:)]\s+)?",
    re.IGNORECASE,
)
# A label inside a line where a new question begins: "...? Q: What", "...? 2. How", "...? Question 3: Why"
_INLINE_LABEL = re.compile(
    r"(?<=[?.!:])\s+(?=(?:\(?\d{1,2}[.)]\s+|(?:q|question)\s*\d{0,2}\s*[:.)]\s*)\S)", re.IGNORECASE
)  # "... can be rewritten as: Q: What ...?" -> the remark, then the question
_RUN_ON = re.compile(r"(?<=\?)[\"'”’)]*\s+(?=[\"'“‘(]?[A-Z0-9])")  # "...? How ..." -> two questions
# A label that starts an answer, not a question: "A:", "A1:", "Answer:", "B:" (SmolLM2 letters them)
_ANSWER_LABEL = re.compile(r"^\s*(?:\(?\d{1,2}[.)]\s*)?(?:[A-D]\d{0,2}|answers?|response|explanation)\s*[:)]", re.IGNORECASE)
_INLINE_ANSWER = re.compile(r"\s+(?:answers?|a\d{0,2})\s*:\s+.*$", re.IGNORECASE)
_PLACEHOLDER = re.compile(r"<[^<>]{0,40}>|\[[^\[\]]{0,40}\]|\.\.\.\s*\?$|^\W*$")
_META = re.compile(
    r"\b(?:next question|this question|the question|the answer|(?:this|the|original|given) (?:text|passage|article|"
    r"sentence|paragraph)|(?:this|given|original) context|the context above|the above|described above|"
    r"mentioned above|write \d|these questions|would you like|can i help|do you want)\b",
    re.IGNORECASE,
)

MIN_QUESTION_WORDS = 3
MAX_QUESTION_WORDS = 40


@dataclass
class Parsed:
    items: list[str]
    tally: Tally


def _clean_markup(text: str) -> str:
    text = unicodedata.normalize("NFKC", text)
    text = _SPECIAL.sub(" ", text)
    text = _FENCE.sub(" ", text)
    return _MARKUP.sub("", text)


def _segments(text: str, tally: Tally) -> list[str]:
    """Split model output into candidate pieces, one question each (at most)."""
    pieces: list[str] = []
    for line in text.splitlines():
        if not line.strip():
            continue
        parts = _INLINE_LABEL.split(line)
        split_more: list[str] = []
        for part in parts:
            run_on = _RUN_ON.split(part)
            split_more.extend(run_on)
        if len([p for p in split_more if p.strip()]) > 1:
            tally.repaired["split_run_on"] += 1
        pieces.extend(p for p in split_more if p.strip())
    return pieces


def clean_question(piece: str, tally: Tally, *, last_truncated: bool = False, alone: bool = False) -> str | None:
    """One candidate piece -> a clean question, or None (the reason is counted).

    A piece without "?" counts as a question only when it starts like one and the
    model marked it as one (a "Q:"/number label), or it is the whole, short output:
    "When rocks melt, they form magma" must not become a question.
    """
    if _ANSWER_LABEL.match(piece) and not piece.rstrip().endswith("?"):
        tally.repaired["answer_text_removed"] += 1
        return None
    stripped = piece.lstrip()
    for _ in range(3):  # "A: Q: What ...?", "1. Question 1: What ...?"
        new = _LABEL.sub("", stripped, count=1)
        if new == stripped:
            break
        stripped = new
    labelled = stripped != piece.lstrip()
    if labelled:
        tally.repaired["label_removed"] += 1
    q = stripped.strip().strip("\"'“”‘’").strip()
    if _PLACEHOLDER.search(q):
        tally.dropped["placeholder"] += 1
        return None
    # "Question? Answer: ..." on one line
    if "?" in q:
        head, _, tail = q.partition("?")
        if _WORD.search(tail):
            tally.repaired["trailing_text_removed"] += 1
        q = head.strip() + "?"
    else:
        cut = _INLINE_ANSWER.sub("", q)
        if cut != q:
            tally.repaired["trailing_text_removed"] += 1
            q = cut.strip()
        first = (q.split() or [""])[0].lower().strip(",")
        if first not in _INTERROGATIVE or not (labelled or (alone and word_count(q) <= 15)):
            return None  # prose, not a question: not counted as a failure (models add remarks)
        if last_truncated:
            tally.dropped["truncated"] += 1
            return None
        q = q.rstrip(" .:;,!") + "?"
        tally.repaired["question_mark_added"] += 1
    q = re.sub(r"\s+", " ", q).strip()
    q = re.sub(r"\s+\?$", "?", q)
    words = word_count(q)
    if words < MIN_QUESTION_WORDS:
        tally.dropped["too_short"] += 1
        return None
    if words > MAX_QUESTION_WORDS:
        tally.dropped["overlong"] += 1
        return None
    if q[0].islower():
        q = q[0].upper() + q[1:]
    return q


def _unpack_json(text: str) -> str | None:
    """A JSON list/object of questions (models trained on JSON tasks write them) -> one per line."""
    body = text.strip()
    if not body.startswith(("{", "[")):
        return None
    try:
        data = json.loads(body)
    except json.JSONDecodeError:
        strings = re.findall(r'"((?:[^"\\]|\\.){3,}?)"', body)  # cut-off JSON: take the quoted strings
        return "\n".join(strings) if strings else None
    found: list[str] = []

    def walk(x) -> None:
        if isinstance(x, str):
            found.append(x)
        elif isinstance(x, dict):
            for v in x.values():
                walk(v)
        elif isinstance(x, list):
            for v in x:
                walk(v)

    walk(data)
    return "\n".join(" ".join(f.split()) for f in found) if found else None


def parse_questions(text: str, *, truncated: bool = False, limit: int | None = None) -> Parsed:
    """Questions found in a model's output, in order, exact duplicates removed.

    ``truncated``: the output hit the token limit, so its last piece may be cut off.
    ``limit``: keep at most this many (extra ones are counted as ``over_limit``).
    """
    tally = Tally()
    text = _clean_markup(text or "")
    unpacked = _unpack_json(text)
    if unpacked is not None:
        tally.repaired["json_unpacked"] += 1
        text = unpacked
    pieces = _segments(text, tally)
    out: list[str] = []
    seen: set[str] = set()
    for i, piece in enumerate(pieces):
        q = clean_question(piece, tally, last_truncated=truncated and i == len(pieces) - 1, alone=len(pieces) == 1)
        if q is None:
            continue
        if is_meta_question(q):  # "What is the answer to this question?", "What does the text say?"
            tally.dropped["about_the_text"] += 1
            continue
        key = normalize(q)
        if key in seen:
            tally.dropped["duplicate"] += 1
            continue
        seen.add(key)
        out.append(q)
    if limit is not None and len(out) > limit:
        tally.dropped["over_limit"] += len(out) - limit
        out = out[:limit]
    if not out:
        tally.dropped["no_question_in_output"] += 1
    return Parsed(out, tally)


def is_meta_question(question: str) -> bool:
    """Questions about the text or the task ("What does the text say?"), not about its content."""
    return bool(_META.search(question))


# ---------------------------------------------------------------------------
# Answer parsing
# ---------------------------------------------------------------------------
_ANSWER_PREFIX = re.compile(
    r"^\s*(?:(?:(?:the\s+)?answer(?:\s+to\s+[^:]{0,80})?|a|response)\s*[:\-]|the\s+(?:correct\s+)?answer\s+is\s*:?)\s*",
    re.IGNORECASE,
)
_ECHO = re.compile(r"^\s*(?:q|question)\s*\d{0,2}\s*:\s*[^\n]*\n", re.IGNORECASE)
_ECHO_INLINE = re.compile(r"^\s*(?:q|question)\s*\d{0,2}\s*:[^?\n]*(?:\?|$)", re.IGNORECASE)
_NEXT_TURN = re.compile(r"\s*(?:\n|\s)(?:q|question)\s*\d{0,2}\s*:.*$", re.IGNORECASE | re.DOTALL)
_PREAMBLE = re.compile(
    r"^\s*(?:(?:according to|based on|as (?:stated|mentioned) in|from|in) (?:the|this) (?:given )?"
    r"(?:text|passage|context|sentence|article)\s*,?\s*)",
    re.IGNORECASE,
)
_REFUSAL = re.compile(
    r"\b(?:i don'?t know|i do not know|i'?m (?:sorry|not sure)|cannot answer|can'?t answer|"
    r"(?:does|did) not (?:mention|say|provide|specify|contain|state)|not (?:mentioned|provided|specified|stated)|"
    r"no (?:information|mention)|unable to)\b",
    re.IGNORECASE,
)

MAX_ANSWER_WORDS = 90


def _unquote(text: str) -> str:
    """'"X" because Y' -> 'X because Y'; '"X."' -> 'X.' (a quoted answer keeps no stray quote)."""
    if text[:1] in "\"“":
        close = max(text.find("\"", 1), text.find("”", 1))
        if close > 0:
            return (text[1:close] + text[close + 1 :]).strip()
        return text[1:].strip()
    return text


def parse_answer(text: str, question: str = "", *, truncated: bool = False, max_words: int = MAX_ANSWER_WORDS):
    """A model's answer cleaned up -> (answer or None, Tally). The Tally says what was fixed or why it failed."""
    tally = Tally()
    a = _clean_markup(text or "").strip()
    if _ECHO.match(a):  # "Question: ...\nAnswer: ..."
        a = _ECHO.sub("", a, count=1)
        tally.repaired["question_echo_removed"] += 1
    elif _ECHO_INLINE.match(a):  # "Question: ...? Answer: ..." on one line
        a = _ECHO_INLINE.sub("", a, count=1)
        tally.repaired["question_echo_removed"] += 1
    if question and normalize(a).startswith(normalize(question)) and len(normalize(a)) > len(normalize(question)):
        a = a[len(question):] if a.startswith(question) else a.split("?", 1)[-1]
        tally.repaired["question_echo_removed"] += 1
    cut = _NEXT_TURN.sub("", a)
    if cut != a:
        tally.repaired["next_turn_removed"] += 1
        a = cut
    new = _ANSWER_PREFIX.sub("", a, count=1)
    if new != a:
        tally.repaired["label_removed"] += 1
        a = new
    new = _PREAMBLE.sub("", a, count=1)
    if new != a and new.strip():
        tally.repaired["preamble_removed"] += 1
        a = new.strip()
        a = a[0].upper() + a[1:]
    a = _unquote(re.sub(r"\s+", " ", a).strip())
    if not content_words(a):
        tally.dropped["empty"] += 1
        return None, tally
    if _REFUSAL.search(a):
        tally.dropped["refused"] += 1
        return None, tally
    sentences = split_sentences(a, max_chars=None)
    unique: list[str] = []
    for s in sentences:  # small models loop: "X. X. X."
        if normalize(s) not in {normalize(u) for u in unique}:
            unique.append(s)
    if len(unique) < len(sentences):
        tally.repaired["repetition_removed"] += 1
        sentences = unique
        a = " ".join(sentences)
    if truncated and not ends_sentence(a):
        complete = sentences[:-1]
        if complete and word_count(" ".join(complete)) >= 3:
            a = " ".join(complete)
            sentences = complete
            tally.repaired["cut_to_last_sentence"] += 1
        else:
            tally.dropped["truncated"] += 1
            return None, tally
    if word_count(a) > max_words:
        kept: list[str] = []
        for s in sentences:
            if word_count(" ".join(kept + [s])) > max_words:
                break
            kept.append(s)
        if not kept:
            tally.dropped["overlong"] += 1
            return None, tally
        a = " ".join(kept)
        tally.repaired["shortened"] += 1
    if not ends_sentence(a):
        a += "."
    if a[0].islower():
        a = a[0].upper() + a[1:]
    return a, tally


def _has_digit(word: str) -> bool:
    """A number or a decade ("1867", "1970s"): the kind small models invent (memchat.text keeps the "s")."""
    return word[:-1].isdigit() if word.endswith("s") and len(word) > 1 else word.isdigit()


def check_grounded(answer: str, question: str, chunk_words: set[str], min_support: float) -> str | None:
    """None when the answer is grounded in the chunk, else the reason it is not.

    The answer must add something beyond the question's own words, most of what
    it adds must be words of the chunk, and every number it adds must be in the chunk.
    """
    added = content_words(answer) - content_words(question)
    if not added:
        return "restates_question"
    if any(_has_digit(w) and w not in chunk_words for w in added):
        return "number_not_in_chunk"  # invented years and counts are the commonest small-model error
    if len(added & chunk_words) / len(added) < min_support:
        return "not_grounded"
    return None


def ground_answer(answer: str, question: str, chunk_words: set[str], min_support: float) -> tuple[str | None, str | None, bool]:
    """Keep the answer's leading sentences that are grounded: (answer or None, reason if None, trimmed?).

    Small models often start with a grounded sentence, then drift into made-up
    detail; the grounded start is kept and the rest cut (``trimmed``).
    """
    sentences = split_sentences(answer, max_chars=None)
    qwords = content_words(question)
    kept: list[str] = []
    for s in sentences:
        added = content_words(s) - qwords
        if added and (
            len(added & chunk_words) / len(added) < min_support or any(_has_digit(w) and w not in chunk_words for w in added)
        ):
            break
        kept.append(s)
    if not kept:
        return None, check_grounded(answer, question, chunk_words, min_support) or "not_grounded", False
    short = " ".join(kept)
    reason = check_grounded(short, question, chunk_words, min_support)
    if reason is not None:
        return None, reason, False
    return short, None, len(kept) < len(sentences)


def best_sentence(question_words: set[str], sentences: list[str], question_vec, sentence_vecs) -> tuple[int, float] | None:
    """Index and score of the sentence that best answers the question, or None.

    Score: cosine(question, sentence) + 0.25 x share of the question's words in it.
    A sentence must share at least one content word with the question.
    """
    best, best_score = None, -1e9
    for i, s in enumerate(sentences):
        words = content_words(s)
        shared = len(question_words & words)
        if not shared or word_count(s) < 5:
            continue
        score = float(np.dot(question_vec, sentence_vecs[i])) + 0.25 * shared / max(1, len(question_words))
        if score > best_score:
            best, best_score = i, score
    return None if best is None else (best, best_score)


# ---------------------------------------------------------------------------
# Variations
# ---------------------------------------------------------------------------
def parse_variations(text: str, source: str, n: int, *, truncated: bool = False, min_overlap: float = 0.4) -> Parsed:
    """Paraphrases of ``source`` found in a model's output: questions, not the source itself,
    sharing at least ``min_overlap`` of the source's content words, at most ``n``."""
    parsed = parse_questions(text, truncated=truncated)
    tally = parsed.tally
    tally.dropped.pop("no_question_in_output", None)
    src_key, src_words = normalize(source), content_words(source)
    out: list[str] = []
    for v in parsed.items:
        if normalize(v) == src_key:
            tally.dropped["same_as_source"] += 1
            continue
        if src_words and len(content_words(v) & src_words) / len(src_words) < min_overlap:
            tally.dropped["meaning_changed"] += 1
            continue
        out.append(v)
    if len(out) > n:
        tally.dropped["over_limit"] += len(out) - n
        out = out[:n]
    return Parsed(out, tally)


# ---------------------------------------------------------------------------
# Near-duplicates and the split
# ---------------------------------------------------------------------------
def near_duplicates(vectors: np.ndarray, threshold: float, groups: list | None = None, block: int = 1024) -> list[int | None]:
    """For each row (in order), the index of an earlier kept row it nearly duplicates, else None.

    Rows are L2-normalised, so the dot product is the cosine. With ``groups``, rows of
    the same group are never compared (a paraphrase may be close to its own source).
    Greedy and order-preserving: the first of two near-duplicates is kept. Cosines are
    computed a block of rows at a time: memory (block x n), not (n x n).
    """
    v = np.ascontiguousarray(vectors, dtype=np.float32)
    n = len(v)
    out: list[int | None] = [None] * n
    kept = np.zeros(n, dtype=bool)
    g = np.asarray(groups) if groups is not None else None
    for lo in range(0, n, block):
        hi = min(n, lo + block)
        sims = v[lo:hi] @ v[:hi].T  # (rows in block, rows up to the block's end)
        for i in range(lo, hi):
            close = np.nonzero((sims[i - lo, :i] >= threshold) & kept[:i])[0]
            if g is not None and len(close):
                close = close[g[close] != g[i]]
            if len(close):
                out[i] = int(close[0])
            else:
                kept[i] = True
    return out


def split_score(chunk_hash: str, seed: int) -> float:
    """A stable number in [0, 1) for a chunk: the same content lands in the same split every run."""
    digest = hashlib.sha256(f"{seed}:{chunk_hash}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def assign_family_splits(families: list[tuple[str, str]], per_chunk: int, seed: int) -> list[str]:
    """For each (chunk hash, question) family: "train" or "validation".

    Every chunk stays in training (its text and restatements are trained on); what is
    held out is whole question families: in each chunk with two or more families, the
    ``per_chunk`` with the lowest hash of (seed, chunk, normalised question) go to
    validation, at most all but one. The hash depends only on the chunk's content and
    the question, so the split is the same on every run and an incremental extraction
    (new chunks, same old ones) leaves the old families where they were.
    """
    by_chunk: dict[str, list[int]] = {}
    for i, (h, _) in enumerate(families):
        by_chunk.setdefault(h, []).append(i)
    out = ["train"] * len(families)
    for h, idx in by_chunk.items():
        if len(idx) < 2 or per_chunk <= 0:
            continue
        ranked = sorted(idx, key=lambda i: (split_score(f"{h}:{normalize(families[i][1])}", seed), i))
        for i in ranked[: min(per_chunk, len(idx) - 1)]:
            out[i] = "validation"
    return out
