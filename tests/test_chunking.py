"""memchat.chunking: invariants on real documents and on synthetic ones with a known answer."""

from __future__ import annotations

import hashlib
import random
import re
import time

import pytest

from memchat.chunking import Chunk, _spans, chunk_pages, split_sentences
from memchat.pdf import Page
from tests.test_pdf import extracted, japanese_sample



def document_text(pages) -> str:
    """The text chunk_pages cuts: non-empty pages, stripped, a blank line between them."""
    return "\n\n".join(p.text.strip() for p in pages if p.text.strip())


def check_chunks(pages, chunks: list[Chunk], size: int, overlap: int, min_chars: int) -> list[int]:
    """Assert every invariant of chunk_pages; return the overlaps between neighbours.

    The chunker's own offsets are the witness of where each chunk lies (searching for the
    text would be ambiguous in repetitive text); they must reproduce the chunks exactly.
    """
    text = document_text(pages)
    spans = _spans(text, size, overlap, min_chars)
    assert [text[s:e] for s, e in spans] == [c.text for c in chunks]
    by_number = {p.number: p.text for p in pages}
    overlaps = []
    for i, (chunk, (start, end)) in enumerate(zip(chunks, spans)):
        last = i == len(chunks) - 1
        assert chunk.index == i
        assert chunk.text == chunk.text.strip() and chunk.text
        assert chunk.content_hash == hashlib.sha256(chunk.text.encode()).hexdigest()
        # Size: at most `size`; a last chunk may hold a leftover of < min_chars beyond it.
        assert len(chunk.text) <= size or (last and len(chunk.text[size:].strip()) < min_chars), len(chunk.text)
        if not last:  # cut in the second half of the window (trailing whitespace is stripped off)
            assert SPACES.match(text, end).end() - start > size // 2, "cut too early"
        # Coverage: no non-space character before the first, between two, or after the last chunk.
        previous_end = spans[i - 1][1] if i else 0
        assert not text[previous_end:start].strip(), f"text lost before chunk {i}"
        if i:
            overlaps.append(previous_end - start)
            assert spans[i - 1][0] < start, "no progress"
            # The next chunk starts inside the previous one, unless that one is a single
            # character (then progress wins: it can only start after it).
            if overlap and len(chunks[i - 1].text) > 1:
                assert previous_end - start > 0, f"no overlap before chunk {i}"
            assert chunks[i - 1].page_start <= chunk.page_start
        # Pages: the first line is on page_start, the last line on page_end.
        assert chunk.page_start <= chunk.page_end
        assert chunk.text.split("\n", 1)[0] in by_number[chunk.page_start]
        assert chunk.text.rsplit("\n", 1)[-1] in by_number[chunk.page_end]
    assert not text[spans[-1][1] if spans else 0 :].strip(), "text lost at the end"
    assert all(ov <= overlap for ov in overlaps)
    return overlaps


SPACES = re.compile(r"\s*")


# ---------------------------------------------------------------------------
# Real documents
# ---------------------------------------------------------------------------
REAL = ["manuals/R-intro.pdf", "papers_tables/tracemonkey.pdf", "papers_tables/nics-background-checks-2015-11.pdf"]


@pytest.mark.parametrize("relpath", REAL)
@pytest.mark.parametrize(("size", "overlap"), [(1000, 200), (300, 60), (500, 0)])
def test_invariants_on_real_documents(relpath, size, overlap):
    pages = extracted(relpath).pages
    chunks = chunk_pages(pages, chunk_size=size, chunk_overlap=overlap)
    overlaps = check_chunks(pages, chunks, size, overlap, 20)
    if overlap:  # aligned to boundaries, so a bit under the target, but not far
        assert 0.5 * overlap <= sum(overlaps) / len(overlaps) <= overlap
    assert chunks == chunk_pages(pages, chunk_size=size, chunk_overlap=overlap)  # deterministic


