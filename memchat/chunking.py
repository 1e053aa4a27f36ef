"""Pages of text -> overlapping chunks that know their pages; and a sentence splitter.

``chunk_pages`` joins the pages of one document (a blank line between pages) and cuts the
text into chunks of at most ``chunk_size`` characters. It cuts, in order of preference:
at a paragraph break, after a sentence, at a space, and only then mid-word (CJK text has
no spaces, so the sentence ends "。" carry it). A cut is only looked for in the second
half of the window, so chunks are never much smaller than asked; a paragraph cut moves
back before a short heading, so the heading stays with the text it heads. Each next
chunk starts about ``chunk_overlap`` characters before the previous one ended, at a
sentence start if one lies between overlap and overlap/2 characters back, else at a
word start. Chunks may span pages: ``page_start``/``page_end`` come from character
offsets, not guesses.

Guarantees the tests check: every non-space character of the document is in some chunk;
no chunk is longer than ``chunk_size``, except a last chunk that absorbed a leftover of
fewer than ``min_chunk_chars`` characters (a leftover is merged, never dropped; a whole
document shorter than that is still one chunk); the result is deterministic.

``split_sentences`` is the same sentence rule for callers that want sentences (RAG picks
evidence sentences with it). Every sentence is an exact substring of the input, in order.

Deliberately left out: tokens (sizes are characters, which the embedding window is sized
for in ``ChunkConfig``), document ids and versions (the knowledge base adds those), and
any language model; this module is pure functions over strings, standard library only.
"""

from __future__ import annotations

import hashlib
import re
from bisect import bisect_left, bisect_right
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from memchat.pdf import Page


@dataclass(frozen=True)
class Chunk:
    text: str  # stripped of surrounding whitespace
    page_start: int  # 1-based page of the chunk's first character
    page_end: int  # page of its last character (== page_start unless it spans a page break)
    index: int  # 0-based position within the document
    content_hash: str  # sha256 hex of text (utf-8): finds unchanged chunks across versions
    ocr: bool = False  # some of its text was read by OCR (a page without a text layer)
    heading: str = ""  # the nearest heading at or before its start ("" if none): retrieval context


PAGE_SEPARATOR = "\n\n"  # pages are joined as paragraphs: a page break is a good place to cut


def chunk_pages(
    pages: Sequence[Page] | Sequence[tuple[int, str]],
    chunk_size: int = 1000,
    chunk_overlap: int = 200,
    min_chunk_chars: int = 20,
    max_chunks: int | None = None,
) -> list[Chunk]:
    """Cut one document's pages into overlapping chunks (sizes in characters).

    ``pages`` are ``Page`` objects or ``(number, text)`` pairs, numbers increasing.
    Pages with no text are skipped. Raises ValueError for impossible sizes.
    With ``max_chunks``, cutting stops at ``max_chunks + 1`` chunks: a caller enforcing a
    cap learns that it is passed without paying for the rest of the document.
    """
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be > 0 characters, got {chunk_size}")
    if not 0 <= chunk_overlap < chunk_size:
        raise ValueError(f"chunk_overlap must be >= 0 and < chunk_size ({chunk_size}), got {chunk_overlap}")
    if min_chunk_chars < 0:
        raise ValueError(f"min_chunk_chars must be >= 0, got {min_chunk_chars}")

    text, offsets, numbers = _join_pages(pages)
    ocr_pages = {p.number for p in pages if getattr(p, "ocr", False)}
    para_starts = [0] + [m.end() for m in _PARA_BREAK.finditer(text)]
    chunks = []
    for index, (start, end) in enumerate(_spans(text, chunk_size, chunk_overlap, min_chunk_chars, limit=max_chunks)):
        piece = text[start:end]
        first, last = bisect_right(offsets, start) - 1, bisect_right(offsets, end - 1) - 1
        chunks.append(
            Chunk(
                text=piece,
                page_start=numbers[first],
                page_end=numbers[last],
                index=index,
                content_hash=hashlib.sha256(piece.encode("utf-8")).hexdigest(),
                ocr=bool(ocr_pages) and any(n in ocr_pages for n in numbers[first : last + 1]),
                heading=_heading_at(text, para_starts, start),
            )
        )
    return chunks


_HEADING_LOOKBACK = 4000  # characters searched back for a heading: about a page


def _heading_at(text: str, starts: list[int], start: int) -> str:
    """The nearest heading-like paragraph (short, no final punctuation) starting at or before ``start``."""
    j = bisect_right(starts, start) - 1
    while j >= 0 and starts[j] >= start - _HEADING_LOOKBACK:
        end = starts[j + 1] if j + 1 < len(starts) else len(text)
        para = " ".join(text[starts[j] : end].split())
        if para and len(para) <= _HEADING_CHARS and para[-1] not in ".!?:;,。" and any(c.isalpha() for c in para):
            return para
        j -= 1
    return ""


