"""PDF bytes -> numbered pages of clean text, or a BadDocumentError that says why not.

``extract_pdf`` opens the file with pypdf in its default lenient mode (which repairs
broken cross-reference tables), decrypts it when it can (with the password given, else
the empty one, which opens PDFs that only restrict printing or copying), extracts each
page's text and cleans it:

* NFKC normalisation, so ligatures ("ﬁ" -> "fi"), full-width forms and odd spaces
  become the plain characters a user types into a question;
* control and zero-width characters dropped, runs of spaces collapsed, lines stripped;
* words hyphenated at a line end joined again ("com-\\npile" -> "compile"), keeping the
  hyphen when the document writes the word hyphenated elsewhere and never joined ("run-time");
* CJK lines re-joined without a space, and spaces between CJK characters (left by
  justified Japanese/Chinese text) removed, since those scripts do not use them;
* paragraphs kept as "\\n\\n". pypdf rarely gives blank lines, so a paragraph end is
  inferred from layout: a line that ends a sentence and is clearly shorter than the
  page's typical line, or a short heading-like line between two sentences, or a line
  ending a sentence before a line that the page shows indented or set apart (positions
  from pypdf's text visitor). Other line breaks stay "\\n" (code and tables keep their shape);
* running heads, footers, page numbers and printer's marks dropped: lines on 40% of the
  pages or more (digits and roman numerals folded, so folios match) at a page's start or
  end, or in blocks inside it; a line that is on only two pages, or inside the text, stays.

Pages with no text layer (or a near-empty one under a page-sized image) are read by OCR
(``memchat.ocr``), unless it is off; their ``Page.ocr`` is True. The caps of
``config.IngestConfig`` (bytes, pages, characters, pages to OCR) are checked as
extraction goes: a file over one raises LimitError without being read to the end.

Every page is kept, empty or not, so ``pages[i].number == i + 1`` always holds.

Deliberately left out: layout analysis of text layers (reading order, columns and tables
are pypdf's; the two- and three-column test files come out column by column), a timeout
for a page whose extraction hangs (a thread cannot be stopped; a process pool would cost
more than it saves for the files users add), and anything that imports torch.
"""

from __future__ import annotations

import hashlib
import io
import logging
import re
import threading
import unicodedata
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pypdf
from pypdf import PasswordType

from memchat.config import IngestConfig
from memchat.errors import BadDocumentError, LimitError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Page:
    number: int  # 1-based, as a PDF viewer counts (not the printed folio)
    text: str  # cleaned; "" for a page without text
    ocr: bool = False  # the text was read from the rendered page by OCR (no text layer)


@dataclass(frozen=True)
class ExtractedDocument:
    name: str  # display name, usually the file name
    sha256: str  # hex digest of the raw bytes: identifies a version of the document
    pages: list[Page]  # every page, in order, empty ones included

    @property
    def num_pages(self) -> int:
        return len(self.pages)


PageFn = Callable[[int, int, str], None]  # (pages done, pages in all, stage: "text" | "OCR")


# ---------------------------------------------------------------------------
# Public entry points
# ---------------------------------------------------------------------------
_REPAIR_HINT = "re-save it from a PDF viewer (Print -> Save as PDF) or repair it, e.g. qpdf in.pdf repaired.pdf"


