"""Who may use an app: the bind address, and the app password.

The app server holds the store's key, so whoever reaches its port reads the
documents. The apps therefore bind 127.0.0.1 unless told otherwise, and an app
exposed to other machines (``--host 0.0.0.0``) needs a password:

  MEMCHAT_APP_PASSWORD       the password itself, or
  MEMCHAT_APP_PASSWORD_HASH  a hash of it, made with ``python -m memchat.auth``:
                             ``scrypt$N$r$p$SALT$HASH`` or ``pbkdf2_sha256$ITERATIONS$SALT$HASH``
                             (SALT and HASH url-safe base64).

When either is set, every app asks for it, on loopback too (other local users can
reach 127.0.0.1). Guesses are checked in constant time (``hmac.compare_digest``)
and nothing but a per-session "logged in" flag is kept.

Deliberately left out: user accounts, TLS (put a reverse proxy or an SSH tunnel
in front), and the login form itself (``memchat.ui.common``).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import os
from dataclasses import dataclass

from .config import AppConfig, KdfConfig
from .errors import MemChatError

PASSWORD_ENV = "MEMCHAT_APP_PASSWORD"
HASH_ENV = "MEMCHAT_APP_PASSWORD_HASH"


class AuthError(MemChatError):
    """The app password is missing where it is needed, or malformed."""


def is_loopback(host: str | None) -> bool:
    """True for 127.0.0.0/8, ::1 and "localhost"; False for everything else (0.0.0.0, "", names)."""
    if not host:
        return False  # Streamlit binds every interface when no address is given
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip().strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def hash_password(password: str, scheme: str = "scrypt") -> str:
    """A hash for MEMCHAT_APP_PASSWORD_HASH (random salt; the parameters travel inside)."""
    if not password:
        raise AuthError("The app password is empty.")
    salt = os.urandom(16)
    if scheme == "scrypt":
        n, r, p = KdfConfig.n, KdfConfig.r, KdfConfig.p
        digest = hashlib.scrypt(password.encode(), salt=salt, n=n, r=r, p=p, maxmem=_maxmem(n, r, p), dklen=32)
        return f"scrypt${n}${r}${p}${_b64(salt)}${_b64(digest)}"
    if scheme == "pbkdf2_sha256":
        it = AppConfig.pbkdf2_iterations
        digest = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, it)
        return f"pbkdf2_sha256${it}${_b64(salt)}${_b64(digest)}"
    raise AuthError(f"Unknown password hash scheme {scheme!r}: use scrypt or pbkdf2_sha256.")


def _maxmem(n: int, r: int, p: int) -> int:
    return 128 * r * (n + p + 2) + (1 << 20)  # scrypt's working set, plus slack


@dataclass(frozen=True)
class Verifier:
    """Checks a guess against the configured password, in constant time."""

    kind: str  # "plain" | "scrypt" | "pbkdf2_sha256"
    params: tuple
    expected: bytes

    def check(self, guess: str) -> bool:
        guess_b = (guess or "").encode()
        if self.kind == "plain":
            # Compare fixed-length digests: compare_digest on the raw strings would leak the length.
            got = hashlib.sha256(guess_b).digest()
        elif self.kind == "scrypt":
            n, r, p, salt = self.params
            got = hashlib.scrypt(guess_b, salt=salt, n=n, r=r, p=p, maxmem=_maxmem(n, r, p), dklen=len(self.expected))
        else:
            iterations, salt = self.params
            got = hashlib.pbkdf2_hmac("sha256", guess_b, salt, iterations, dklen=len(self.expected))
        return hmac.compare_digest(got, self.expected)


def parse_hash(text: str) -> Verifier:
    """The verifier of a MEMCHAT_APP_PASSWORD_HASH value. Raises AuthError, naming the expected form."""
    form = "expected scrypt$N$r$p$SALT$HASH or pbkdf2_sha256$ITERATIONS$SALT$HASH (make one: python -m memchat.auth)"
    parts = text.strip().split("$")
    try:
        if parts[0] == "scrypt" and len(parts) == 6:
            n, r, p = int(parts[1]), int(parts[2]), int(parts[3])
            salt, digest = _unb64(parts[4]), _unb64(parts[5])
            if not (KdfConfig.min_n <= n <= KdfConfig.max_n and n & (n - 1) == 0
                    and 1 <= r <= KdfConfig.max_r and 1 <= p <= KdfConfig.max_p):
                raise AuthError(f"{HASH_ENV}: scrypt parameters n={n} r={r} p={p} are out of bounds "
                                f"(n a power of 2 in [{KdfConfig.min_n}, {KdfConfig.max_n}], "
                                f"r <= {KdfConfig.max_r}, p <= {KdfConfig.max_p}).")
            kind, params = "scrypt", (n, r, p, salt)
        elif parts[0] == "pbkdf2_sha256" and len(parts) == 4:
            iterations = int(parts[1])
            salt, digest = _unb64(parts[2]), _unb64(parts[3])
            if not AppConfig.min_pbkdf2_iterations <= iterations <= 100 * AppConfig.pbkdf2_iterations:
                raise AuthError(f"{HASH_ENV}: {iterations} PBKDF2 iterations is out of bounds "
                                f"(at least {AppConfig.min_pbkdf2_iterations}).")
            kind, params = "pbkdf2_sha256", (iterations, salt)
        else:
            raise AuthError(f"{HASH_ENV} is malformed: {form}.")
    except (ValueError, TypeError) as exc:  # int() or base64 of garbage
        raise AuthError(f"{HASH_ENV} is malformed: {form}.") from exc
    if len(salt) < 8 or len(digest) < 16:
        raise AuthError(f"{HASH_ENV} is malformed (salt or hash too short): {form}.")
    return Verifier(kind, params, digest)


def configured_verifier() -> Verifier | None:
    """The verifier of the configured app password, None when none is set. Raises AuthError if malformed."""
    hashed = os.environ.get(HASH_ENV)
    plain = os.environ.get(PASSWORD_ENV)
    if hashed is not None and hashed.strip():
        return parse_hash(hashed)
    if plain is not None:
        if plain == "":
            raise AuthError(f"{PASSWORD_ENV} is set but empty: set a password, or unset it.")
        if len(plain) < AppConfig.min_password_chars:
            raise AuthError(f"{PASSWORD_ENV} is {len(plain)} characters; use at least {AppConfig.min_password_chars}.")
        return Verifier("plain", (), hashlib.sha256(plain.encode()).digest())
    if hashed is not None:
        raise AuthError(f"{HASH_ENV} is set but empty: set a hash (python -m memchat.auth), or unset it.")
    return None


def check_exposure(host: str, port: int = AppConfig.rag_port) -> Verifier | None:
    """Refuse a non-loopback bind without a password (AuthError, one line). Returns the verifier, if any."""
    verifier = configured_verifier()
    if not is_loopback(host) and verifier is None:
        raise AuthError(
            f"Refusing to serve on {host or 'every interface'} without a password: anyone who reaches the port "
            f"could read your documents. Set {PASSWORD_ENV} (or {HASH_ENV}), or use an SSH tunnel "
            f"(ssh -N -L {port}:127.0.0.1:{port} HOST) and keep the default 127.0.0.1."
        )
    return verifier


def main() -> int:
    """``python -m memchat.auth``: prompt for a password twice, print its hash for MEMCHAT_APP_PASSWORD_HASH."""
    import getpass
    import sys

    first = getpass.getpass("App password: ")
    if getpass.getpass("Again: ") != first:
        print("error: the two passwords differ", file=sys.stderr)
        return 1
    if len(first) < AppConfig.min_password_chars:
        print(f"error: use at least {AppConfig.min_password_chars} characters", file=sys.stderr)
        return 1
    print(hash_password(first))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