def split_sentences(text: str, max_chars: int | None = 500) -> list[str]:
    """Split text into sentences (and paragraphs), stripped, empty ones skipped.

    Handles abbreviations ("e.g.", "Dr.", "Fig. 3", "et al."), initials ("R. Smith"),
    decimals ("3.14") and numbered list items; CJK sentences end at "。", "!" or "?".
    A "sentence" longer than ``max_chars`` (a table, a code block) is split further at
    line breaks, then spaces, so no single piece floods a prompt; None turns that off.
    Nothing but surrounding whitespace is dropped.
    """
    if max_chars is not None and max_chars <= 0:
        raise ValueError(f"max_chars must be > 0 or None, got {max_chars}")
    sentences: list[str] = []
    prev = 0
    for cut in [*_boundaries(text), len(text)]:
        piece = text[prev:cut].strip()
        prev = cut
        if not piece:
            continue
        if max_chars is None or len(piece) <= max_chars:
            sentences.append(piece)
        else:
            sentences.extend(piece[s:e] for s, e in _spans(piece, max_chars, 0, 0, use_sentences=False))
    return sentences


# ---------------------------------------------------------------------------
# Implementation
# ---------------------------------------------------------------------------
def _join_pages(pages: Sequence[Page] | Sequence[tuple[int, str]]) -> tuple[str, list[int], list[int]]:
    """One string for the document, the offset where each kept page starts, and its number."""
    parts: list[str] = []
    offsets: list[int] = []
    numbers: list[int] = []
    pos = 0
    for page in pages:
        number, body = (page.number, page.text) if hasattr(page, "text") else page
        if numbers and number <= numbers[-1]:
            raise ValueError(f"page numbers must increase: page {number} comes after page {numbers[-1]}")
        body = body.strip()
        if not body:
            continue
        if parts:
            parts.append(PAGE_SEPARATOR)
            pos += len(PAGE_SEPARATOR)
        offsets.append(pos)
        numbers.append(number)
        parts.append(body)
        pos += len(body)
    return "".join(parts), offsets, numbers


# Han, kana and CJK punctuation: a "." or "!" directly followed by these still ends a sentence.
_CJK = "\u3001-\u303f\u3040-\u30ff\u31f0-\u31ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uff00-\uffef\U00020000-\U0003134f"
_CLOSERS = "\"'”’»)\\]」』）"
# Candidate sentence ends: Latin punctuation followed by a space or CJK (so "3.14", "a.b" and
# "x!=y" are not), or ideographic punctuation, which needs nothing after it.
# Each run of punctuation is tried once, whole (look-behind, possessive): "!!!!...a" would
# otherwise be retried from every character of the run, quadratic in its length.
_SENTENCE_END = re.compile(rf"(?<![.!?…])[.!?…]++[{_CLOSERS}]*+(?=\s|$|[{_CJK}])|(?<![。｡！？])[。｡！？]++[{_CLOSERS}]*+")
# A paragraph break (a blank line); the cut goes at its first newline.
_PARA_BREAK = re.compile(r"\n[^\S\n]*\n")
_NON_SPACE = re.compile(r"\S")
_SPACE = re.compile(r"\s")

# Words that take a period without ending a sentence.
_ABBREVIATIONS = frozenset(
    "mr mrs ms dr prof sr jr st mt vs cf al ca approx resp dept esp incl ibid viz "
    "e.g i.e z.b bzw vgl usw d.h u.a".split()
)
# ...and those that do so only before a number ("Fig. 3", "No. 5", "pp. 10-12").
_NUMBER_ABBREVIATIONS = frozenset("fig figs eq eqs no nos nr vol vols pp p ch chap sec sect art".split())
_OPENERS = "([{\"'“‘«"


def _paragraph_breaks(text: str) -> list[int]:
    return [m.start() for m in _PARA_BREAK.finditer(text)]


def _boundaries(text: str, paras: list[int] | None = None) -> list[int]:
    """Sorted offsets where a sentence or paragraph ends (cut points; whitespace follows)."""
    cuts = list(_paragraph_breaks(text) if paras is None else paras)
    n = len(text)
    for m in _SENTENCE_END.finditer(text):
        start, end = m.span()
        if text[start] == "." and not text.startswith("..", start):
            nxt = _NON_SPACE.search(text, end)
            if _is_abbreviation(text, start, nxt.group() if nxt else ""):
                continue
        if end < n:
            cuts.append(end)
    return sorted(set(cuts))


