"""OCR quality and speed: Mem_Chat's OCR pipeline vs RapidOCR called as its README shows.

    .venv/bin/python bench/ocr.py                 # ~3-5 min on a busy 2-core machine
    .venv/bin/python bench/ocr.py --dpi 150 300   # other render resolutions too

Pages (rendered in memory with PDFium at --dpi, the same image for both rows):

  Seige_of_Vicksburg_Sample_OCR.pdf  6 scanned book pages that already have an OCR text
                                     layer: the reference is that layer (it has OCR errors
                                     of its own, so 100% is not reachable); ingestion never
                                     re-OCRs this file, this bench OCRs it on purpose.
  c02-22.pdf                         1 book page without a text layer: the reference is the
                                     hand transcription in tests/data/c02-22.txt.

Rows, on the same rendered image:

  memchat.ocr   OcrReader.read: white margin, no angle classifier, spaces put back from
                the recogniser's CTC columns, XY-cut reading order.
  rapidocr      RapidOCR()(image) with its defaults (angle classifier on), boxes joined
                in the order it returns them: the baseline.

Columns: word recall and precision against the reference (memchat.ocr.word_agreement:
case, curly quotes and line-end hyphens folded, punctuation ignored, words aligned in
order), and seconds per page (engine loaded and warmed before the clock). Not a test:
the timings depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, SHARED_DATA, table  # noqa: E402

sys.path.insert(0, str(REPO))

SCANNED = SHARED_DATA / "pdfs" / "scanned"


def references() -> list[tuple[str, bytes, list[str]]]:
    """(name, pdf bytes, reference text per page)."""
    from memchat.pdf import extract_pdf_file

    vicksburg = SCANNED / "Seige_of_Vicksburg_Sample_OCR.pdf"
    layer = [p.text for p in extract_pdf_file(vicksburg, ocr=False).pages]
    c02 = SCANNED / "c02-22.pdf"
    return [
        (vicksburg.name, vicksburg.read_bytes(), layer),
        (c02.name, c02.read_bytes(), [(REPO / "tests" / "data" / "c02-22.txt").read_text()]),
    ]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dpi", type=int, nargs="+", default=None, help="render resolutions (default: IngestConfig's)")
    args = p.parse_args(argv)

    import numpy as np
    from rapidocr_onnxruntime import RapidOCR

    from memchat import ocr
    from memchat.config import IngestConfig

    dpis = args.dpi or [IngestConfig().ocr_dpi]
    baseline = RapidOCR()

    def rapidocr_default(image) -> str:
        result, _ = baseline(image)
        return "\n".join(text for _, text, _ in (result or []))

    docs = references()
    # Warm both engines (model load, first-run allocations) off the clock.
    warm = ocr.OcrReader(docs[1][1], dpi=100)
    warm.read(0)
    rapidocr_default(warm.render(0))

    rows = []
    for dpi in dpis:
        for name, data, refs in docs:
            reader = ocr.OcrReader(data, dpi=dpi)
            got = {"memchat.ocr": [], "rapidocr": []}
            secs = {"memchat.ocr": 0.0, "rapidocr": 0.0}
            for i in range(len(refs)):
                t0 = time.perf_counter()
                got["memchat.ocr"].append(reader.read(i))
                secs["memchat.ocr"] += time.perf_counter() - t0
                image = reader.render(i)
                t0 = time.perf_counter()
                got["rapidocr"].append(rapidocr_default(np.ascontiguousarray(image)))
                secs["rapidocr"] += time.perf_counter() - t0
            for row, texts in got.items():
                recall, precision = ocr.word_agreement("\n".join(refs), "\n".join(texts))
                rows.append([name, dpi, row, len(refs), f"{recall:.3f}", f"{precision:.3f}", f"{secs[row] / len(refs):.1f}"])
                print(f"  {name} @ {dpi} dpi, {row}: recall {recall:.3f}, precision {precision:.3f}, "
                      f"{secs[row] / len(refs):.1f} s/page", flush=True)
            reader.close()
    print()
    print(table(["document", "dpi", "pipeline", "pages", "word recall", "word precision", "s/page"], rows,
                "OCR word agreement with the reference (Vicksburg: its own text layer; c02-22: tests/data/c02-22.txt)"))
    print("\ntarget (issue 12): c02-22 word agreement >= 0.90 with memchat.ocr")
    return 0


if __name__ == "__main__":
    sys.exit(main())
