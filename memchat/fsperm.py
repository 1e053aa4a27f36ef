"""Private files and folders: everything Mem_Chat writes that holds document content.

The store, ``training_data/``, ``finetuned_model/`` and ``eval_results/`` hold the
documents' sentences (or a model that learned them), so they are created 0700 with
0600 files whatever the umask, and tightened when found looser.

Deliberately left out: encryption (``crypto``) and the file formats (``formats``).
"""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

log = logging.getLogger(__name__)

DIR_MODE = 0o700  # only the owner can list or enter: file names are document names
FILE_MODE = 0o600  # only the owner can read: the files hold document text


def private_dir(path: str | os.PathLike) -> Path:
    """Create ``path`` (and any missing parents) as 0700; tighten it if it exists looser. Returns it."""
    path = Path(path)
    missing = []
    p = path
    while not p.exists() and p != p.parent:  # mkdir(parents=True) would make the parents 0777 & ~umask
        missing.append(p)
        p = p.parent
    for d in reversed(missing):
        try:
            d.mkdir(mode=DIR_MODE)
        except FileExistsError:  # a concurrent maker: tightened below if it is ours to hold
            pass
        _tighten(d, DIR_MODE)
    _tighten(path, DIR_MODE)
    return path


def _tighten(path: Path, mode: int) -> None:
    try:
        current = stat.S_IMODE(path.stat().st_mode)
    except FileNotFoundError:
        return
    if current & ~mode:  # group/other bits set: remove them, keep the owner's
        try:
            os.chmod(path, current & mode)
        except OSError as exc:  # not ours, or a read-only copy: reading it must still work
            log.warning("Cannot make %s owner-only (%s); it stays %s", path, exc.strerror, oct(current))


def tighten_tree(path: str | os.PathLike) -> None:
    """Make an existing folder and everything under it owner-only (0700 folders, 0600 files)."""
    root = Path(path)
    if not root.exists():
        return
    _tighten(root, DIR_MODE if root.is_dir() else FILE_MODE)
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            _tighten(Path(dirpath) / d, DIR_MODE)
        for f in filenames:
            p = Path(dirpath) / f
            if not p.is_symlink():
                _tighten(p, FILE_MODE)


def write_private(path: str | os.PathLike, data: bytes | str) -> Path:
    """Write ``data`` to ``path`` atomically (temp file + fsync + rename), mode 0600; the folder becomes 0700."""
    path = Path(path)
    private_dir(path.parent)
    if isinstance(data, str):
        data = data.encode("utf-8")
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, FILE_MODE)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    return path


def open_private_append(path: str | os.PathLike):
    """Open ``path`` for appending text, creating it 0600 (for append-only logs such as the resume log)."""
    path = Path(path)
    private_dir(path.parent)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, FILE_MODE)
    _tighten(path, FILE_MODE)
    return os.fdopen(fd, "a", encoding="utf-8")
