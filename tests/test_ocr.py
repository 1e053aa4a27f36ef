"""OCR of pages without a text layer (memchat.ocr via memchat.pdf), with the real engine, offline.

The generated pages are rendered in the test with a real font (DejaVu Sans); the scanned
files are the real ones in ../shared/data/pdfs/scanned. c02-22's reference transcription
is tests/data/c02-22.txt (see tests/data/README.md).
"""

from __future__ import annotations

import functools
import runpy
import sys
from pathlib import Path

import pytest

from memchat import ocr
from memchat.config import ChunkConfig, IngestConfig
from memchat.errors import BadDocumentError
from memchat.knowledge import KnowledgeBase
from memchat.pdf import ExtractedDocument, extract_pdf, extract_pdf_file
from tests.fakes import FakeEmbedder
from tests.pdfmaker import image_pdf, join_pdfs, text_pdf

REPO = Path(__file__).resolve().parents[1]
SCANNED = REPO.parent / "shared" / "data" / "pdfs" / "scanned"
TESTDATA = Path(__file__).resolve().parent / "data"

SCAN_LINES = [
    "The lighthouse keeper counted seventeen gulls",
    "on the northern rocks before breakfast.",
    "Copper kettles whistled in the harbour kitchen",
    "while the ferry waited for the morning tide.",
]
TEXT_LINES = ["This page has a real text layer about orchards and apple trees.",
              "Its words must come from pypdf, never from the recogniser."]


@functools.cache
def scanned_page() -> bytes:
    return image_pdf([SCAN_LINES])


@functools.cache
def extracted_scan(name: str) -> ExtractedDocument:
    return extract_pdf_file(SCANNED / name, limits=IngestConfig(ocr=True))


def test_an_image_only_page_is_read_by_ocr_and_searchable():
    seen = []
    doc = extract_pdf(scanned_page(), "scan.pdf", limits=IngestConfig(ocr=True), on_page=lambda *a: seen.append(a))
    (page,) = doc.pages
    assert page.ocr
    recall, precision = ocr.word_agreement("\n".join(SCAN_LINES), page.text)
    # Most words: the recogniser still runs some words together in this tight sans-serif
    # (0.70 measured; c02-22, a real book scan, gets 0.97).
    assert recall >= 0.6 and precision >= 0.6, page.text
    for word in ("lighthouse", "keeper", "seventeen", "gulls", "breakfast", "whistled", "harbour", "kitchen"):
        assert word in page.text
    assert seen == [(1, 1, "text"), (1, 1, "OCR")]  # per-page progress: the text pass, then the OCR pass

    kb = KnowledgeBase(embedder=FakeEmbedder())
    stages = []
    (r,) = kb.add_documents([("scan.pdf", scanned_page())], progress=lambda n, f, s: stages.append(s))
    assert r.status == "added", r.message
    assert "OCR page 1/1" in stages
    hit = kb.search("lighthouse keeper seventeen gulls", k=1)[0]
    assert hit.document == "scan.pdf" and "seventeen gulls" in hit.text
    assert hit.citation == "scan.pdf, p. 1, OCR"
    assert all(c.get("ocr") is True for c in kb.chunks())


def test_mixed_pdf_ocrs_only_the_image_page(monkeypatch):
    text_only = text_pdf([TEXT_LINES, TEXT_LINES[::-1]])
    mixed = join_pdfs(text_pdf([TEXT_LINES]), scanned_page(), text_pdf([TEXT_LINES[::-1]]))
    read = []
    real_read = ocr.OcrReader.read
    monkeypatch.setattr(ocr.OcrReader, "read", lambda self, i: read.append(i) or real_read(self, i))

    plain = extract_pdf(text_only, "plain.pdf", limits=IngestConfig(ocr=True))
    assert read == []  # a PDF with text everywhere is never rendered
    doc = extract_pdf(mixed, "mixed.pdf", limits=IngestConfig(ocr=True))
    assert read == [1]
    assert [p.ocr for p in doc.pages] == [False, True, False]
    assert [doc.pages[0].text, doc.pages[2].text] == [p.text for p in plain.pages]  # text pages untouched
    assert "seventeen gulls" in doc.pages[1].text

    kb = KnowledgeBase(embedder=FakeEmbedder(), chunking=ChunkConfig(chunk_size=150, chunk_overlap=20))  # ~a chunk a page
    kb.add_documents([("mixed.pdf", mixed)])
    chunks = kb.chunks()
    assert {c["page_start"] for c in chunks} >= {1, 2} and max(c["page_end"] for c in chunks) == 3
    for c in chunks:  # a chunk is marked when any of its pages was read by OCR
        assert c.get("ocr", False) == (c["page_start"] <= 2 <= c["page_end"]), c