def extract_pdf(
    data: bytes,
    name: str,
    password: str | None = None,
    *,
    limits: IngestConfig | None = None,
    ocr: bool | None = None,
    on_page: PageFn | None = None,
) -> ExtractedDocument:
    """Extract and clean the text of every page of a PDF given as bytes.

    Raises BadDocumentError for an empty file, a file that is not a PDF, a damaged PDF,
    a password-protected PDF without the right password, and a PDF with no text at all;
    LimitError (a BadDocumentError) for a file over a cap of ``limits`` (bytes, pages,
    characters), checked as extraction goes so that it stops at the cap.
    A page whose extraction fails is logged and kept empty; the rest of the file is used.
    Pages with no (or a near-empty) text layer are read by OCR unless ``ocr`` (default:
    ``limits.ocr``) is off; their ``Page.ocr`` is True. ``on_page`` is called after each
    page of the text pass, then after each page of the OCR pass.
    """
    limits = limits or IngestConfig()
    if not data:
        raise BadDocumentError(name, "is empty (0 bytes); the upload or download probably failed, so fetch the file again")
    # The spec puts %PDF- first; readers (and we) accept it anywhere in the first 1 KiB.
    if b"%PDF-" not in data[:1024]:
        raise BadDocumentError(
            name, f"is not a PDF ({_sniff(data)}); only PDF files can be added, so export or print it to PDF first"
        )
    _check_size(len(data), name, limits)
    sha256 = hashlib.sha256(data).hexdigest()

    with _pypdf_notes() as notes:
        reader = _open(data, name, password)
        if len(reader.pages) > limits.max_pages:
            raise LimitError(name, f"has {len(reader.pages):,} pages, over the {limits.max_pages:,}-page limit; "
                             "raise MEMCHAT_MAX_PAGES if you trust it")
        raw_pages, failures, starts = _extract_raw(reader, name, limits.max_chars, on_page)
    if notes:
        level = logging.WARNING if any(lvl >= logging.ERROR for lvl, _ in notes) else logging.INFO
        log.log(level, "%s: pypdf met %d problem(s) while reading, first: %s", name, len(notes), notes[0][1])

    texts = [unicodedata.normalize("NFKC", t) for t in raw_pages]
    # Pages whose text layer is empty or nearly so (a scanner's stamp, a page number).
    textless = [i for i, t in enumerate(texts) if len("".join(t.split())) < limits.ocr_min_chars]
    use_ocr = limits.ocr if ocr is None else ocr
    read_by_ocr: set[int] = set()
    ocr_problem = None  # why OCR did not give the textless pages any text
    if textless and use_ocr:
        tiny = {i for i in textless if texts[i].strip()}
        found, ocr_problem = _ocr_pages(data, name, password, textless, tiny, sum(map(len, texts)), limits, on_page)
        for i, text in found.items():
            text = unicodedata.normalize("NFKC", text)
            layer = texts[i].strip()
            # A few words of text layer that OCR did not read too (a date typed onto a scan) are kept.
            if layer and not set(_TOKEN.findall(layer.lower())) <= set(_TOKEN.findall(text.lower())):
                text = f"{text}\n\n{layer}"
            texts[i] = text
            read_by_ocr.add(i)
    texts = _drop_running_lines(texts)
    hyphenated, words = _vocabulary(texts)
    pages = [Page(number=i + 1, text=_clean_page(t, hyphenated, words, set() if i in read_by_ocr else starts[i]),
                  ocr=i in read_by_ocr) for i, t in enumerate(texts)]
    if not any(p.text for p in pages):
        if ocr_problem:
            raise BadDocumentError(name, f"has no text layer in its {len(pages)} page(s) (a scan?) and {ocr_problem}")
        if failures:
            raise BadDocumentError(
                name,
                f"is damaged: text extraction failed on {len(failures)} of {len(pages)} page(s) and the rest "
                f"have no text (first error: {failures[0]}); {_REPAIR_HINT}",
            )
        if use_ocr:  # OCR ran on every page and read nothing
            raise BadDocumentError(name, f"has no extractable text in its {len(pages)} page(s), and OCR found no "
                                   "words on them either (blank pages, or pictures without text?)")
        raise BadDocumentError(
            name,
            f"has no extractable text in its {len(pages)} page(s) (scanned image?); "
            "run OCR first, e.g. ocrmypdf in.pdf out.pdf, then add out.pdf, or leave the built-in OCR on "
            "(no --no-ocr, no MEMCHAT_OCR=0)",
        )
    if ocr_problem:
        log.warning("%s: %d page(s) without a text layer will not be searchable: %s", name, len(textless) - len(read_by_ocr), ocr_problem)
    if read_by_ocr:
        log.info("%s: read %d page(s) by OCR", name, len(read_by_ocr))
    empty = sum(not p.text for p in pages)
    if empty * 2 > len(pages):  # blank versos are normal; a majority of empty pages is not
        log.warning("%s: %d of %d pages have no text (scanned?); they will not be searchable", name, empty, len(pages))
    return ExtractedDocument(name=name, sha256=sha256, pages=pages)