def test_chunks_cut_at_paragraphs_and_sentences_when_they_can():
    pages = extracted("manuals/R-intro.pdf").pages
    text = document_text(pages)
    chunks = chunk_pages(pages)
    clean_ends = 0
    for chunk in chunks[:-1]:
        end = text.find(chunk.text) + len(chunk.text)
        clean_ends += text[end : end + 1].isspace()
    assert clean_ends == len(chunks) - 1  # never mid-word in English text
    sentence_ends = sum(bool(re.search(r"[.!?:)]$", c.text)) or "\n\n" in chunk_tail(text, c) for c in chunks[:-1])
    assert sentence_ends / (len(chunks) - 1) > 0.8


def chunk_tail(text: str, chunk: Chunk) -> str:
    end = text.find(chunk.text) + len(chunk.text)
    return text[end : end + 2]


def test_known_phrase_maps_to_its_page():
    pages = extracted("manuals/R-intro.pdf").pages
    chunks = chunk_pages(pages)
    for phrase, page in [
        ("Command lines entered at the console are limited", 11),
        ("Other looping facilities include", 50),
        ("Bates and D. G. Watts (1988), Nonlinear Regression", 113),
    ]:
        assert document_text(pages).count(phrase) == 1, phrase
        holding = [c for c in chunks if phrase in c.text]
        assert holding, phrase
        assert all(c.page_start <= page <= c.page_end for c in holding), (phrase, [(c.page_start, c.page_end) for c in holding])
    spanning = [c for c in chunks if c.page_start != c.page_end]
    assert spanning
    for chunk in spanning:  # a page strictly inside a chunk's range lies wholly in it
        for number in range(chunk.page_start + 1, chunk.page_end):
            assert pages[number - 1].text.strip() in chunk.text


def test_japanese_text_is_cut_at_sentence_ends():
    pages = japanese_sample().pages
    chunks = chunk_pages(pages)
    check_chunks(pages, chunks, 1000, 200, 20)
    text = document_text(pages)
    assert len(chunks) >= 10
    at_boundary = sum(bool(re.search(r"[。.!?)]$", c.text)) or chunk_tail(text, c)[:1].isspace() for c in chunks[:-1])
    assert at_boundary == len(chunks) - 1
    assert any(c.text.startswith(tuple("ぁあいうえおかきくけこ")) is False for c in chunks)


def test_large_book_chunks_whole():
    pages = extracted("large/freeculture.pdf").pages
    assert sum(len(p.text) for p in pages) > 600_000  # ~645k since the printer's margins are dropped (706k with them)
    t0 = time.perf_counter()
    chunks = chunk_pages(pages)
    print(f"freeculture.pdf: {len(chunks)} chunks in {(time.perf_counter() - t0) * 1000:.0f} ms")  # shown, not asserted
    check_chunks(pages, chunks, 1000, 200, 20)


# ---------------------------------------------------------------------------
# Synthetic documents with a known answer
# ---------------------------------------------------------------------------
def synthetic_pages(n_pages: int = 14, seed: int = 7) -> list[Page]:
    """Words name their page ("p3w17"), so a chunk's true pages can be read off its text."""
    rng = random.Random(seed)
    pages = []
    for number in range(1, n_pages + 1):
        if number in (4, 9):  # empty pages (a figure, a blank verso) keep their numbers
            pages.append(Page(number, ""))
            continue
        paragraphs, k = [], 0
        for _ in range(rng.randint(1, 6)):
            sentences = []
            for _ in range(rng.randint(1, 7)):
                words = [f"p{number}w{k + i}" for i in range(rng.randint(2, 30))]
                k += len(words)
                words[0] = words[0].upper()
                if rng.random() < 0.2:
                    words.insert(1, "e.g.")  # an abbreviation inside a sentence
                sentences.append(" ".join(words) + rng.choice(".?!."))
            lines = re.sub(r"(.{60,80}?) ", "\\1\n", " ".join(sentences))  # wrapped like a PDF
            paragraphs.append(lines)
        pages.append(Page(number, "\n\n".join(paragraphs)))
    return pages


