"""The Fernet key of the store, and encrypt/decrypt of bytes.

Where the key comes from, in order:
  1. ``MEMCHAT_KEY``: a Fernet key (urlsafe base64 of 32 bytes) in the environment;
  2. ``MEMCHAT_PASSPHRASE``: a passphrase run through scrypt with a random salt that is
     stored (it is not secret) in ``encrypted_faiss_storage/kdf.json``;
  3. ``encrypted_faiss_storage/key.key``: created on first use with mode 0600.
With 1 or 2 no ``key.key`` is written, so the key need not sit beside the data.
A variable that is set but empty is an error, never a silent fall-back to ``key.key``.

scrypt runs at N=2^17, r=8, p=1 (OWASP's minimum) for new stores; an existing store
keeps the parameters in its ``kdf.json``, which are checked against a floor and a
ceiling (``config.KdfConfig``) before use.

``new_secret`` makes the target of a key change (``EncryptedStore.rekey``): the new
cipher plus the key files to write and to delete beside the data, so that the
store's commit moves data and key together.

Deliberately left out: multiple keys per store, and re-encrypting anything but
the store (``rekey`` says what else was encrypted with the old key).
"""

from __future__ import annotations

import base64
import binascii
import functools
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.fernet import Fernet, InvalidToken
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from . import fsperm
from .config import KEY_FILENAME, KdfConfig
from .errors import StoreError

KDF_FILENAME = "kdf.json"
KEY_ENV, PASSPHRASE_ENV = "MEMCHAT_KEY", "MEMCHAT_PASSPHRASE"
NEW_KEY_ENV, NEW_PASSPHRASE_ENV = "MEMCHAT_NEW_KEY", "MEMCHAT_NEW_PASSPHRASE"
SALT_BYTES = 16  # 128-bit salt: no two stores share a derived key
MIN_SALT_BYTES = 16

__all__ = ["Cipher", "InvalidToken", "NewSecret", "load_or_create_cipher", "key_source", "new_secret",
           "read_kdf_params", "KDF_FILENAME"]


@dataclass
class Cipher:
    fernet: Fernet
    source: str  # "env-key" | "passphrase" | "key-file": shown to the user

    def encrypt(self, data: bytes) -> bytes:
        return self.fernet.encrypt(data)

    def decrypt(self, token: bytes) -> bytes:
        return self.fernet.decrypt(token)  # raises InvalidToken on wrong key or tampering


@dataclass
class NewSecret:
    """Where a store's key is moving to: the cipher, and the key files that go with it."""

    cipher: Cipher
    write: dict[str, bytes] = field(default_factory=dict)  # file name in the store folder -> bytes (0600)
    delete: list[str] = field(default_factory=list)  # key files of the old secret that must go
    description: str = ""  # e.g. "a new passphrase (MEMCHAT_PASSPHRASE)"
    fresh_key_file: bool = False  # a random key in key.key was made because nothing else was given


def _env(name: str) -> str | None:
    """The variable's value; None when unset. Set but empty (or blank) is an error."""
    value = os.environ.get(name)
    if value is None:
        return None
    if not value.strip():
        raise StoreError(f"{name} is set but empty. Give it a value, or unset it (env -u {name}).")
    return value


def key_source() -> str:
    if _env(KEY_ENV) is not None:
        return "env-key"
    if _env(PASSPHRASE_ENV) is not None:
        return "passphrase"
    return "key-file"


def fernet_from_key(key: str | bytes, where: str) -> Fernet:
    try:
        return Fernet(key.strip() if isinstance(key, bytes) else key.strip().encode())
    except (ValueError, binascii.Error) as exc:
        raise StoreError(
            f"{where} is not a valid Fernet key (32 url-safe base64-encoded bytes). "
            'Make one with: python -c "from cryptography.fernet import Fernet; print(Fernet.generate_key().decode())"'
        ) from exc


# ---------------------------------------------------------------------------
# scrypt parameters (kdf.json)
# ---------------------------------------------------------------------------
def new_kdf_params() -> dict:
    salt = os.urandom(SALT_BYTES)
    return {"kdf": "scrypt", "salt": base64.b64encode(salt).decode(), "n": KdfConfig.n, "r": KdfConfig.r,
            "p": KdfConfig.p}


def check_kdf_params(params, where: str) -> tuple[bytes, int, int, int]:
    """(salt, n, r, p) of a kdf.json object, within bounds. Raises StoreError naming ``where``."""
    c = KdfConfig
    if not isinstance(params, dict) or params.get("kdf", "scrypt") != "scrypt":
        raise StoreError(f"{where} is not a scrypt parameter file. Restore it from a backup.")
    n, r, p = params.get("n", 2**15), params.get("r", 8), params.get("p", 1)  # the first release's values
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (n, r, p)):
        raise StoreError(f"{where}: n, r and p must be integers. Restore it from a backup.")
    if not (c.min_n <= n <= c.max_n and n & (n - 1) == 0 and 1 <= r <= c.max_r and 1 <= p <= c.max_p
            and 128 * n * r * p <= c.max_memory_bytes):
        raise StoreError(
            f"{where} asks for scrypt n={n}, r={r}, p={p}; accepted: n a power of 2 from 2^{c.min_n.bit_length() - 1} "
            f"to 2^{c.max_n.bit_length() - 1}, r <= {c.max_r}, p <= {c.max_p}, at most "
            f"{c.max_memory_bytes >> 20} MiB. The file is damaged or was tampered with: restore it from a backup."
        )
    try:
        salt = base64.b64decode(params["salt"], validate=True)
    except (KeyError, TypeError, ValueError, binascii.Error) as exc:
        raise StoreError(f"{where} has no valid salt. Restore it from a backup.") from exc
    if len(salt) < MIN_SALT_BYTES:
        raise StoreError(f"{where}: the salt is {len(salt)} bytes, under {MIN_SALT_BYTES}. Restore it from a backup.")
    return salt, n, r, p