def extract_pdf_file(
    path: str | Path,
    password: str | None = None,
    *,
    limits: IngestConfig | None = None,
    ocr: bool | None = None,
    on_page: PageFn | None = None,
) -> ExtractedDocument:
    """``extract_pdf`` on a file; the document's name is the file name. A file over the byte cap is not read."""
    path = Path(path)
    limits = limits or IngestConfig()
    try:
        _check_size(path.stat().st_size, path.name, limits)  # before holding it in memory
        data = path.read_bytes()
    except OSError as exc:
        # A missing or unreadable file is the user's document problem, reported the same way.
        raise BadDocumentError(path.name, f"cannot be read ({exc.strerror or exc}); check the path {path}") from exc
    return extract_pdf(data, path.name, password=password, limits=limits, ocr=ocr, on_page=on_page)


# ---------------------------------------------------------------------------
# Opening and extracting
# ---------------------------------------------------------------------------
def _check_size(size: int, name: str, limits: IngestConfig) -> None:
    if size > limits.max_file_bytes:
        raise LimitError(name, f"is {_size(size)}, over the {_size(limits.max_file_bytes)} limit per file; "
                         "raise MEMCHAT_MAX_FILE_BYTES if you trust it")


def _open(data: bytes, name: str, password: str | None) -> pypdf.PdfReader:
    # pypdf on malformed input can raise almost anything (PdfReadError, KeyError,
    # ValueError, RecursionError...), so the boundary catches Exception and reports it.
    try:
        # strict=False (the default) repairs broken xref tables and wrong startxref offsets.
        reader = pypdf.PdfReader(io.BytesIO(data), strict=False)
        encrypted = reader.is_encrypted
    except Exception as exc:
        raise BadDocumentError(name, f"is damaged and cannot be read ({_describe(exc)}); {_REPAIR_HINT}") from exc

    if encrypted:
        try:
            # The empty password opens files that only restrict printing/copying (owner password).
            result = reader.decrypt(password or "")
            if result == PasswordType.NOT_DECRYPTED and password:
                # A wrong password given: still try the empty one before refusing.
                result = reader.decrypt("")
        except Exception as exc:  # unsupported encryption, missing crypto backend, broken dictionary
            raise BadDocumentError(name, f"is encrypted in a way that cannot be opened ({_describe(exc)}); "
                                   "save an unprotected copy first, e.g. qpdf --decrypt in.pdf out.pdf") from exc
        if result == PasswordType.NOT_DECRYPTED:
            if password:
                raise BadDocumentError(name, "is password-protected and the password given does not open it; check the password")
            raise BadDocumentError(
                name,
                "is password-protected; give its password, or save an unprotected copy first, "
                "e.g. qpdf --decrypt --password=PASSWORD in.pdf out.pdf",
            )

    try:
        num_pages = len(reader.pages)
    except Exception as exc:
        raise BadDocumentError(name, f"is damaged: its page tree cannot be read ({_describe(exc)}); {_REPAIR_HINT}") from exc
    if num_pages == 0:
        raise BadDocumentError(name, "has no pages")
    return reader


class _OverCap(Exception):
    """Raised from inside pypdf's text visitor: the character cap is passed mid-page."""