def true_pages(chunk: Chunk) -> tuple[int, int]:
    numbers = [int(n) for n in re.findall(r"\b[pP](\d+)[wW]\d+", chunk.text)]
    return min(numbers), max(numbers)


@pytest.mark.parametrize(("size", "overlap", "min_chars"), [(1000, 200, 20), (400, 100, 20), (150, 30, 5), (200, 0, 0)])
def test_page_ranges_are_exact(size, overlap, min_chars):
    pages = synthetic_pages()
    chunks = chunk_pages(pages, size, overlap, min_chars)
    check_chunks(pages, chunks, size, overlap, min_chars)
    assert [(c.page_start, c.page_end) for c in chunks] == [true_pages(c) for c in chunks]
    assert {4, 9}.isdisjoint({c.page_start for c in chunks} | {c.page_end for c in chunks})
    assert any(c.page_start < c.page_end for c in chunks)


@pytest.mark.parametrize("seed", range(6))
def test_invariants_on_messy_random_text(seed):
    """Odd whitespace, stray punctuation, CJK and long tokens: the invariants still hold."""
    rng = random.Random(seed)
    pieces = [" ", "  ", "\n", "\n\n", "\n \n\n\n", "\t", ". ", "! ", "? ", "e.g. ", "Dr. ", "3.14 ", "。", "「引用」",
              "…", "(x.) ", "U.S. ", "1. "]
    pages = []
    for number in range(1, rng.randint(2, 8)):
        parts = []
        for _ in range(rng.randint(0, 400)):
            r = rng.random()
            if r < 0.55:
                parts.append(f"{rng.choice(['w', 'W', '語'])}{rng.randrange(10**6)}")
            elif r < 0.6:
                parts.append("".join(rng.choice("漢字かなカナ") for _ in range(rng.randint(1, 200))))
            else:
                parts.append(rng.choice(pieces))
        pages.append(Page(number, "".join(parts)))
    for size, overlap, min_chars in [(200, 50, 20), (97, 0, 0), (1000, 999, 5), (5, 4, 1)]:
        chunks = chunk_pages(pages, size, overlap, min_chars)
        check_chunks(pages, chunks, size, overlap, min_chars)


def test_tuples_and_pages_give_the_same_chunks():
    pages = synthetic_pages(5)
    assert chunk_pages(pages) == chunk_pages([(p.number, p.text) for p in pages])


def test_overlap_starts_at_a_sentence_when_one_is_near():
    pages = synthetic_pages()
    chunks = chunk_pages(pages, 1000, 200)
    starts_sentence = sum(bool(re.match(r"P\d+W\d+", c.text)) for c in chunks[1:])
    assert starts_sentence / (len(chunks) - 1) > 0.7


def test_cjk_without_any_break_is_hard_cut():
    rng = random.Random(3)  # not periodic, so each chunk's place in the text is unambiguous
    text = "".join(rng.choice("あいうえおかきくけこ日本語文字") for _ in range(5000))  # no space, no punctuation
    chunks = chunk_pages([(1, text)], 1000, 200)
    check_chunks([Page(1, text)], chunks, 1000, 200, 20)
    assert all(len(c.text) == 1000 for c in chunks[:-1])


def test_cjk_sentences_are_cut_after_the_full_stop():
    text = "".join(f"これは{i}番目の文です。" for i in range(400))
    chunks = chunk_pages([(1, text)], 300, 50)
    check_chunks([Page(1, text)], chunks, 300, 50, 20)
    assert all(c.text.endswith("。") for c in chunks)
    assert all(re.match(r"これは\d+番目", c.text) for c in chunks)  # overlap starts at a sentence too


