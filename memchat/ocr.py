"""Offline OCR for PDF pages without a text layer: PDFium renders, RapidOCR reads.

``OcrReader(data, password)`` opens the PDF a second time with PDFium (``pypdfium2``),
renders a page to a numpy array in memory (no image or text ever goes to a temp file),
and runs RapidOCR (``rapidocr-onnxruntime``: PP-OCRv4 detection and recognition models
shipped inside the wheel, run by the ONNX Runtime the embedder already uses). Both are
optional dependencies: without them ``OcrUnavailable`` says how to install them.

The recogniser returns boxes of text in no useful order. ``layout`` puts them back in
reading order with a recursive XY-cut: a region is split at a vertical gutter (three or more
lines tall on each side, so a gap between two words of one line is never taken for a
column), else at its widest horizontal gap, else its boxes are one block whose lines
are grouped by vertical overlap and read left to right. Lines come back joined by "\\n",
with "\\n\\n" where the gap above a line is wider than a line (a paragraph or a block);
``pdf.py`` then cleans the text like any text layer.

Deliberately left out: deskewing, and rotation other than the page's own /Rotate (RapidOCR's
180-degree classifier is off: it misread upright lines),
languages other than those of its Chinese/English model, tables as tables, and OCR of
pages that have a text layer (``pdf.py`` decides which pages come here).
"""

from __future__ import annotations

import difflib
import functools
import logging
import re
import threading
import unicodedata
from dataclasses import dataclass

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'rapidocr-onnxruntime>=1.4,<2' 'pypdfium2>=4.30,<6'"
ENGINE_NAME = "RapidOCR (PP-OCRv4, ONNX Runtime)"

_BLANK_DARK_SHARE = 2e-4  # a page with fewer dark pixels than this share is blank (speckles of a scan)
_PAD = 32  # px of white added around a rendered page before OCR
_MAX_RENDER_SIDE = 4000  # px: a render's longest side (letter at 200 dpi is 2200)
_MIN_SCORE = 0.5  # recogniser confidence below which a box is noise (RapidOCR's own default)


class OcrUnavailable(Exception):
    """The OCR packages are not installed (or fail to load); the message says how to install them."""


@dataclass(frozen=True)
class Box:
    x0: float
    y0: float
    x1: float
    y1: float
    text: str

    @property
    def height(self) -> float:
        return self.y1 - self.y0


# ---------------------------------------------------------------------------
# Engine and rendering
# ---------------------------------------------------------------------------
_engine_lock = threading.Lock()


@functools.cache
def _engine():
    try:
        import onnxruntime
        from rapidocr_onnxruntime import RapidOCR
    except ImportError as exc:
        raise OcrUnavailable(f"the OCR engine is not installed ({exc.name or exc}); install it with: {INSTALL_HINT}") from exc
    if hasattr(onnxruntime, "disable_telemetry_events"):
        onnxruntime.disable_telemetry_events()
    logging.getLogger("RapidOCR").setLevel(logging.WARNING)
    try:
        # No angle classifier: it took upright lines for upside-down ones (c02-22's last line
        # came back as " s"), and PDFium already applies the page's /Rotate.
        return RapidOCR(text_score=_MIN_SCORE, use_cls=False)
    except Exception as exc:  # a damaged install: models missing or unreadable
        raise OcrUnavailable(f"the OCR engine failed to load ({exc}); reinstall it with: {INSTALL_HINT}") from exc


def check_available() -> None:
    """Raise OcrUnavailable unless the renderer imports and the engine is installed.

    The engine's models load at the first page that needs them (~1 s), not here: a text
    PDF with a few blank pages renders them, finds no ink, and never loads them.
    """
    import importlib.util

    try:
        import pypdfium2  # noqa: F401
    except ImportError as exc:
        raise OcrUnavailable(f"the PDF renderer for OCR is not installed ({exc.name}); install it with: {INSTALL_HINT}") from exc
    if importlib.util.find_spec("rapidocr_onnxruntime") is None:
        raise OcrUnavailable(f"the OCR engine is not installed (rapidocr_onnxruntime); install it with: {INSTALL_HINT}")