def _is_abbreviation(text: str, dot: int, next_char: str) -> bool:
    """Does the single "." at ``dot`` belong to the word before it rather than end a sentence?"""
    if next_char.islower():
        return True  # "e.g. the", "approx. three": a sentence does not start lower-case
    lo = max(0, dot - 24)  # longer words are not abbreviations; bounds the backward scan
    space = max(text.rfind(" ", lo, dot), text.rfind("\n", lo, dot), text.rfind("\t", lo, dot))
    if space < 0 and lo > 0:
        return False  # no space in reach: a word too long to be an abbreviation
    word = text[space + 1 : dot].lstrip(_OPENERS)
    low = word.lower()
    if low in _ABBREVIATIONS or (low in _NUMBER_ABBREVIATIONS and (next_char.isdigit() or next_char == "(")):
        return True
    if len(word) == 1 and word.isupper():
        return True  # an initial: "Mohammad R. Haghighat"
    if "." in low and all(0 < len(part) <= 2 and part.isalpha() for part in low.split(".")):
        return True  # "U.S.", "Ph.D.", "z.B."
    # "1. Introduction": a list or section number at the start of a line.
    at_line_start = space < 0 or text[space] == "\n"
    return at_line_start and word.isdigit() and len(word) <= 3


def _skip_space(text: str, pos: int) -> int:
    m = _NON_SPACE.search(text, pos)
    return m.start() if m else len(text)


def _rstrip(text: str, start: int, end: int) -> int:
    while end > start and text[end - 1].isspace():
        end -= 1
    return end


def _spans(
    text: str, size: int, overlap: int, min_chars: int, use_sentences: bool = True, limit: int | None = None
) -> list[tuple[int, int]]:
    """(start, end) offsets of the chunks: stripped, each at most ``size`` long (see module doc).

    With ``limit``, stops once there are ``limit + 1`` spans.
    """
    n = len(text)
    paras = _paragraph_breaks(text) if use_sentences else []
    sents = _boundaries(text, paras) if use_sentences else []  # includes paragraph breaks
    spans: list[tuple[int, int]] = []
    start = _skip_space(text, 0)
    while start < n:
        if n - start <= size:
            spans.append((start, _rstrip(text, start, n)))
            break
        # Cut in (lo, hi]. Below lo a chunk would be too small, and the next one
        # would not get past this one's start once the overlap is taken back.
        lo, hi = start + max(size // 2, overlap + 1), start + size
        cut = _before_heading(text, paras, _last_in(paras, lo, hi), lo) or _last_in(sents, lo, hi)
        if not cut:
            # A line break (table row, code line) before a space; a hard cut only as a last resort.
            newline = text.rfind("\n", lo, hi + 1)
            space = newline if newline > lo else text.rfind(" ", lo, hi + 1)
            cut = space if space > lo else hi
        # A leftover too small to be worth a chunk joins this one (2*size bounds the look).
        if n - cut <= 2 * size and len(text[cut:].strip()) < min_chars:
            spans.append((start, _rstrip(text, start, n)))
            break
        end = _rstrip(text, start, cut)
        spans.append((start, end))
        if limit is not None and len(spans) > limit:
            break
        start = max(_next_start(text, sents, start, end, overlap), start + 1)
        start = _skip_space(text, start)
    return spans


def _last_in(sorted_cuts: list[int], lo: int, hi: int) -> int:
    """The largest cut in (lo, hi], or 0."""
    j = bisect_right(sorted_cuts, hi) - 1
    return sorted_cuts[j] if j >= 0 and sorted_cuts[j] > lo else 0


_HEADING_CHARS = 80  # a paragraph this short without final punctuation is taken as a heading


def _before_heading(text: str, paras: list[int], cut: int, lo: int) -> int:
    """Move a paragraph cut back before a heading, so the heading stays with its text."""
    j = bisect_left(paras, cut) - 1
    if not cut or j < 0 or paras[j] <= lo:
        return cut
    last = text[paras[j] : cut].strip()
    return paras[j] if last and len(last) <= _HEADING_CHARS and last[-1] not in ".!?:;。" else cut


def _next_start(text: str, sents: list[int], start: int, end: int, overlap: int) -> int:
    """Where the chunk after [start, end) begins: about ``overlap`` characters before ``end``."""
    if overlap == 0:
        return end
    target = max(end - overlap, start + 1)
    # A sentence start between `overlap` and `overlap / 2` characters back: the earliest one.
    for j in range(max(bisect_left(sents, target) - 1, 0), len(sents)):
        s = _skip_space(text, sents[j])
        if s > end - overlap // 2:
            break
        if s >= target:
            return s
    # Else the first word start at or after the target (a word is never cut in two).
    space = _SPACE.search(text, target - 1, end)
    if space:
        return space.end()
    return target  # no space in reach (CJK, long tokens): a plain character offset