def test_with_ocr_off_a_scan_is_refused_as_before():
    with pytest.raises(BadDocumentError) as exc:
        extract_pdf(scanned_page(), "scan.pdf", limits=IngestConfig(ocr=False))
    assert "has no extractable text in its 1 page(s) (scanned image?); run OCR first, e.g. ocrmypdf" in str(exc.value)


def test_main_add_no_ocr(monkeypatch, capsys, tmp_path):
    scan = tmp_path / "scan.pdf"
    scan.write_bytes(scanned_page())
    monkeypatch.setattr(sys, "argv", ["main.py", "add", "--no-ocr", str(scan)])
    with pytest.raises(SystemExit) as exc:
        runpy.run_path(str(REPO / "main.py"), run_name="__main__")
    assert exc.value.code == 1
    err = capsys.readouterr().err
    assert "scan.pdf: has no extractable text" in err and "ocrmypdf" in err


def test_ocr_setting_from_the_environment(monkeypatch):
    monkeypatch.setenv("MEMCHAT_OCR", "0")
    with pytest.raises(BadDocumentError, match="has no extractable text"):
        extract_pdf(scanned_page(), "scan.pdf")


def test_missing_engine_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "rapidocr_onnxruntime", None)  # as if not installed
    with pytest.raises(BadDocumentError) as exc:
        extract_pdf(scanned_page(), "scan.pdf", limits=IngestConfig(ocr=True))
    msg = str(exc.value)
    assert msg.startswith("scan.pdf: has no text layer in its 1 page(s) (a scan?) and OCR is not available")
    assert "pip install 'rapidocr-onnxruntime" in msg and "\n" not in msg
    # A PDF with text elsewhere still goes in, with a warning for the page left out.
    doc = extract_pdf(join_pdfs(text_pdf([TEXT_LINES]), scanned_page()), "mixed.pdf", limits=IngestConfig(ocr=True))
    assert doc.pages[0].text and not doc.pages[1].text


def test_a_page_ocr_cannot_read_gets_the_per_file_message_and_the_batch_goes_on(monkeypatch):
    blank = image_pdf([[]])  # an image of a white page: no ink, no words
    with pytest.raises(BadDocumentError, match="OCR found no words on them either"):
        extract_pdf(blank, "blank.pdf", limits=IngestConfig(ocr=True))

    def broken(self, index):
        raise RuntimeError("renderer crashed")

    monkeypatch.setattr(ocr.OcrReader, "read", broken)
    kb = KnowledgeBase(embedder=FakeEmbedder())
    results = kb.add_documents([("broken.pdf", scanned_page()), ("fine.pdf", text_pdf([TEXT_LINES]))])
    assert [r.status for r in results] == ["error", "added"]
    assert results[0].message == ("broken.pdf: has no text layer in its 1 page(s) (a scan?) and OCR failed on 1 of "
                                  "them (first error: RuntimeError: renderer crashed)")


def test_too_many_pages_to_ocr_is_refused(monkeypatch):
    monkeypatch.setenv("MEMCHAT_MAX_OCR_PAGES", "1")
    with pytest.raises(BadDocumentError, match="2 pages without a text layer to OCR, over the 1-page limit.*MEMCHAT_MAX_OCR_PAGES"):
        extract_pdf(image_pdf([SCAN_LINES[:1], SCAN_LINES[1:2]]), "two.pdf")


def test_a_page_whose_text_extraction_fails_is_read_from_its_image(monkeypatch):
    import pypdf

    def broken(self, *args, **kwargs):
        raise ValueError("bad content stream")

    monkeypatch.setattr(pypdf.PageObject, "extract_text", broken)
    doc = extract_pdf(text_pdf([["Hello from a broken content stream"]], font_size=20), "broken.pdf",
                      limits=IngestConfig(ocr=True))
    assert doc.pages[0].ocr and "broken content stream" in doc.pages[0].text