class OcrReader:
    """One PDF opened with PDFium; ``read(page_index)`` -> that page's OCR text ("" if none)."""

    def __init__(self, data: bytes, password: str | None = None, dpi: int = 200):
        check_available()
        import pypdfium2 as pdfium

        self.dpi = dpi
        # PDFium reads from the bytes in memory. pypdf fell back to the empty password when
        # the one given was wrong, so PDFium does the same.
        try:
            self._doc = pdfium.PdfDocument(data, password=password or None)
        except pdfium.PdfiumError:
            if not password:
                raise
            self._doc = pdfium.PdfDocument(data, password=None)

    def close(self) -> None:
        self._doc.close()

    def __enter__(self) -> OcrReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def image_share(self, index: int) -> float:
        """The share of page ``index`` that its largest image covers (a scan: ~1.0)."""
        import pypdfium2.raw as pdfium_c

        page = self._doc[index]
        try:
            width, height = page.get_size()
            best = 0.0
            for obj in page.get_objects(filter=[pdfium_c.FPDF_PAGEOBJ_IMAGE], max_depth=3):
                left, bottom, right, top = obj.get_bounds()
                best = max(best, (min(right, width) - max(left, 0)) * (min(top, height) - max(bottom, 0)))
            return best / (width * height) if width * height > 0 else 0.0
        finally:
            page.close()

    def render(self, index: int):
        """Page ``index`` (0-based) as a BGR uint8 array (H, W, 3) at ``dpi``."""
        page = self._doc[index]
        try:
            # A huge page (a poster, or a crafted MediaBox of 200 inches) would be gigabytes at
            # the full dpi; the detector shrinks images to 2000 px anyway.
            scale = min(self.dpi / 72, _MAX_RENDER_SIDE / max(page.get_size() + (1.0,)))
            bitmap = page.render(scale=scale, may_draw_forms=True)
            return bitmap.to_numpy()[:, :, :3].copy()  # PDFium's BGR order, which RapidOCR (OpenCV) expects
        finally:
            page.close()

    def read(self, index: int) -> str:
        import numpy as np

        image = self.render(index)
        if is_blank(image):
            return ""
        # A white margin: the detector misses lines that touch the edge of the image (a scan
        # cropped to the text block is common).
        image = np.pad(image, ((_PAD, _PAD), (_PAD, _PAD), (0, 0)), constant_values=255)
        with _engine_lock:  # one ONNX session set, shared: its sessions are not meant for concurrent calls
            found = _recognise(_engine(), image)
        return layout([_box(points, text) for points, text in found])


def _recognise(engine, image) -> list[tuple[object, str]]:
    """RapidOCR's own steps (resize, detect, crop, recognise), keeping where each character
    was read so that ``_respace`` can put back the spaces the recogniser drops.

    Uses RapidOCR 1.4's pipeline methods (pinned <2 in requirements.txt).
    """
    image, _, _ = engine.preprocess(image)  # longest side <= 2000 px; box coordinates stay in this scale
    boxes, _ = engine.auto_text_det(image)  # sorted top to bottom, or None
    if boxes is None:
        return []
    crops = engine.get_crop_img_list(image, boxes)
    results, _ = engine.text_rec(crops, True)  # True: also the CTC columns of each character
    out = []
    for points, (text, score, info) in zip(boxes, results):
        if score >= _MIN_SCORE and text.strip():
            out.append((points, _respace(text, [col for word in info[2] for col in word])))
    return out


# A word gap, in CTC columns of the recogniser (a column is 1/6 of the text height). The
# recogniser emits a space for only some gaps (DejaVu Sans at 12 pt came back as
# "onthenorthernrocksbeforebreakfast."). Letters of a word are mostly read 2-4 columns apart,
# words 5-7: PaddleOCR's own word grouping splits at > 4. Measured: c02-22 word agreement
# 0.88 -> 0.97; a generated DejaVu page 0.44 -> 0.70, with a few false splits ("m orning").
_WORD_GAP_COLUMNS = 5