def _extract_raw(
    reader: pypdf.PdfReader, name: str, max_chars: int, on_page: PageFn | None = None
) -> tuple[list[str], list[str], list[set[str]]]:
    """Raw pypdf text per page (a page that fails is logged and becomes ""), the failures,
    and per page the starts of lines that the layout marks as new paragraphs (``_paragraph_starts``).

    Raises LimitError as soon as the text passes ``max_chars``: pypdf calls a visitor for
    every piece of text it shows, so one page of a huge content stream stops at the cap too.
    """
    texts: list[str] = []
    failures: list[str] = []
    starts: list[set[str]] = []
    num_pages = len(reader.pages)
    used = 0  # characters of the pages so far
    for i in range(num_pages):
        seen, text = 0, ""
        pieces: list[tuple[float, float, str]] = []  # (x, y, text) of each text operation, user space

        def count(piece: str, cm, tm, *_args) -> None:
            nonlocal seen
            seen += len(piece)
            if used + seen > max_chars:
                raise _OverCap
            if piece.strip():
                pieces.append((tm[4] * cm[0] + tm[5] * cm[2] + cm[4], tm[4] * cm[1] + tm[5] * cm[3] + cm[5], piece))

        try:
            text = reader.pages[i].extract_text(visitor_text=count) or ""
            if used + len(text) > max_chars:
                raise _OverCap
        except _OverCap:
            cap = _count(max_chars)
            if i + 1 < num_pages:  # project from the pages read whole (the one cut short, if none)
                projected = used * num_pages // i if i else max(seen, len(text)) * num_pages
                size = f"about {_count(max(projected, max_chars + 1))} characters (over {cap} in its first {i + 1:,} of {num_pages:,} pages)"
            else:
                size = f"more than {cap} characters"
            raise LimitError(name, f"expands to {size}, over the {cap} limit; raise MEMCHAT_MAX_CHARS if you trust it") from None
        except Exception as exc:  # one broken content stream must not lose the other pages
            failures.append(_describe(exc))
            log.warning("%s: page %d: text extraction failed (%s); page kept empty", name, i + 1, failures[-1])
            text = ""
        used += len(text)
        texts.append(text)
        starts.append(_paragraph_starts(pieces) if text else set())
        if on_page:
            on_page(i + 1, num_pages, "text")
    return texts, failures, starts


_START_KEY = 24  # characters of a line's start that identify it on its page


def _start_key(text: str) -> str:
    return " ".join(unicodedata.normalize("NFKC", text).split())[:_START_KEY]