def test_a_title_page_with_a_few_words_is_not_ocrd(monkeypatch):
    monkeypatch.setattr(ocr.OcrReader, "read", lambda self, i: pytest.fail("rendered a page that has its text"))
    doc = extract_pdf(text_pdf([["Chapter 1"], TEXT_LINES]), "book.pdf", limits=IngestConfig(ocr=True))
    assert doc.pages[0].text == "Chapter 1" and not doc.pages[0].ocr


# ---------------------------------------------------------------------------
# Reading order
# ---------------------------------------------------------------------------
def _line(x0, y, words, h=20, w=12):
    """Boxes for one line of words starting at x0 (a box per word, as the detector sometimes gives)."""
    boxes, x = [], x0
    for word in words.split():
        boxes.append(ocr.Box(x, y, x + w * len(word), y + h, word))
        x += w * (len(word) + 1)
    return boxes


def test_two_columns_are_read_column_by_column():
    boxes = _line(50, 10, "A Title Across Both")
    left = ["one two three", "four five six", "seven eight"]
    right = ["alpha beta gamma", "delta epsilon", "zeta eta"]
    for i, (a, b) in enumerate(zip(left, right)):
        boxes += _line(50, 60 + 30 * i, a) + _line(320, 60 + 30 * i, b)
    text = ocr.layout(boxes[::-1])  # order in, order out: the input order must not matter
    assert text.split() == "A Title Across Both one two three four five six seven eight alpha beta gamma delta epsilon zeta eta".split()
    assert text.startswith("A Title Across Both\n\n")


def test_a_gap_between_two_words_of_one_line_is_not_a_column():
    boxes = _line(50, 10, "there was a light behind him.") + _line(430, 10, "He")  # a 2-letter gap
    boxes += _line(50, 40, "got up and stretched his neck out")
    assert ocr.layout(boxes) == "there was a light behind him. He\ngot up and stretched his neck out"


def test_spaces_come_back_from_the_recognisers_columns():
    # "onthenorthern" as RapidOCR read it, with the CTC column of each character.
    text, cols = "onthenorthern", [1, 4, 10, 13, 18, 24, 28, 32, 34, 37, 42, 46, 48]
    assert ocr._respace(text, cols) == "on the northern"
    assert ocr._respace("RECORD", [0, 6, 12, 18, 24, 30]) == "RECORD"  # capitals are read wider apart
    assert ocr._respace("end.", [0, 3, 6, 12]) == "end."  # no space before punctuation
    assert ocr._respace("odd", [0, 3]) == "odd"  # an alignment that does not fit is left alone


# ---------------------------------------------------------------------------
# The real scanned files
# ---------------------------------------------------------------------------
def test_c02_22_agrees_with_the_transcription():
    doc = extracted_scan("c02-22.pdf")
    assert [p.ocr for p in doc.pages] == [True]
    reference = (TESTDATA / "c02-22.txt").read_text()
    recall, precision = ocr.word_agreement(reference, doc.pages[0].text)
    assert recall >= 0.90 and precision >= 0.90, (recall, precision, doc.pages[0].text)


def test_scanned_files_are_searchable():
    kb = KnowledgeBase(embedder=FakeEmbedder())
    results = kb.add_documents([SCANNED / "c02-22.pdf", SCANNED / "linn.pdf"])
    assert [r.status for r in results] == ["added", "added"], [r.message for r in results]
    hit = kb.search("We scrouched down and laid still", k=1)[0]
    assert (hit.document, hit.citation) == ("c02-22.pdf", "c02-22.pdf, p. 1, OCR")
    hit = kb.search("32 Track MIDI Sequence Recorder", k=1)[0]
    assert hit.document == "linn.pdf" and "Sequence Recorder" in hit.text


def test_a_scan_with_a_text_layer_is_not_ocrd_again(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("OCR must not run on a page that has a text layer")

    monkeypatch.setattr(ocr, "OcrReader", refuse)
    doc = extract_pdf_file(SCANNED / "Seige_of_Vicksburg_Sample_OCR.pdf", limits=IngestConfig(ocr=True))
    assert doc.num_pages == 6 and not any(p.ocr for p in doc.pages) and all(p.text for p in doc.pages)


def test_a_huge_page_is_rendered_at_a_bounded_size():
    from tests.pdfmaker import text_pdf

    huge = text_pdf([["A poster"]], width=14400, height=14400)  # 200 x 200 inches: 40,000 px a side at 200 dpi
    with ocr.OcrReader(huge, dpi=200) as reader:
        image = reader.render(0)
    assert max(image.shape[:2]) <= 4000
