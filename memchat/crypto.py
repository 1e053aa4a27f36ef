"""The Fernet key of the store, and encrypt/decrypt of bytes.

Where the key comes from, in order:
  1. ``MEMCHAT_KEY``: a Fernet key (urlsafe base64 of 32 bytes) in the environment;
  2. ``MEMCHAT_PASSPHRASE``: a passphrase run through scrypt with a random salt that is
     stored (it is not secret) in ``encrypted_faiss_storage/kdf.json``;
  3. ``encrypted_faiss_storage/key.key``: created on first use with mode 0600.
With 1 or 2 no ``key.key`` is written, so the key need not sit beside the data.

Deliberately left out: key rotation and multiple keys per store.
"""

from __future__ import annotations

import base64
import json
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography.fernet import Fernet, InvalidToken
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from .config import KEY_FILENAME
from .errors import StoreError

KDF_FILENAME = "kdf.json"
# scrypt cost: n=2**15, r=8 takes ~0.1 s and 32 MiB: slow for guessing, fine once per process.
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**15, 8, 1

__all__ = ["Cipher", "InvalidToken", "load_or_create_cipher", "key_source"]


@dataclass
class Cipher:
    fernet: Fernet
    source: str  # "env-key" | "passphrase" | "key-file": shown to the user

    def encrypt(self, data: bytes) -> bytes:
        return self.fernet.encrypt(data)

    def decrypt(self, token: bytes) -> bytes:
        return self.fernet.decrypt(token)  # raises InvalidToken on wrong key or tampering


def key_source() -> str:
    if os.environ.get("MEMCHAT_KEY"):
        return "env-key"
    if os.environ.get("MEMCHAT_PASSPHRASE"):
        return "passphrase"
    return "key-file"


def _write_private(path: Path, data: bytes) -> None:
    """Create ``path`` with mode 0600 atomically; never overwrite an existing file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
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


def _passphrase_key(storage: Path, passphrase: str, create: bool) -> bytes:
    kdf_path = storage / KDF_FILENAME
    if kdf_path.exists():
        params = json.loads(kdf_path.read_text())
        salt = base64.b64decode(params["salt"])
    elif create:
        storage.mkdir(parents=True, exist_ok=True)
        salt = os.urandom(16)
        params = {"kdf": "scrypt", "salt": base64.b64encode(salt).decode(), "n": SCRYPT_N, "r": SCRYPT_R, "p": SCRYPT_P}
        _write_private(kdf_path, json.dumps(params).encode())
        params = json.loads(kdf_path.read_text())  # another process may have won the race
        salt = base64.b64decode(params["salt"])
    else:
        raise StoreError(f"{kdf_path} is missing: the passphrase's salt is gone, so MEMCHAT_PASSPHRASE cannot open this store.")
    kdf = Scrypt(salt=salt, length=32, n=params.get("n", SCRYPT_N), r=params.get("r", SCRYPT_R), p=params.get("p", SCRYPT_P))
    return base64.urlsafe_b64encode(kdf.derive(passphrase.encode()))


def load_or_create_cipher(storage: Path, create: bool = True) -> Cipher:
    """The cipher for the store in ``storage``; ``create`` makes a key if there is none."""
    source = key_source()
    if source == "env-key":
        try:
            return Cipher(Fernet(os.environ["MEMCHAT_KEY"].strip().encode()), source)
        except ValueError as exc:
            raise StoreError(
                "MEMCHAT_KEY is not a valid Fernet key (32 url-safe base64-encoded bytes). "
                'Make one with: python -c "from cryptography.fernet import Fernet; print(Fernet.generate_key().decode())"'
            ) from exc
    if source == "passphrase":
        return Cipher(Fernet(_passphrase_key(storage, os.environ["MEMCHAT_PASSPHRASE"], create)), source)

    key_path = storage / KEY_FILENAME
    if not key_path.exists():
        if not create:
            raise StoreError(f"{key_path} is missing: without the key the store cannot be decrypted.")
        storage.mkdir(parents=True, exist_ok=True)
        _write_private(key_path, Fernet.generate_key())
    key = key_path.read_bytes().strip()
    try:
        return Cipher(Fernet(key), source)
    except ValueError as exc:
        raise StoreError(f"{key_path} does not hold a valid Fernet key.") from exc
