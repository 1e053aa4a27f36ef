"""Bounded ingestion (issue 10, item 2): caps on bytes, pages, characters and chunks per document.

Every over-limit file gets one line naming the variable to raise; the rest of the batch
goes in; the store is untouched by a refused file; extraction stops at the cap.
"""

from __future__ import annotations

import pytest

from memchat.chunking import chunk_pages
from memchat.config import IngestConfig
from memchat.errors import ConfigError, LimitError
from memchat.knowledge import KnowledgeBase
from memchat.pdf import extract_pdf
from tests.fakes import FakeEmbedder
from tests.pdfmaker import amplification_pdf, text_pdf

GOOD_LINES = [f"Line {i} of a small honest document about lighthouses and their keepers." for i in range(30)]


def store_bytes(kb: KnowledgeBase) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(kb.store.dir.iterdir()) if p.is_file()}


def test_amplification_pdf_is_refused_early_with_one_line_and_the_store_is_unchanged():
    bomb = amplification_pdf(pages=20, stream_bytes=2_000_000)
    assert len(bomb) < 20_000  # a small file...
    kb = KnowledgeBase(embedder=FakeEmbedder())
    kb.add_documents([("honest.pdf", text_pdf([GOOD_LINES]))])
    before = store_bytes(kb)

    stages: list[str] = []
    results = kb.add_documents([("bomb.pdf", bomb)], progress=lambda name, frac, stage: stages.append(stage))

    (r,) = results
    assert r.status == "error"
    line = r.message
    assert "\n" not in line
    assert line.startswith("bomb.pdf: expands to about 3") and "million characters" in line  # ...of ~35 M characters
    assert "over the 5 million limit; raise MEMCHAT_MAX_CHARS if you trust it" in line
    # Extraction stopped at the cap: pages 1-2 whole, page 3 cut short; pages 4-20 never read.
    pages_read = [s for s in stages if s.startswith("text page")]
    assert pages_read == ["text page 1/20", "text page 2/20"]
    assert store_bytes(kb) == before  # byte-identical
    assert [d["name"] for d in kb.documents()] == ["honest.pdf"]


def test_the_rest_of_the_batch_still_goes_in():
    kb = KnowledgeBase(embedder=FakeEmbedder())
    results = kb.add_documents([("bomb.pdf", amplification_pdf()), ("honest.pdf", text_pdf([GOOD_LINES]))])
    assert [r.status for r in results] == ["error", "added"]
    assert [d["name"] for d in kb.documents()] == ["honest.pdf"]
    assert kb.search("lighthouses keepers", k=1)[0].document == "honest.pdf"


def test_raising_the_cap_lets_a_trusted_file_in(monkeypatch):
    monkeypatch.setenv("MEMCHAT_MAX_CHARS", "2M")
    bomb = amplification_pdf(pages=2, stream_bytes=400_000)  # ~0.7 M characters
    doc = extract_pdf(bomb, "big.pdf", limits=IngestConfig())
    assert doc.num_pages == 2 and len(doc.pages[0].text) > 300_000


def test_one_huge_page_stops_mid_page():
    bomb = amplification_pdf(pages=1, stream_bytes=2_000_000)
    with pytest.raises(LimitError) as exc:
        extract_pdf(bomb, "one.pdf", limits=IngestConfig(max_chars=100_000))
    assert "expands to more than 100,000 characters, over the 100,000 limit; raise MEMCHAT_MAX_CHARS" in str(exc.value)


def test_too_many_pages_is_refused_before_extraction(monkeypatch):
    monkeypatch.setenv("MEMCHAT_MAX_PAGES", "5")
    seen = []
    with pytest.raises(LimitError) as exc:
        extract_pdf(text_pdf([["page"]] * 6), "long.pdf", limits=IngestConfig(), on_page=lambda *a: seen.append(a))
    assert str(exc.value) == "long.pdf: has 6 pages, over the 5-page limit; raise MEMCHAT_MAX_PAGES if you trust it"
    assert seen == []
    assert extract_pdf(text_pdf([["page five of five"]] * 5), "ok.pdf", limits=IngestConfig()).num_pages == 5


def test_too_many_bytes_is_refused(monkeypatch, tmp_path):
    data = text_pdf([GOOD_LINES] * 3)
    monkeypatch.setenv("MEMCHAT_MAX_FILE_BYTES", str(len(data) - 1))
    kb = KnowledgeBase(embedder=FakeEmbedder())
    path = tmp_path / "big.pdf"
    path.write_bytes(data)
    from pathlib import Path

    monkeypatch.setattr(Path, "read_bytes", lambda self: pytest.fail("an over-cap file must not be read into memory"))
    (r,) = kb.add_documents([path])
    assert r.status == "error"
    assert f"is {len(data):,} bytes, over the {len(data) - 1:,} bytes limit per file; raise MEMCHAT_MAX_FILE_BYTES" in r.message
    assert not kb.exists()


def test_too_many_chunks_is_refused(monkeypatch):
    monkeypatch.setenv("MEMCHAT_MAX_CHUNKS", "3")
    kb = KnowledgeBase(embedder=FakeEmbedder())
    (r,) = kb.add_documents([("long.pdf", text_pdf([GOOD_LINES] * 4))])
    assert r.status == "error"
    assert r.message == ("long.pdf: cuts into more than 3 chunks, over the 3 limit per document; "
                         "raise MEMCHAT_MAX_CHUNKS if you trust it")
    assert kb.embedder().texts_embedded == 0  # refused before any embedding


def test_chunking_stops_one_past_the_cap():
    pages = [(1, "A sentence of some length. " * 400)]
    full = chunk_pages(pages, 200, 20)
    assert len(full) > 20
    capped = chunk_pages(pages, 200, 20, max_chunks=5)
    assert capped == full[:6]


def test_settings_come_from_the_environment(monkeypatch):
    monkeypatch.setenv("MEMCHAT_MAX_CHARS", "7_500k")
    monkeypatch.setenv("MEMCHAT_MAX_PAGES", "12")
    monkeypatch.setenv("MEMCHAT_OCR", "0")
    cfg = IngestConfig()
    assert (cfg.max_chars, cfg.max_pages, cfg.ocr) == (7_500_000, 12, False)
    monkeypatch.delenv("MEMCHAT_MAX_CHARS")
    assert IngestConfig().max_chars == 5_000_000
    for bad in ("lots", "-3", "0"):
        monkeypatch.setenv("MEMCHAT_MAX_CHUNKS", bad)
        with pytest.raises(ConfigError, match="MEMCHAT_MAX_CHUNKS="):
            IngestConfig()


def test_a_page_of_one_endless_token_cleans_and_chunks_in_linear_time():
    # What the bomb's pages hold: runs of letters and of punctuation with no space. Two patterns
    # (hyphenated words in pdf.py, sentence ends in chunking.py) backtracked over such runs,
    # quadratic in their length: a 1 M-character run took hours. Now a fraction of a second.
    for run in ("A" * 1_000_000, "!" * 1_000_000 + "a"):
        doc = extract_pdf(text_pdf([[run[:50]]]), "x.pdf")  # a real document for the vocabulary path
        assert doc.num_pages == 1
        from memchat.pdf import _clean_page, _vocabulary

        hyphenated, words = _vocabulary([run])
        text = _clean_page(run, hyphenated, words)
        chunks = chunk_pages([(1, text)], 1000, 200)
        assert sum(len(c.text) for c in chunks) >= len(run)
