"""memchat.pdf on the real PDFs in ../shared/data (see PROVENANCE.md there).

Extraction of the big files is cached per process (``extracted``); test_chunking reuses it.
"""

from __future__ import annotations

import functools
import io
import json
import logging
import os
import re
import unicodedata
import zipfile
from pathlib import Path

import pypdf
import pytest

from memchat.errors import BadDocumentError, MemChatError
from memchat.pdf import ExtractedDocument, Page, _clean_page, extract_pdf, extract_pdf_file

DATA = Path(os.environ.get("MEMCHAT_TEST_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
PDFS = DATA / "pdfs"
QA_DEV = DATA / "qa_dev"



@functools.cache
def manifest() -> dict[str, dict]:
    return {entry["file"]: entry for entry in json.loads((PDFS / "manifest.json").read_text())}


@functools.cache
def extracted(relpath: str, password: str | None = None) -> ExtractedDocument:
    """One extraction per file per test session (the big ones take seconds)."""
    return extract_pdf_file(PDFS / relpath, password=password)


@functools.cache
def japanese_sample() -> ExtractedDocument:
    """Pages 15-30 of the Japanese manual as their own PDF: the CJK cases at a fifth of the cost."""
    reader = pypdf.PdfReader(PDFS / "non_english/debian-edu-bullseye-manual-ja.pdf")
    writer = pypdf.PdfWriter()
    for i in range(14, 30):
        writer.add_page(reader.pages[i])
    buf = io.BytesIO()
    writer.write(buf)
    return extract_pdf(buf.getvalue(), "debian-edu-ja-p15-30.pdf")


def normalise(text: str) -> str:
    return " ".join(unicodedata.normalize("NFKC", text).split())


# ---------------------------------------------------------------------------
# The files in bad/: every one has a stated outcome
# ---------------------------------------------------------------------------
REFUSED = {
    "empty.pdf": "is empty (0 bytes)",
    "invalid.pdf": "is damaged and cannot be read",
    "crazyones-encrypted-256.pdf": "is password-protected; give its password",
    "libreoffice-writer-password.pdf": "is password-protected; give its password",
    "password-example.pdf": "is password-protected; give its password",
}
# pypdf's lenient mode repairs these; the text proves the repair worked.
RECOVERED = {
    "helloworld-bad.pdf": r"Hello, world!",
    "issue-297.pdf": r"test example",
    "r6-empty-password.pdf": r"pdf encryption test\s+password: asdfzxcv",
    "malformed-from-issue-932.pdf": r"2021\D{1,3}3\D{1,3}31",  # a date
}


def test_every_bad_file_has_an_expected_outcome():
    assert {p.name for p in (PDFS / "bad").glob("*.pdf")} == set(REFUSED) | set(RECOVERED)


@pytest.mark.parametrize("filename", sorted(REFUSED))
def test_bad_file_is_refused_with_a_reason(filename):
    with pytest.raises(BadDocumentError) as info:
        extract_pdf_file(PDFS / "bad" / filename)
    err = info.value
    assert isinstance(err, MemChatError)
    assert err.name == filename
    assert REFUSED[filename] in err.reason
    assert str(err).startswith(f"{filename}: ")


@pytest.mark.parametrize("filename", sorted(RECOVERED))
def test_damaged_but_readable_file_is_recovered(filename):
    doc = extracted(f"bad/{filename}")
    assert doc.num_pages == manifest()[f"bad/{filename}"]["pages"] == 1
    assert re.search(RECOVERED[filename], doc.pages[0].text), doc.pages[0].text


def test_password_files_open_with_their_password():
    protected = [e for e in manifest().values() if e["password"]]
    assert len(protected) == 3
    for entry in protected:
        doc = extracted(entry["file"], password=entry["password"])
        assert doc.num_pages == entry["pages"]
        assert doc.sha256 == entry["sha256"]
        assert sum(len(p.text) for p in doc.pages) > 50, entry["file"]


def test_wrong_password_is_reported_as_wrong():
    with pytest.raises(BadDocumentError, match="password given does not open it"):
        extract_pdf_file(PDFS / "bad/password-example.pdf", password="not-the-password")


def test_password_on_an_unencrypted_file_is_ignored():
    assert extract_pdf_file(PDFS / "bad/helloworld-bad.pdf", password="x").pages[0].text == "Hello, world!"


@pytest.mark.parametrize("relpath", ["scanned/c02-22.pdf", "scanned/linn.pdf"])
def test_scanned_pdf_without_text_layer_asks_for_ocr_when_ocr_is_off(relpath):
    # With OCR on (the default) these are read: tests/test_ocr.py.
    with pytest.raises(BadDocumentError) as info:
        extract_pdf_file(PDFS / relpath, ocr=False)
    assert "has no extractable text" in info.value.reason
    assert "scanned image?" in info.value.reason
    assert "ocrmypdf" in info.value.reason


def test_text_file_renamed_to_pdf_is_not_a_pdf(tmp_path):
    fake = tmp_path / "notes.pdf"
    fake.write_bytes((QA_DEV / "contexts.jsonl").read_bytes())  # real text, wrong extension
    with pytest.raises(BadDocumentError) as info:
        extract_pdf_file(fake)
    assert info.value.name == "notes.pdf"
    assert "is not a PDF" in info.value.reason
    assert "plain text" in info.value.reason
    assert "export or print it to PDF" in info.value.reason


def test_office_document_is_named_as_such():
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("word/document.xml", "<w:document/>")
    with pytest.raises(BadDocumentError, match="Office document"):
        extract_pdf(buf.getvalue(), "report.pdf")


def test_truncated_pdf_is_damaged_not_a_crash():
    data = (PDFS / "papers_tables/tracemonkey.pdf").read_bytes()[:4000]
    with pytest.raises(BadDocumentError, match="damaged|no extractable text"):
        extract_pdf(data, "cut.pdf")


def test_missing_file_is_a_bad_document(tmp_path):
    with pytest.raises(BadDocumentError, match="cannot be read"):
        extract_pdf_file(tmp_path / "nowhere.pdf")


# ---------------------------------------------------------------------------
# Good files: pages, identity, cleaning
# ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    "relpath",
    ["manuals/R-intro.pdf", "papers_tables/tracemonkey.pdf", "non_english/2023-06-20-PV.pdf", "scanned/Seige_of_Vicksburg_Sample_OCR.pdf", "non_english/multilang.pdf"],
)
def test_every_page_is_kept_and_numbered(relpath):
    doc = extracted(relpath)
    entry = manifest()[relpath]
    assert doc.name == Path(relpath).name
    assert doc.sha256 == entry["sha256"]
    assert doc.num_pages == len(doc.pages) == entry["pages"]
    assert [p.number for p in doc.pages] == list(range(1, entry["pages"] + 1))
    assert all(isinstance(p, Page) and p.text == p.text.strip() for p in doc.pages)


def test_known_phrases_are_on_their_pages():
    doc = extracted("manuals/R-intro.pdf")
    # Page numbers as a viewer counts them (the printed folio is 6 lower in the main matter).
    assert "Command lines entered at the console are limited" in doc.pages[11 - 1].text
    assert "Other looping facilities include" in doc.pages[50 - 1].text
    assert "Appendix F References" in doc.pages[113 - 1].text
    assert "Appendix F References" not in doc.pages[112 - 1].text


def test_ligatures_become_plain_letters():
    raw = "".join(p.extract_text() for p in pypdf.PdfReader(PDFS / "papers_tables/tracemonkey.pdf").pages[:2])
    assert "ﬁ" in raw  # the test means something only if the file really has ligatures
    text = "\n".join(p.text for p in extracted("papers_tables/tracemonkey.pdf").pages)
    assert not re.search("[\ufb00-\ufb06]", text)
    assert "difficult" in text and "identifies" in text and "on the fly" in text


def test_line_end_hyphens_are_joined_unless_the_document_hyphenates_the_word():
    text = "\n".join(p.text for p in extracted("papers_tables/tracemonkey.pdf").pages)
    assert "more difficult to compile" in text  # "com-\npile" in the PDF
    assert "Programming Languages]" in text  # "Lan-\nguages"
    # "type-\nunstable" in the PDF; the paper writes "type-unstable" elsewhere, never "typeunstable".
    assert "type-unstable" in text and "typeunstable" not in text


def test_whitespace_is_tidied():
    doc = extracted("scanned/Seige_of_Vicksburg_Sample_OCR.pdf")
    assert doc.pages[0].text.startswith("THE SIEGE OF VICKSBURG.")  # "THE   SIEGE   OF" in the OCR layer
    for page in doc.pages:
        assert "  " not in page.text and "\t" not in page.text and "\n\n\n" not in page.text
        assert all(line == line.strip() for line in page.text.split("\n"))


def test_cjk_text_loses_justification_spaces_and_line_breaks():
    page = japanese_sample().pages[21 - 15]  # page 21 of the manual
    assert "標準の Xfce デスクトップではなく" in page.text  # "標 準 の Xfce デ ス ク ト ッ プ" in the PDF
    assert "高速化できます" in page.text  # "高速\n化できます"
    multilang = extracted("non_english/multilang.pdf").pages[0].text
    for word in ("Hello World", "مرحبا بالعالم", "Привет, мир", "你好世界", "สวัสดีชาวโลก", "こんにちは世界"):
        assert word in multilang


def test_accents_survive():
    text = extracted("non_english/2023-06-20-PV.pdf").pages[0].text
    assert "COMITÉ DE DÉMOLITION" in text and "PROCÈS-VERBAL" in text and "Gaëtan" in text


def test_qa_dev_paragraphs_survive_cleaning_verbatim():
    contexts = [json.loads(line) for line in (QA_DEV / "contexts.jsonl").read_text().splitlines() if line.strip()]
    assert sum(len(c["paragraphs"]) for c in contexts) == 10
    for context in contexts:
        doc = extract_pdf_file(QA_DEV / "pdfs" / context["doc"])
        text = normalise("\n".join(p.text for p in doc.pages))
        for paragraph in context["paragraphs"]:
            assert normalise(paragraph) in text, (context["doc"], paragraph[:60])


def test_paragraphs_are_separated_by_blank_lines():
    # Geology's three paragraphs end with short lines, so each becomes its own block.
    context = json.loads((QA_DEV / "contexts.jsonl").read_text().splitlines()[0])
    assert context["doc"] == "dev_01_Geology.pdf"
    text = extract_pdf_file(QA_DEV / "pdfs" / context["doc"]).pages[0].text
    blocks = [normalise(b) for b in text.split("\n\n")]
    assert blocks[:2] == ["Geology", "Excerpt from the English Wikipedia article of this title."]
    assert blocks[2:5] == [normalise(p) for p in context["paragraphs"]]


def test_clean_page_rules():
    words = {"compile", "well", "known"}
    hyphenated = {"run-time", "well-known"}
    raw = unicodedata.normalize("NFKC", "Eﬃcient  com-\npile at run-\ntime,\tthe well-\nknown\u200b x\x00y\u00a0z. Soft\u00ad\nhyphen.")
    # The rejoined word moves up a line; the rest of its line stays where it was.
    assert _clean_page(raw, hyphenated, words) == "Efficient compile\nat run-time,\nthe well-known\nxy z. Softhyphen."
    # Upper-case after a hyphen: a name or a list, not a broken word.
    assert _clean_page("Jean-\nPaul", set(), set()) == "Jean-\nPaul"


# ---------------------------------------------------------------------------
# Robustness: one bad page, pypdf's logging
# ---------------------------------------------------------------------------
def test_a_failing_page_is_kept_empty_and_logged(monkeypatch, caplog):
    original = pypdf.PageObject.extract_text
    calls = {"n": 0}

    def flaky(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyError("/Contents")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(pypdf.PageObject, "extract_text", flaky)
    with caplog.at_level(logging.WARNING, logger="memchat.pdf"):
        doc = extract_pdf_file(PDFS / "scanned/Seige_of_Vicksburg_Sample_OCR.pdf", ocr=False)  # OCR would read the scan
    assert doc.num_pages == 6
    assert doc.pages[1].text == ""
    assert all(p.text for i, p in enumerate(doc.pages) if i != 1)
    assert any("page 2" in r.getMessage() and "KeyError" in r.getMessage() for r in caplog.records)


def test_every_page_failing_is_a_damaged_document(monkeypatch):
    def broken(self, *args, **kwargs):
        raise ValueError("bad content stream")

    monkeypatch.setattr(pypdf.PageObject, "extract_text", broken)
    with pytest.raises(BadDocumentError, match="failed on 1 of 1 page.*bad content stream"):
        extract_pdf_file(PDFS / "bad/helloworld-bad.pdf", ocr=False)  # with OCR on, the page is read from its image


def test_pypdf_repair_noise_becomes_one_line(caplog):
    pypdf_logger = logging.getLogger("pypdf")
    before = (pypdf_logger.propagate, list(pypdf_logger.handlers))
    with caplog.at_level(logging.DEBUG):
        extract_pdf_file(PDFS / "bad/issue-297.pdf")
    assert not [r for r in caplog.records if r.name.startswith("pypdf")]
    summary = [r for r in caplog.records if r.name == "memchat.pdf"]
    assert len(summary) == 1 and "startxref" in summary[0].getMessage()
    assert (pypdf_logger.propagate, list(pypdf_logger.handlers)) == before  # restored afterwards


# ---------------------------------------------------------------------------
# Running heads and footers
# ---------------------------------------------------------------------------
def _report(pages: int = 6, repeated_twice: str | None = None, repeated_inside: str | None = None) -> bytes:
    from tests.pdfmaker import text_pdf

    words = "storm lamp keeper tide rock gull fog bell oil wick lens tower reef ship harbour".split()
    out = []
    for n in range(1, pages + 1):
        lines = [(760, "Annual Report of the Lighthouse Board")]
        if repeated_twice and n in (2, 5):
            lines.append((730, repeated_twice))
        body = [f"On page {n} the {words[(n + i) % 15]} and the {words[(2 * n + i) % 15]} of line {i} were noted."
                for i in range(8)]
        if repeated_inside:
            body.insert(4, repeated_inside)
        lines += [(700 - 14 * i, line) for i, line in enumerate(body)]
        lines.append((40, f"Page {n} of {pages}" if n % 2 else f"- {n} -"))
        out.append(lines)
    return text_pdf(out)


def test_running_head_and_page_numbers_are_dropped():
    doc = extract_pdf(_report(), "report.pdf")
    for n, page in enumerate(doc.pages, 1):
        assert "Lighthouse Board" not in page.text and "Page " not in page.text and f"- {n} -" not in page.text
        assert page.text.startswith(f"On page {n} the") and page.text.endswith("of line 7 were noted.")  # the body stays


def test_a_line_repeated_on_two_pages_or_inside_the_text_stays():
    doc = extract_pdf(_report(repeated_twice="Keepers must log every storm.",
                              repeated_inside="See the table of storms below."), "report.pdf")
    assert [p.number for p in doc.pages if "Keepers must log every storm." in p.text] == [2, 5]
    assert all("See the table of storms below." in p.text for p in doc.pages)  # on every page, but not at an edge


def test_too_few_pages_for_running_lines():
    doc = extract_pdf(_report(pages=2), "short.pdf")
    assert all("Lighthouse Board" in p.text for p in doc.pages)


def test_freeculture_printer_margins_are_gone():
    pages = extracted("large/freeculture.pdf").pages
    text = "\n".join(p.text for p in pages)
    for mark in ("4TH PASS PAGES", ".qxd", "free-culture.org/get-it"):
        assert mark not in text
    assert not re.search(r"(?m)(^\d{1,2}\n){5,}", text)  # the margin's line numbers 1..33
    assert "the\nFCC announced a set of policies" in text  # the book is still there


# ---------------------------------------------------------------------------
# Paragraph breaks from the layout
# ---------------------------------------------------------------------------
_FULL = [
    "The keepers climbed the tower every evening at dusk and lit the great lamp",
    "that warned the ships away from the reef. They trimmed the wicks and wound",
    "the clockwork that turned the lens, and they wrote the weather in the log.",
]
_NEXT = [
    "In winter the work was harder, because the oil thickened in the cold and the",
    "glass frosted over on the inside of the lantern room before every dawn came.",
    "Nobody on the island remembered a night when the light had failed to shine.",
]


def _two_paragraphs(indent: float = 0, gap: float = 0) -> bytes:
    from tests.pdfmaker import text_pdf

    lines = [(700 - 14 * i, t) for i, t in enumerate(_FULL)]
    top = 700 - 14 * len(_FULL) - gap
    lines += [(top - 14 * i, t, indent if i == 0 else 0) for i, t in enumerate(_NEXT)]
    return text_pdf([lines])


@pytest.mark.parametrize("indent, gap", [(18, 0), (0, 10)], ids=["indented", "spaced"])
def test_a_paragraph_whose_last_line_is_full_is_still_a_paragraph(indent, gap):
    text = extract_pdf(_two_paragraphs(indent, gap), "p.pdf").pages[0].text
    assert "in the log.\n\nIn winter" in text
    assert "reef. They" in text.replace("\n", " ")  # a sentence ending inside a paragraph: no break


def test_a_sentence_ending_at_a_line_end_is_no_paragraph_break():
    text = extract_pdf(_two_paragraphs(0, 0), "p.pdf").pages[0].text
    assert "in the log.\nIn winter" in text


# ---------------------------------------------------------------------------
# Reading order in multi-column layouts
# ---------------------------------------------------------------------------
# Sentences that run over several lines of one column, read off the rendered pages by eye
# (tracemonkey p. 2: two columns; federal-register p. 3: three). A column-splicing reader
# would interleave them with the neighbouring column.
COLUMN_PASSAGES = {
    ("papers_tables/tracemonkey.pdf", 2): [
        "If an exit becomes hot, the VM can record a branch trace starting at the exit to cover the new path.",
        "When the inner loop exits, the VM would detect that a different branch was taken.",
        "Alternatively, the VM could simply stop tracing, and give up on ever tracing outer loops.",
        "primes is initialized to an array of 100 false values on entry to this code snippet.",
    ],
    ("papers_tables/federal-register-2020-17221.pdf", 3): [
        "The new master minimum equipment list (MMEL), approved by the FAA, was published on April 10, 2020, "
        "after undergoing a public notice and comment process.",
        "An undesired MCAS activation could prompt the flightcrew to perform a non-normal procedure.",
        "First, as previously discussed, the flight control laws would be changed to instead use inputs from two "
        "AOA sensors for MCAS activation, so that there would not be an undesired MCAS activation due to a single "
        "AOA sensor failure that could lead a flightcrew to perform a non-normal procedure.",
        "These markers, labeled INOP, indicate that one of the positions on the dial that selects display settings "
        "is inoperative.",
        "All transport category airplanes have non-normal checklists to aid the pilots in responding to airplane failures.",
    ],
}


@pytest.mark.parametrize("relpath, page", sorted(COLUMN_PASSAGES))
def test_sentences_are_not_spliced_across_columns(relpath, page):
    from memchat.ocr import words

    text = " ".join(words(extracted(relpath).pages[page - 1].text))
    missing = [p for p in COLUMN_PASSAGES[relpath, page] if " ".join(words(p)) not in text]
    assert not missing