def _paragraph_starts(pieces: list[tuple[float, float, str]]) -> set[str]:
    """Starts (``_start_key``) of the lines that open a paragraph by the layout: an indented
    first line, or a line after a gap wider than the usual line pitch (same column, below).

    Text alone cannot tell a paragraph that ends with a full-width line from a sentence that
    ends at a line end; where the text was put on the page can.
    """
    lines: list[list] = []  # [x, y, text] of each visual line, in content-stream order
    for x, y, piece in pieces:
        if lines and abs(lines[-1][1] - y) < 1.0:
            lines[-1][2] += piece
        else:
            lines.append([x, y, piece])
    if len(lines) < _MIN_LINES_FOR_LAYOUT:
        return set()
    steps = sorted(a[1] - b[1] for a, b in zip(lines, lines[1:]) if 0 < a[1] - b[1] < 50)
    if not steps:
        return set()
    pitch = steps[len(steps) // 2]  # the usual distance between two lines, in points
    found = set()
    for k in range(1, len(lines)):
        (x0, y0, _), (x, y, text) = lines[k - 1], lines[k]
        below = 0 < y0 - y
        after_gap = below and y0 - y > 1.4 * pitch and abs(x - x0) < 0.5 * pitch
        nxt = lines[k + 1] if k + 1 < len(lines) else None
        # Indented against both neighbours, which share a margin: a first line.
        indented = (below and nxt is not None and 0 < y - nxt[1] < 1.5 * pitch and abs(nxt[0] - x0) < 1.0
                    and 0.5 * pitch < x - x0 < 4 * pitch)
        if after_gap or indented:
            found.add(_start_key(text))
    return found


def _ocr_pages(
    data: bytes,
    name: str,
    password: str | None,
    indices: list[int],
    tiny: set[int],
    used: int,
    limits: IngestConfig,
    on_page: PageFn | None,
) -> tuple[dict[int, str], str | None]:
    """OCR text of the pages ``indices`` (0-based) that have any, and why the others have none.

    Pages in ``tiny`` have a few characters of text layer: they are read only when an image
    covers most of the page (a scan with a stamp), not a title page that says "Chapter 1".
    ``used`` characters are already extracted: OCR text counts against ``max_chars`` too.
    """
    from memchat import ocr

    if len(indices) > limits.max_ocr_pages:
        raise LimitError(name, f"has {len(indices):,} pages without a text layer to OCR, over the {limits.max_ocr_pages:,}-page "
                         "limit (OCR takes seconds a page); raise MEMCHAT_MAX_OCR_PAGES if you trust it")
    try:
        reader = ocr.OcrReader(data, password, dpi=limits.ocr_dpi)
    except ocr.OcrUnavailable as exc:
        return {}, f"OCR is not available: {exc}; or run OCR first, e.g. ocrmypdf in.pdf out.pdf, then add out.pdf"
    except Exception as exc:  # PDFium refuses a file pypdf repaired
        return {}, f"the OCR renderer cannot open it ({_describe(exc)}); run OCR first, e.g. ocrmypdf in.pdf out.pdf"
    found: dict[int, str] = {}
    failures: list[str] = []
    with reader:
        indices = [i for i in indices if i not in tiny or reader.image_share(i) >= _SCAN_IMAGE_SHARE]
        for k, i in enumerate(indices):
            try:
                text = reader.read(i)
            except ocr.OcrUnavailable as exc:  # the engine failed to load at its first page
                return found, f"OCR is not available: {exc}; or run OCR first, e.g. ocrmypdf in.pdf out.pdf"
            except Exception as exc:  # one page that cannot be rendered or read must not lose the others
                failures.append(_describe(exc))
                log.warning("%s: page %d: OCR failed (%s); page kept empty", name, i + 1, failures[-1])
                text = ""
            if text.strip():
                found[i] = text
                used += len(text)
                if used > limits.max_chars:
                    raise LimitError(name, f"expands to more than {_count(limits.max_chars)} characters with its OCR'd "
                                     f"pages, over the {_count(limits.max_chars)} limit; raise MEMCHAT_MAX_CHARS if you trust it")
            if on_page:
                on_page(k + 1, len(indices), "OCR")
    if len(found) == len(indices):
        return found, None
    if failures:
        return found, f"OCR failed on {len(failures)} of them (first error: {failures[0]})"
    return found, None  # the rest are blank or hold no words


_TOKEN = re.compile(r"[^\W_]+")  # letters or digits
_SCAN_IMAGE_SHARE = 0.5  # an image over half the page, under a near-empty text layer: a scan


def _count(n: int) -> str:
    """5000000 -> "5 million", 33781200 -> "34 million", 1500 -> "1,500"."""
    if n < 1_000_000:
        return f"{n:,}"
    m = n / 1e6
    return f"{m:.1f}".removesuffix(".0") + " million" if m < 10 else f"{m:,.0f} million"


def _size(n: int) -> str:
    return f"{n / 2**20:,.1f}".removesuffix(".0") + " MB" if n >= 2**20 else f"{n:,} bytes"


def _describe(exc: BaseException) -> str:
    msg = str(exc).strip()
    msg = f"{type(exc).__name__}: {msg}" if msg else type(exc).__name__
    return msg if len(msg) <= 200 else msg[:197] + "..."


def _sniff(data: bytes) -> str:
    """A guess at what a non-PDF file is, for the error message."""
    head = data[:512]
    for magic, kind in (
        (b"PK\x03\x04", "it looks like a ZIP archive or an Office document (.docx, .pptx, .odt)"),
        (b"\xd0\xcf\x11\xe0", "it looks like an old Microsoft Office document (.doc, .xls)"),
        (b"\x89PNG", "it looks like a PNG image"),
        (b"\xff\xd8\xff", "it looks like a JPEG image"),
        (b"{\\rtf", "it looks like an RTF document"),
    ):
        if head.startswith(magic):
            return kind
    if head.lstrip().lower().startswith((b"<!doctype html", b"<html")):
        return "it looks like a web page (HTML)"
    try:
        head.decode("utf-8")
    except UnicodeDecodeError:
        return "it has no %PDF- header"
    return "it looks like plain text: it has no %PDF- header"


# ---------------------------------------------------------------------------
# pypdf's logging
# ---------------------------------------------------------------------------
# pypdf logs a WARNING for every repair it makes ("incorrect startxref pointer", "Multiple
# definitions in dictionary", ...), dozens per damaged file, through the root logger to the
# user's terminal or Streamlit log. While we extract, its records go to a collector instead
# (per thread, since Streamlit runs sessions in threads) and we log one summary line.
# Entries are counted so overlapping extractions restore the logger only when the last ends.
# Meanwhile pypdf records from threads that are not extracting are dropped; nothing else here uses pypdf.
_PYPDF_LOG = logging.getLogger("pypdf")
_MAX_NOTES = 50


class _NoteCollector(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.by_thread: dict[int, list[tuple[int, str]]] = {}

    def emit(self, record: logging.LogRecord) -> None:
        notes = self.by_thread.get(record.thread or 0)
        if notes is not None and len(notes) < _MAX_NOTES:
            notes.append((record.levelno, record.getMessage()))


_collector = _NoteCollector()
_notes_lock = threading.Lock()
_notes_depth = 0
_saved_propagate = True


@contextmanager
def _pypdf_notes() -> Iterator[list[tuple[int, str]]]:
    global _notes_depth, _saved_propagate
    notes: list[tuple[int, str]] = []
    tid = threading.get_ident()
    with _notes_lock:
        if _notes_depth == 0:
            _saved_propagate = _PYPDF_LOG.propagate
            _PYPDF_LOG.propagate = False
            _PYPDF_LOG.addHandler(_collector)
        _notes_depth += 1
        _collector.by_thread[tid] = notes
    try:
        yield notes
    finally:
        with _notes_lock:
            _collector.by_thread.pop(tid, None)
            _notes_depth -= 1
            if _notes_depth == 0:
                _PYPDF_LOG.removeHandler(_collector)
                _PYPDF_LOG.propagate = _saved_propagate


# ---------------------------------------------------------------------------
# Cleaning
# ---------------------------------------------------------------------------
# Han, kana and CJK punctuation (after NFKC, so full-width and half-width forms are folded).
# Hangul is not here: Korean separates words with spaces.
_CJK = "\u3001-\u303f\u3040-\u30ff\u31f0-\u31ff\u3400-\u4dbf\u4e00-\u9fff\U00020000-\U0003134f"
_CJK_CHAR = re.compile(f"[{_CJK}]")
_SPACE_BETWEEN_CJK = re.compile(f"(?<=[{_CJK}]) (?=[{_CJK}])")
# Control characters (not \t \n), zero-width characters and BOMs: invisible, and they split words for search.
_INVISIBLE = re.compile("[\x00-\x08\x0e-\x1f\x7f-\x9f\u200b-\u200d\u2060\ufeff]")
_LINE_BREAKS = str.maketrans({"\r": "\n", "\x0b": "\n", "\x0c": "\n", "\u2028": "\n", "\u2029": "\n\n", "\t": " "})
_SPACES = re.compile(r" {2,}")
_LETTERS = r"[^\W\d_]"  # a letter in any script
# Anchored at a word start and possessive: on a run of letters without hyphens (an attack, or a
# page of one long token) the unanchored form backtracks from every letter, quadratic in the run.
_HYPHENATED_WORD = re.compile(rf"(?<!{_LETTERS}){_LETTERS}++(?:-{_LETTERS}++)+")
_WORD = re.compile(rf"{_LETTERS}+")
_BROKEN_WORD = re.compile(rf"({_LETTERS}+)-$")  # "...com-" at a line end
_LEADING_WORD = re.compile(rf"{_LETTERS}+")
# A line ends a sentence: terminal punctuation, optionally closed by quotes or brackets.
_ENDS_SENTENCE = re.compile(r"[.!?:。][\"'”’»)\]」』]*$")

_SHORT_LINE = 0.75  # of the page's typical line length: shorter sentence-final lines end paragraphs
_HEADING_LINE = 0.6  # shorter lines without final punctuation, between sentences, are headings
_MIN_LINES_FOR_LAYOUT = 4  # fewer lines give no reliable "typical" length


# ---------------------------------------------------------------------------
# Running heads and footers
# ---------------------------------------------------------------------------
_DIGITS = re.compile(r"\d+")
_ALNUM = re.compile(r"[^\W_]")
_ROMAN = re.compile(r"(?<![a-z])[ivxlcdm]+(?![a-z])")
_RUNNING_SHARE = 0.4  # of the pages with text: alternating heads (title on versos, chapter on rectos) are ~half
_RUNNING_MIN_PAGES = 3  # a line on two pages is content repeated, not a running head
_EDGE_LINES = 3  # a page's first and last lines, where heads and footers stand


def _line_key(line: str) -> str:
    """What a running line keeps from page to page: folio numbers vary, so words with digits
    and roman numerals (front matter: "Page xiv") become "#"; case and spacing are ignored;
    a line of symbols only is "~"."""
    low = line.lower().strip()
    if not _ALNUM.search(low):
        # Printer's marks and rules ("❙❚❘❙❚❘", "* * * *"): one kind. A short one ("}", "*/")
        # is code or a bullet, never a running line.
        return "~" if len(low) >= 5 else ""
    # A word with a digit in it is "#" whole: "14773_03_307-330_r7dy.qxd", "S32", "2/10/04".
    return " ".join("#" if _DIGITS.search(word) else word for word in _ROMAN.sub("#", low).split())


def _drop_running_lines(texts: list[str]) -> list[str]:
    """Drop running heads, footers and printer's marks: lines whose key (``_line_key``) is on
    at least 40% of the pages with text, and on 3 or more, where they begin or end a page,
    or where three or more of them stand together inside it (a printer's margin that
    pypdf emits mid-page), or alone inside it when the line is at an edge on 40% of the
    pages too. Other such lines inside the text stay: they may be content.
    A page's lines are counted once, so a line repeated on one page is no running line.
    """
    pages = [t.replace("\r\n", "\n").translate(_LINE_BREAKS).split("\n") for t in texts]
    keyed = [[_line_key(line) for line in lines] for lines in pages]
    with_text = sum(any(keys) for keys in keyed)
    if with_text < _RUNNING_MIN_PAGES:
        return texts
    counts: dict[str, int] = {}
    edges: dict[str, int] = {}  # pages where the key is among the first or last 3 lines
    for keys in keyed:
        for key in set(keys):
            if key:
                counts[key] = counts.get(key, 0) + 1
        present = [k for k in keys if k]
        for key in set(present[:_EDGE_LINES] + present[-_EDGE_LINES:]):
            edges[key] = edges.get(key, 0) + 1
    need = max(_RUNNING_MIN_PAGES, _RUNNING_SHARE * with_text)
    # Worded lines must also stand at the page's edge on many pages: a figure's label ("trace")
    # repeats on pages too, but inside them. Folios and marks ("#", "# #", "~") need not.
    running = {key for key, n in counts.items()
               if n >= need and (edges.get(key, 0) >= need / 2 or all(w in "#~" for w in key.split()))}
    if not running or all(not key or key in running for keys in keyed for key in keys):
        return texts  # nothing repeats, or everything does (the same page over and over: no heads to tell apart)
    edge_bound = {key for key in running if edges.get(key, 0) >= need}  # at an edge on 40% of pages

    out = []
    for text, lines, keys in zip(texts, pages, keyed):
        drop = [not key or key in running for key in keys]
        keep = [True] * len(lines)
        lo, hi = 0, len(lines)
        while lo < hi and drop[lo]:  # the run that starts the page
            keep[lo] = False
            lo += 1
        while hi > lo and drop[hi - 1]:  # ...and the one that ends it
            keep[hi - 1] = False
            hi -= 1
        i = lo
        while i < hi:  # inside the page: blocks of 3+ running lines (a margin's marks), and edge-bound ones
            j = i
            while j < hi and drop[j]:
                j += 1
            block = [k for k in range(i, j) if keys[k]]
            for k in block:
                if len(block) >= 3 or keys[k] == "~" or keys[k] in edge_bound:
                    keep[k] = False
            i = j + 1
        out.append(text if all(keep) else "\n".join(line for line, k in zip(lines, keep) if k))
    return out


def _vocabulary(texts: list[str]) -> tuple[set[str], set[str]]:
    """Words the document writes with a hyphen (not at a line end), and all its words; lower-cased."""
    hyphenated: set[str] = set()
    words: set[str] = set()
    for text in texts:
        low = text.lower()
        hyphenated.update(_HYPHENATED_WORD.findall(low))
        words.update(_WORD.findall(low))
    return hyphenated, words


def _clean_page(text: str, hyphenated: set[str], words: set[str], starts: set[str] = frozenset()) -> str:
    """One page of NFKC-normalised pypdf text -> tidy text with paragraphs as "\\n\\n"."""
    text = _INVISIBLE.sub("", text.replace("\r\n", "\n").translate(_LINE_BREAKS))
    lines = [_SPACE_BETWEEN_CJK.sub("", _SPACES.sub(" ", line).strip()) for line in text.split("\n")]
    # starts: line starts the layout marks as new paragraphs (_paragraph_starts).
    paragraphs = [_dehyphenate(p, hyphenated, words) for p in _paragraphs(lines, starts)]
    return "\n\n".join("\n".join(p) for p in paragraphs if p)


def _paragraphs(lines: list[str], starts: set[str] = frozenset()) -> list[list[str]]:
    """Split lines into paragraphs: at blank lines, and where the layout says a paragraph ends."""
    lengths = sorted(len(line) for line in lines if line)
    # The 80th percentile, not the maximum: a single wide line (a URL, a table row) is no measure.
    typical = lengths[int(0.8 * (len(lengths) - 1))] if len(lengths) >= _MIN_LINES_FOR_LAYOUT else 0

    paragraphs: list[list[str]] = []
    current: list[str] = []
    for i, line in enumerate(lines):
        if not line:
            if current:
                paragraphs.append(current)
                current = []
            continue
        current.append(line)
        if typical and _ends_paragraph(line, lines, i, typical, starts):
            paragraphs.append(current)
            current = []
    if current:
        paragraphs.append(current)
    return paragraphs


def _ends_paragraph(line: str, lines: list[str], i: int, typical: int, starts: set[str] = frozenset()) -> bool:
    nxt = lines[i + 1] if i + 1 < len(lines) else ""
    if not nxt or nxt[0].islower():  # a lower-case start continues the sentence
        return False
    if _ENDS_SENTENCE.search(line):
        if len(line) < _SHORT_LINE * typical:
            return True  # the short last line of a justified paragraph
        if starts and _start_key(nxt) in starts:
            return True  # a full last line: the next one is indented, or set apart, on the page
        # A full line ending a sentence, then a short line without punctuation: a heading follows.
        return _is_heading(nxt, typical)
    # This line is a heading itself if it sits between a sentence end and a new line.
    prev = lines[i - 1] if i > 0 else ""
    return (not prev or bool(_ENDS_SENTENCE.search(prev))) and _is_heading(line, typical)


def _is_heading(line: str, typical: int) -> bool:
    return len(line) < _HEADING_LINE * typical and not _ENDS_SENTENCE.search(line) and (line[0].isupper() or line[0].isdigit())


def _dehyphenate(lines: list[str], hyphenated: set[str], words: set[str]) -> list[str]:
    """Join words broken across lines, and CJK lines, within one paragraph."""
    out = list(lines)
    i = 0
    while i < len(out) - 1:
        line, nxt = out[i], out[i + 1]
        if line.endswith("\u00ad"):  # a soft hyphen marks a break the typesetter added: always join
            head, _, rest = nxt.partition(" ")
            out[i] = line[:-1] + head
        # (Only the line's tail is searched: a long unspaced CJK line would make the regex quadratic.)
        elif line[-1] == "-" and nxt[0].islower() and (broken := _BROKEN_WORD.search(line[-64:])):
            head, _, rest = nxt.partition(" ")
            left = broken.group(1).lower()
            right = m.group(0).lower() if (m := _LEADING_WORD.match(head)) else ""
            # Keep the hyphen only when the document writes this word hyphenated and never joined.
            keep = f"{left}-{right}" in hyphenated and f"{left}{right}" not in words
            out[i] = (line if keep else line[:-1]) + head
        elif _CJK_CHAR.match(line[-1]) and _CJK_CHAR.match(nxt[0]):
            out[i] = line + nxt  # no space: CJK does not separate words
            rest = ""
        else:
            i += 1
            continue
        if rest:
            out[i + 1] = rest
            i += 1  # the rest of that line follows a space, not a break: nothing more to join here
        else:
            del out[i + 1]  # the whole next line moved up; look at the new pair again
    return [line.replace("\u00ad", "") for line in out]
