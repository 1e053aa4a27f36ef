"""The encrypted files on disk: ``encrypted_faiss_storage/``.

Three Fernet-encrypted files make one state of the knowledge base:
  faiss_index.encrypted   bytes of ``faiss.serialize_index`` (never pickle)
  metadata.encrypted      JSON: chunks, embedding model, index kind, format version
  doc_versions.encrypted  JSON: documents, versions, history
Each plaintext starts with a header line ``MEMCHAT-STORE {json}`` naming the file's
kind, the format version and the *generation* (a random id per commit). The three
generations must agree: a mixed set of old and new files is an error, never loaded.

Commit protocol (all under an exclusive file lock, ``.lock``):
  1. write the three files into ``.staging-<gen>/`` and fsync them;
  2. rename that folder to ``.commit-<gen>/``: from here on the new state is decided;
  3. move each file into place, fsync the folder, remove ``.commit-<gen>/``.
A process killed during 1 leaves a ``.staging-*`` folder that is deleted; killed
during 3, the next open rolls the ``.commit-*`` folder forward. Either way the
previous or the new state loads, whole.

A key change (``rekey``) is the same commit with the new key files (``key.key`` or
``kdf.json``) in the staging folder beside the re-encrypted three, and a list of
the old key files to delete (``.delete``): data and key move together, so a kill
at any moment leaves the old state with the old key or the new with the new.

Everything here is owner-only (``fsperm``): the folder 0700, the files 0600,
tightened when found looser.

Deliberately left out: what the state means (``knowledge.py``) and which key
opens it (``crypto.py``).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from filelock import FileLock, Timeout

from . import config, fsperm
from .crypto import KDF_FILENAME, Cipher, InvalidToken, NewSecret, load_or_create_cipher
from .errors import NoStoreError, StoreError, WrongKeyError

log = logging.getLogger(__name__)

MAGIC = b"MEMCHAT-STORE "
FILES = {  # kind -> file name
    "index": config.INDEX_FILENAME,
    "metadata": config.METADATA_FILENAME,
    "versions": config.VERSIONS_FILENAME,
}
KEY_FILES = (config.KEY_FILENAME, KDF_FILENAME)  # key material that may travel in a commit
DELETE_LIST = ".delete"  # in a commit folder: JSON list of key files the commit removes
LOCK_TIMEOUT_S = 120.0  # a commit holds the lock for seconds at most; waiting longer means a stuck peer


@dataclass
class StoreState:
    """One consistent state: what the three files hold, decrypted."""

    index_bytes: bytes
    metadata: dict
    versions: dict
    generation: str | None = None  # None until committed
    extra: dict = field(default_factory=dict)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_synced(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, fsperm.FILE_MODE)  # 0600 whatever the umask
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


class EncryptedStore:
    def __init__(self, directory: str | os.PathLike | None = None):
        self.dir = Path(directory) if directory is not None else config.storage_dir()
        self._cipher: Cipher | None = None
        self._cipher_sig: tuple = ()  # key files' (name, inode, mtime) when the cipher was loaded
        self._tightened = False  # modes checked once per object: a few stat calls

    # -- paths and key -----------------------------------------------------
    def path(self, kind: str) -> Path:
        return self.dir / FILES[kind]

    def exists(self) -> bool:
        """True when any part of a committed store is there (a damaged one too)."""
        return any(self.path(k).exists() for k in FILES) or any(self.dir.glob(".commit-*"))

    def signature(self) -> tuple | None:
        """(inode, size, mtime) of the three files: changes whenever a commit lands."""
        try:
            return tuple((st.st_ino, st.st_size, st.st_mtime_ns) for st in (self.path(k).stat() for k in FILES))
        except FileNotFoundError:
            return None

    def _key_files_signature(self) -> tuple:
        out = []
        for name in KEY_FILES:
            try:
                st = (self.dir / name).stat()
                out.append((name, st.st_ino, st.st_mtime_ns))
            except FileNotFoundError:
                pass
        return tuple(out)

    def cipher(self, create: bool = False) -> Cipher:
        """The store's cipher; loaded again when key.key or kdf.json changed (a rekey by another process)."""
        sig = self._key_files_signature()
        if self._cipher is None or sig != self._cipher_sig:
            self._cipher = load_or_create_cipher(self.dir, create=create)
            self._cipher_sig = self._key_files_signature()
        return self._cipher

    def key_beside_data_warning(self) -> str | None:
        """A one-line warning when key.key sits in the store folder (a copy of the folder is readable with it)."""
        key = self.dir / config.KEY_FILENAME
        if not key.exists():
            return None
        return (f"the key sits beside the data ({key}): anyone who copies {self.dir}/ can read it. "
                "Move to a passphrase: MEMCHAT_NEW_PASSPHRASE=... python main.py rekey (or keep key.key elsewhere "
                "and pass it as MEMCHAT_KEY).")

    def _private(self) -> None:
        fsperm.private_dir(self.dir)
        if not self._tightened:
            fsperm.tighten_tree(self.dir)  # a store made by an older version, or copied in under umask 022
            self._tightened = True

    @contextmanager
    def lock(self, timeout: float = LOCK_TIMEOUT_S) -> Iterator[None]:
        """Exclusive lock across processes (released by the OS if the holder dies)."""
        self._private()
        lock = FileLock(str(self.dir / ".lock"), mode=fsperm.FILE_MODE)
        try:
            with lock.acquire(timeout=timeout):
                yield
        except Timeout as exc:
            raise StoreError(
                f"{self.dir} is locked by another Mem_Chat process (waited {timeout:.0f} s). "
                "Wait for it to finish, or stop it."
            ) from exc

    # -- reading -----------------------------------------------------------
    def _recover(self) -> None:
        """Finish or discard an interrupted commit. Call with the lock held."""
        if not self.dir.exists():
            return
        for staging in self.dir.glob(".staging-*"):
            log.warning("Discarding an incomplete save (%s)", staging.name)
            shutil.rmtree(staging, ignore_errors=True)
        commits = sorted(self.dir.glob(".commit-*"), key=lambda p: p.stat().st_mtime)
        for commit in commits:  # at most one in practice; oldest first if ever more
            log.warning("Completing an interrupted save (%s)", commit.name)
            self._roll_forward(commit)

    def _roll_forward(self, commit: Path) -> None:
        """Move a decided commit's files into place, delete what it retires. Idempotent: safe to redo after a kill."""
        for name in (*FILES.values(), *KEY_FILES):
            src = commit / name
            if src.exists():
                os.replace(src, self.dir / name)
        delete_list = commit / DELETE_LIST
        if delete_list.exists():
            try:
                retired = json.loads(delete_list.read_text())
            except json.JSONDecodeError:  # written and fsynced before the commit point; damaged means a bad disk
                raise StoreError(f"{delete_list} is damaged: finish by hand (move the files in it up) or restore a backup.")
            for name in retired:
                if name in KEY_FILES:  # never anything else, whatever the file says
                    (self.dir / name).unlink(missing_ok=True)
        _fsync_dir(self.dir)
        shutil.rmtree(commit, ignore_errors=True)

    def _decode(self, kind: str, plaintext: bytes) -> tuple[dict, bytes]:
        name = FILES[kind]
        if not plaintext.startswith(MAGIC):
            raise StoreError(f"{self.path(kind)} is not a Mem_Chat store file.")
        header_line, _, body = plaintext.partition(b"\n")
        try:
            header = json.loads(header_line[len(MAGIC):])
        except json.JSONDecodeError as exc:
            raise StoreError(f"{self.path(kind)} has a damaged header.") from exc
        if header.get("kind") != kind:
            raise StoreError(f"{self.path(kind)} holds a '{header.get('kind')}' file, not '{kind}' ({name} was swapped?).")
        if header.get("format_version") != config.STORE_FORMAT_VERSION:
            raise StoreError(
                f"{self.path(kind)} has store format {header.get('format_version')}; "
                f"this Mem_Chat reads format {config.STORE_FORMAT_VERSION}."
            )
        return header, body

    def read(self) -> StoreState:
        """Load the committed state. Raises NoStoreError when there is none."""
        with self.lock():
            self._recover()
            return self._read_unlocked()

    def _read_unlocked(self) -> StoreState:
        present = {k: self.path(k).exists() for k in FILES}
        if not any(present.values()):
            raise NoStoreError(
                f"No knowledge base in {self.dir}/. Add PDFs first: python main.py add FILE.pdf"
            )
        missing = [self.path(k).name for k, ok in present.items() if not ok]
        if missing:
            raise StoreError(f"{self.dir}/ is incomplete: {', '.join(missing)} missing. Restore it from a backup.")
        cipher = self.cipher(create=False)
        raw = {k: self.path(k).read_bytes() for k in FILES}
        plain: dict[str, bytes] = {}
        failed: list[str] = []
        for kind, token in raw.items():
            try:
                plain[kind] = cipher.decrypt(token)
            except InvalidToken:
                failed.append(kind)
        if len(failed) == len(FILES):
            raise WrongKeyError(
                f"The key ({_describe_key(cipher.source, self.dir)}) does not open the store in {self.dir}/ "
                "(or all three files are damaged). Use the key the store was created with."
            )
        if failed:
            names = ", ".join(str(self.path(k)) for k in failed)
            raise StoreError(f"{names}: damaged, truncated or tampered with (authentication failed). Nothing was changed.")
        headers, bodies = {}, {}
        for kind, pt in plain.items():
            headers[kind], bodies[kind] = self._decode(kind, pt)
        gens = {headers[k].get("generation") for k in FILES}
        if len(gens) != 1:
            detail = ", ".join(f"{FILES[k]}={headers[k].get('generation', '?')[:8]}" for k in FILES)
            raise StoreError(f"{self.dir}/ holds files from different saves ({detail}); refusing to load a mixed set.")
        try:
            metadata = json.loads(bodies["metadata"])
            versions = json.loads(bodies["versions"])
        except json.JSONDecodeError as exc:
            raise StoreError(f"{self.dir}/: metadata is not valid JSON.") from exc
        return StoreState(bodies["index"], metadata, versions, generation=gens.pop())

    # -- writing -----------------------------------------------------------
    def commit(self, state: StoreState) -> str:
        """Atomically replace the three files with ``state``. Call with the lock held."""
        return self._commit(state, self.cipher(create=True))

    def _commit(self, state: StoreState, cipher: Cipher, secret: NewSecret | None = None) -> str:
        fsperm.private_dir(self.dir)
        gen = uuid.uuid4().hex
        bodies = {
            "index": state.index_bytes,
            "metadata": json.dumps(state.metadata, ensure_ascii=False).encode(),
            "versions": json.dumps(state.versions, ensure_ascii=False, indent=1).encode(),
        }
        staging = self.dir / f".staging-{gen}"
        staging.mkdir(mode=fsperm.DIR_MODE)
        for kind, body in bodies.items():
            header = json.dumps({"kind": kind, "format_version": config.STORE_FORMAT_VERSION, "generation": gen})
            _write_synced(staging / FILES[kind], cipher.encrypt(MAGIC + header.encode() + b"\n" + body))
        if secret is not None:  # a key change: the new key files travel with the data
            for name, data in secret.write.items():
                _write_synced(staging / name, data)
            _write_synced(staging / DELETE_LIST, json.dumps(secret.delete).encode())
        _fsync_dir(staging)
        commit = self.dir / f".commit-{gen}"
        os.rename(staging, commit)  # the commit point
        _fsync_dir(self.dir)
        self._roll_forward(commit)
        state.generation = gen
        return gen

    def rekey(self, secret: NewSecret) -> StoreState:
        """Decrypt everything with the current key and commit it under ``secret``, atomically, under the lock.

        Afterwards the old key opens nothing here (old backups of the files stay readable with it).
        """
        with self.lock():
            self._recover()
            state = self._read_unlocked()  # with the current key: NoStoreError / WrongKeyError as for any read
            self._commit(state, secret.cipher, secret)
            self._cipher, self._cipher_sig = secret.cipher, self._key_files_signature()
            return state

    @contextmanager
    def transaction(self) -> Iterator[StoreState | None]:
        """Lock, recover, read the latest state (None if empty); the caller commits."""
        with self.lock():
            self._recover()
            try:
                state = self._read_unlocked()
            except NoStoreError:
                state = None
            yield state


def _describe_key(source: str, directory: Path) -> str:
    return {
        "env-key": "MEMCHAT_KEY",
        "passphrase": "MEMCHAT_PASSPHRASE",
        "key-file": str(directory / config.KEY_FILENAME),
    }[source]
