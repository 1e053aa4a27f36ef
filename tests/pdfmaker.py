"""Small PDFs made in the test, byte by byte: text pages, image-only pages, and a zip bomb.

Text pages use the standard Helvetica font (no embedding needed, every reader has it);
image pages are rendered with Pillow in DejaVu Sans, the font matplotlib ships, so a
real font is used without depending on the machine's fonts.
"""

from __future__ import annotations

import io
import zlib
from pathlib import Path


def _escape(text: str) -> bytes:
    return text.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)").encode("latin-1")


def _assemble(objects: dict[int, bytes], root: int = 1) -> bytes:
    """Objects numbered 1..n -> a PDF file with a correct cross-reference table."""
    out = io.BytesIO()
    out.write(b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n")
    offsets = {}
    for n in sorted(objects):
        offsets[n] = out.tell()
        out.write(b"%d 0 obj\n" % n + objects[n] + b"\nendobj\n")
    xref = out.tell()
    size = max(objects) + 1
    out.write(b"xref\n0 %d\n0000000000 65535 f \n" % size)
    for n in range(1, size):
        out.write(b"%010d 00000 n \n" % offsets[n] if n in offsets else b"0000000000 65535 f \n")
    out.write(b"trailer\n<< /Size %d /Root %d 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (size, root, xref))
    return out.getvalue()


def _stream(data: bytes, extra: bytes = b"", compress: bool = True) -> bytes:
    if compress:
        data = zlib.compress(data, 9)
        extra += b" /Filter /FlateDecode"
    return b"<< /Length %d%s >>\nstream\n" % (len(data), extra) + data + b"\nendstream"


def text_pdf(pages: list[list[str]], font_size: float = 11, leading: float = 14, top: float = 740,
             left: float = 72, width: float = 612, height: float = 792) -> bytes:
    """One page per list of lines, each line drawn in Helvetica from the top; "" leaves a line empty.

    A line given as (y, text) is drawn at that height instead (running heads, footers);
    (y, text, dx) also moves it dx points right (an indented first line).
    """
    objects = {1: b"<< /Type /Catalog /Pages 2 0 R >>", 3: b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>"}
    kids = []
    for i, lines in enumerate(pages):
        ops = []
        y = top
        for line in lines:
            x = left
            if isinstance(line, tuple):
                at, text, *more = line
                x += more[0] if more else 0
            else:
                at, text = y, line
                y -= leading
            if text:
                ops.append(b"BT /F1 %.1f Tf %.1f %.1f Td (%s) Tj ET" % (font_size, x, at, _escape(text)))
        page, content = 10 + 2 * i, 11 + 2 * i
        objects[content] = _stream(b"\n".join(ops))
        objects[page] = (b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 %d %d] /Resources << /Font << /F1 3 0 R >> >> "
                         b"/Contents %d 0 R >>" % (width, height, content))
        kids.append(page)
    objects[2] = b"<< /Type /Pages /Kids [%s] /Count %d >>" % (b" ".join(b"%d 0 R" % k for k in kids), len(kids))
    return _assemble(objects)


def amplification_pdf(pages: int = 20, stream_bytes: int = 2_000_000) -> bytes:
    """Issue 10's attack: every page shows one shared zlib content stream of ~2 MB of text.

    The file is ~11 KB; pypdf extracts ~1.75 M characters per page, 35 M in all.
    """
    line = b"BT /F1 1 Tf 0 0 Td (" + b"A" * 200 + b") Tj ET\n"
    objects = {
        1: b"<< /Type /Catalog /Pages 2 0 R >>",
        3: b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
        4: _stream(line * (stream_bytes // len(line))),
    }
    kids = [10 + i for i in range(pages)]
    for k in kids:
        objects[k] = b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Resources << /Font << /F1 3 0 R >> >> /Contents 4 0 R >>"
    objects[2] = b"<< /Type /Pages /Kids [%s] /Count %d >>" % (b" ".join(b"%d 0 R" % k for k in kids), pages)
    return _assemble(objects)


def font_path() -> Path:
    """DejaVu Sans as shipped inside matplotlib (a requirement of the project)."""
    import matplotlib

    return Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"


def image_pdf(pages: list[list[str]], dpi: int = 150, font_pt: float = 12, leading: float = 1.5) -> bytes:
    """Image-only pages (no text layer): the lines rendered in DejaVu Sans onto white US-letter pages."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.truetype(str(font_path()), round(font_pt * dpi / 72))
    images = []
    for lines in pages:
        img = Image.new("L", (round(8.5 * dpi), round(11 * dpi)), 255)
        draw = ImageDraw.Draw(img)
        y = dpi  # one-inch margins
        for line in lines:
            draw.text((dpi, y), line, font=font, fill=0)
            y += round(font_pt * leading * dpi / 72)
        images.append(img)
    buf = io.BytesIO()
    images[0].save(buf, "PDF", resolution=dpi, save_all=True, append_images=images[1:])
    return buf.getvalue()


def join_pdfs(*parts: bytes) -> bytes:
    """The pages of several PDFs, in order, as one PDF."""
    import pypdf

    writer = pypdf.PdfWriter()
    for data in parts:
        for page in pypdf.PdfReader(io.BytesIO(data)).pages:
            writer.add_page(page)
    buf = io.BytesIO()
    writer.write(buf)
    return buf.getvalue()
