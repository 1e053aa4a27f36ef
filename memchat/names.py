"""Document names (and other short strings from outside) made safe to print.

A PDF's file name comes from whoever sent the file. A newline in it prints a
fake row in ``main.py list``; an ANSI escape drives the terminal; a bidi
override reorders what is shown. So names lose their control characters at
ingest (``clean_name``), and anything older is shown escaped (``escape_controls``).

Deliberately left out: Markdown escaping for the apps (``memchat.ui.common``).
"""

from __future__ import annotations

import unicodedata

# Format characters that reorder or hide text (Trojan Source, CVE-2021-42574), besides category Cc.
_BIDI = set("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")
FALLBACK_NAME = "document.pdf"  # a name that was nothing but control characters


def is_control(ch: str) -> bool:
    """C0/C1 controls and DEL (Cc), line/paragraph separators (Zl, Zp), bidi controls."""
    return unicodedata.category(ch) in ("Cc", "Zl", "Zp") or ch in _BIDI


def clean_name(name: str) -> str:
    """``name`` without control characters (and without surrounding blanks); never empty."""
    cleaned = "".join(ch for ch in name if not is_control(ch)).strip()
    return cleaned or FALLBACK_NAME


def escape_controls(text: str) -> str:
    """``text`` with each control character shown as an escape (``\\n``, ``\\x1b``, ``\\u202e``): one safe line."""
    if not any(is_control(ch) for ch in text):
        return text
    out = []
    for ch in text:
        if is_control(ch):
            out.append(ch.encode("unicode_escape").decode("ascii") if ord(ch) < 0x10000 else f"\\U{ord(ch):08x}")
        else:
            out.append(ch)
    return "".join(out)