def test_a_word_longer_than_a_chunk_is_hard_cut():
    rng = random.Random(5)
    text = "Start. " + "".join(rng.choice("abcdefgh") for _ in range(2500)) + " end."  # e.g. a base64 blob
    chunks = chunk_pages([(1, text)], 1000, 100)
    check_chunks([Page(1, text)], chunks, 1000, 100, 20)
    assert chunks[0].text == text[:1000] and len(chunks) == 3  # hard cuts: 1000, then 100 back


def test_a_small_leftover_joins_the_last_chunk():
    body = " ".join(f"Sentence number {i} is here." for i in range(36))  # 1,000-odd characters
    text = body + " Tail."
    chunks = chunk_pages([(1, text)], 1000, 100, min_chunk_chars=20)
    check_chunks([Page(1, text)], chunks, 1000, 100, 20)
    assert chunks[-1].text.endswith("Tail.")
    assert all(len(c.text) >= 20 for c in chunks)


def test_short_and_empty_documents():
    assert chunk_pages([]) == []
    assert chunk_pages([(1, ""), (2, "  \n ")]) == []
    # A document shorter than min_chunk_chars is still one chunk: nothing is dropped silently.
    (only,) = chunk_pages([(1, ""), (2, " Hello, world! ")])
    assert (only.text, only.page_start, only.page_end, only.index) == ("Hello, world!", 2, 2, 0)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"chunk_size": 0}, "chunk_size"),
        ({"chunk_size": -5}, "chunk_size"),
        ({"chunk_size": 100, "chunk_overlap": 100}, "chunk_overlap"),
        ({"chunk_overlap": -1}, "chunk_overlap"),
        ({"min_chunk_chars": -1}, "min_chunk_chars"),
    ],
)
def test_impossible_sizes_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        chunk_pages([(1, "text")], **kwargs)


def test_page_numbers_must_increase():
    with pytest.raises(ValueError, match="page numbers must increase"):
        chunk_pages([(2, "a"), (1, "b")])


# ---------------------------------------------------------------------------
# split_sentences
# ---------------------------------------------------------------------------
def test_sentences_respect_abbreviations_numbers_and_initials():
    text = (
        "Languages such as JavaScript are hard to compile, e.g. the ones we use. "
        "Mohammad R. Haghighat measured 3.14 times more in the U.S. in 2009. "
        "See Fig. 3 for details. Is it? Yes! Gal et al. (2009) agree. It is 5 ft. tall.\n\n"
        "A heading\nwith a line break. 公開日です。次の文です!最後?"
    )
    assert split_sentences(text) == [
        "Languages such as JavaScript are hard to compile, e.g. the ones we use.",
        "Mohammad R. Haghighat measured 3.14 times more in the U.S. in 2009.",
        "See Fig. 3 for details.",
        "Is it?",
        "Yes!",
        "Gal et al. (2009) agree.",
        "It is 5 ft. tall.",  # an unknown abbreviation: a sentence does not go on in lower case
        "A heading\nwith a line break.",
        "公開日です。",
        "次の文です!",
        "最後?",
    ]


def test_sentences_never_drop_text():
    pages = extracted("manuals/R-intro.pdf").pages[:30] + japanese_sample().pages
    for page in pages:
        sentences = split_sentences(page.text)
        assert re.sub(r"\s", "", "".join(sentences)) == re.sub(r"\s", "", page.text)
        cursor = 0
        for sentence in sentences:  # exact substrings, in order
            found = page.text.find(sentence, cursor)
            assert found >= 0
            cursor = found + len(sentence)


def test_long_runs_without_punctuation_are_split():
    table = extracted("papers_tables/nics-background-checks-2015-11.pdf").pages[0].text
    assert max(len(s) for s in split_sentences(table, max_chars=None)) > 1000  # one dense table
    pieces = split_sentences(table)
    assert max(len(s) for s in pieces) <= 500
    assert re.sub(r"\s", "", "".join(pieces)) == re.sub(r"\s", "", table)
    with pytest.raises(ValueError):
        split_sentences("x", max_chars=0)


def test_sentences_of_empty_text():
    assert split_sentences("") == [] and split_sentences(" \n\n ") == []