def _respace(text: str, columns: list[int]) -> str:
    """Insert a space between two characters read further apart than a word gap.

    The gap is ``_WORD_GAP_COLUMNS``, or the line's median letter spacing + 2 columns when
    that is wider (large or loosely set type), and 2 more after a wide letter (capitals, m, w).
    """
    if len(columns) != len(text):
        return text  # not the alignment we expect: leave the text as read
    steps = sorted(columns[i] - columns[i - 1] for i in range(1, len(text))
                   if not text[i].isspace() and not text[i - 1].isspace())
    gap = max(_WORD_GAP_COLUMNS, steps[len(steps) // 2] + 2) if steps else _WORD_GAP_COLUMNS
    out = [text[0]]
    for i in range(1, len(text)):
        prev = text[i - 1]
        wide = prev.isupper() or prev in "mwMW"  # wide letters are read further apart
        if (columns[i] - columns[i - 1] >= gap + 2 * wide and not text[i].isspace() and not prev.isspace()
                and text[i] not in ".,;:!?)]}'’”" and prev not in "([{‘“"):
            out.append(" ")
        out.append(text[i])
    return "".join(out)


def is_blank(image) -> bool:
    """No ink: a blank page (or a blank scan) is not worth the recogniser's seconds."""
    gray = image.min(axis=2) if image.ndim == 3 else image
    return float((gray < 128).mean()) < _BLANK_DARK_SHARE


def _box(points, text: str) -> Box:
    """A recognised quadrilateral -> its bounding box, cut to the core 60% of its height:
    the detector pads boxes so much that neighbouring lines overlap, which hides the gaps
    between lines that the XY-cut needs."""
    xs = [p[0] for p in points]
    ys = [p[1] for p in points]
    mid, half = (min(ys) + max(ys)) / 2, 0.3 * (max(ys) - min(ys))
    return Box(min(xs), mid - half, max(xs), mid + half, " ".join(text.split()))


# ---------------------------------------------------------------------------
# Reading order
# ---------------------------------------------------------------------------
def layout(boxes: list[Box]) -> str:
    """Boxes of recognised text -> page text in reading order (see module doc)."""
    if not boxes:
        return ""
    unit = sorted(b.height for b in boxes)[len(boxes) // 2]  # the median text height, px
    lines: list[list[Box]] = []
    _xy_cut(boxes, unit, lines)
    spans = [(min(b.y0 for b in line), max(b.y1 for b in line)) for line in lines]
    gaps = [top - bottom for (_, bottom), (top, _) in zip(spans, spans[1:]) if top > bottom]
    pitch = sorted(gaps)[len(gaps) // 2] if gaps else unit  # the usual space between two lines
    out: list[str] = []
    for i, line in enumerate(lines):
        if i:
            (top0, bottom), (top, _) = spans[i - 1], spans[i]
            # A gap wider than a line's worth, or a jump back up (the next column): a new block.
            out.append("\n\n" if top - bottom > pitch + 0.8 * unit or top < top0 - unit else "\n")
        out.append(" ".join(b.text for b in line))
    return "".join(out)


def _xy_cut(boxes: list[Box], unit: float, out: list[list[Box]]) -> None:
    if len(boxes) > 1:
        cut = _vertical_cut(boxes, unit)
        if cut is not None:
            _xy_cut([b for b in boxes if b.x1 <= cut], unit, out)
            _xy_cut([b for b in boxes if b.x1 > cut], unit, out)
            return
        cut = _horizontal_cut(boxes)
        if cut is not None:
            _xy_cut([b for b in boxes if b.y1 <= cut], unit, out)
            _xy_cut([b for b in boxes if b.y1 > cut], unit, out)
            return
    out.extend(_lines(boxes))


def _gaps(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Uncovered stretches between the union of intervals: (start, end) of each gap."""
    intervals = sorted(intervals)
    gaps = []
    reach = intervals[0][1]
    for lo, hi in intervals[1:]:
        if lo > reach:
            gaps.append((reach, lo))
        reach = max(reach, hi)
    return gaps


def _vertical_cut(boxes: list[Box], unit: float) -> float | None:
    """An x where a gutter splits the region into columns, or None."""
    best = None
    for lo, hi in _gaps([(b.x0, b.x1) for b in boxes]):
        if hi - lo < unit:
            continue  # narrower than a letter is tall (unit is the core height): a space between words
        left = [b for b in boxes if b.x1 <= lo]
        right = [b for b in boxes if b.x0 >= hi]
        # A column is at least three lines tall; a lone block beside text (a caption by its
        # picture) counts only when the gutter is wide.
        tall = _line_count(left) >= 3 and _line_count(right) >= 3
        if tall or hi - lo > 3 * unit:
            if best is None or hi - lo > best[1] - best[0]:
                best = (lo, hi)
    return None if best is None else (best[0] + best[1]) / 2


def _horizontal_cut(boxes: list[Box]) -> float | None:
    gaps = _gaps([(b.y0, b.y1) for b in boxes])
    if not gaps:
        return None
    lo, hi = max(gaps, key=lambda g: g[1] - g[0])
    return (lo + hi) / 2


def _line_count(boxes: list[Box]) -> int:
    return len(_gaps([(b.y0, b.y1) for b in boxes])) + 1 if boxes else 0


def _lines(boxes: list[Box]) -> list[list[Box]]:
    """Boxes with no horizontal gap between them -> lines (by vertical overlap), each left to right."""
    lines: list[list[Box]] = []
    for b in sorted(boxes, key=lambda b: (b.y0 + b.y1) / 2):
        if lines:
            line = lines[-1]
            y0, y1 = min(x.y0 for x in line), max(x.y1 for x in line)
            if min(y1, b.y1) - max(y0, b.y0) > 0.5 * min(b.height, y1 - y0):
                line.append(b)
                continue
        lines.append([b])
    return [sorted(line, key=lambda b: b.x0) for line in lines]


# ---------------------------------------------------------------------------
# Measuring
# ---------------------------------------------------------------------------
_TOKEN = re.compile(r"[^\W_]+(?:'[^\W_]+)*")


def words(text: str) -> list[str]:
    """Lower-cased words for comparing OCR with a reference: NFKC, curly quotes folded,
    words broken at a line-end hyphen joined, punctuation dropped."""
    text = unicodedata.normalize("NFKC", text).replace("\u2019", "'").replace("\u2018", "'").lower()
    text = re.sub(r"(\w)-\s*\n\s*(\w)", r"\1\2", text)
    return _TOKEN.findall(text)


def word_agreement(reference: str, hypothesis: str) -> tuple[float, float]:
    """(recall, precision) of the hypothesis's words against the reference's, in order:
    the words of the longest matching blocks of the two sequences (difflib), over each length."""
    ref, hyp = words(reference), words(hypothesis)
    if not ref or not hyp:
        return 0.0, 0.0
    matched = sum(m.size for m in difflib.SequenceMatcher(None, ref, hyp, autojunk=False).get_matching_blocks())
    return matched / len(ref), matched / len(hyp)