def read_kdf_params(path: Path) -> tuple[bytes, int, int, int]:
    try:
        params = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise StoreError(f"{path} is not valid JSON. Restore it from a backup.") from exc
    return check_kdf_params(params, str(path))


@functools.lru_cache(maxsize=8)
def _derive_cached(passphrase: str, salt: bytes, n: int, r: int, p: int) -> bytes:
    return base64.urlsafe_b64encode(Scrypt(salt=salt, length=32, n=n, r=r, p=p).derive(passphrase.encode()))


def derive_key(passphrase: str, salt: bytes, n: int, r: int, p: int) -> bytes:
    """The Fernet key of ``passphrase`` (~0.5 s at 2^17; cached per process: every open reuses it)."""
    if not passphrase:
        raise StoreError("An empty passphrase is not a key. Set a passphrase, or use key.key.")
    return _derive_cached(passphrase, salt, n, r, p)


def _passphrase_key(storage: Path, passphrase: str, create: bool) -> bytes:
    kdf_path = storage / KDF_FILENAME
    if not kdf_path.exists():
        if not create:
            raise StoreError(f"{kdf_path} is missing: the passphrase's salt is gone, so MEMCHAT_PASSPHRASE cannot open this store.")
        fsperm.private_dir(storage)
        _create_private(kdf_path, json.dumps(new_kdf_params()).encode())  # another process may win the race: theirs counts
    return derive_key(passphrase, *read_kdf_params(kdf_path))


def _create_private(path: Path, data: bytes) -> None:
    """Create ``path`` with mode 0600 atomically; never overwrite an existing file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, fsperm.FILE_MODE)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.link(tmp, path)  # fails if another process created it first: theirs wins
    except FileExistsError:
        pass
    finally:
        tmp.unlink(missing_ok=True)


def load_or_create_cipher(storage: Path, create: bool = True) -> Cipher:
    """The cipher for the store in ``storage``; ``create`` makes a key if there is none."""
    source = key_source()
    if source == "env-key":
        return Cipher(fernet_from_key(os.environ[KEY_ENV], KEY_ENV), source)
    if source == "passphrase":
        return Cipher(Fernet(_passphrase_key(storage, os.environ[PASSPHRASE_ENV], create)), source)

    key_path = storage / KEY_FILENAME
    if not key_path.exists():
        if not create:
            if (storage / KDF_FILENAME).exists():
                raise StoreError(f"This store opens with a passphrase ({storage / KDF_FILENAME} is there): "
                                 f"set {PASSPHRASE_ENV}.")
            raise StoreError(f"{key_path} is missing: without the key the store cannot be decrypted.")
        fsperm.private_dir(storage)
        _create_private(key_path, Fernet.generate_key())
    fsperm.tighten_tree(key_path)
    return Cipher(fernet_from_key(key_path.read_bytes(), str(key_path)), source)


# ---------------------------------------------------------------------------
# The target of a key change
# ---------------------------------------------------------------------------
def new_secret(passphrase: str | None = None, key: str | None = None) -> NewSecret:
    """The new secret: ``key`` (a Fernet key), else ``passphrase``, else a fresh random key in key.key.

    ``passphrase=""`` is an error (an empty passphrase is no secret).
    """
    if key is not None:
        return NewSecret(Cipher(fernet_from_key(key, NEW_KEY_ENV), "env-key"), delete=[KEY_FILENAME, KDF_FILENAME],
                         description=f"a new key ({KEY_ENV})")
    if passphrase is not None:
        if not passphrase.strip():
            raise StoreError("The new passphrase is empty. Choose one, or leave it out for a fresh key in key.key.")
        params = new_kdf_params()
        salt, n, r, p = check_kdf_params(params, "new kdf.json")
        fernet = Fernet(derive_key(passphrase, salt, n, r, p))
        return NewSecret(Cipher(fernet, "passphrase"), write={KDF_FILENAME: json.dumps(params).encode()},
                         delete=[KEY_FILENAME], description=f"a new passphrase ({PASSPHRASE_ENV})")
    raw = Fernet.generate_key()
    return NewSecret(Cipher(Fernet(raw), "key-file"), write={KEY_FILENAME: raw}, delete=[KDF_FILENAME],
                     description=f"a fresh random key in {KEY_FILENAME}", fresh_key_file=True)


def new_secret_from_env() -> NewSecret | None:
    """From MEMCHAT_NEW_KEY or MEMCHAT_NEW_PASSPHRASE; None when neither is set."""
    key, passphrase = os.environ.get(NEW_KEY_ENV), os.environ.get(NEW_PASSPHRASE_ENV)
    if key is not None and passphrase is not None:
        raise StoreError(f"Set {NEW_KEY_ENV} or {NEW_PASSPHRASE_ENV}, not both.")
    if key is not None:
        if not key.strip():
            raise StoreError(f"{NEW_KEY_ENV} is set but empty.")
        return new_secret(key=key)
    if passphrase is not None:
        if not passphrase.strip():
            raise StoreError(f"{NEW_PASSPHRASE_ENV} is set but empty: an empty passphrase is not a key.")
        return new_secret(passphrase=passphrase)
    return None
