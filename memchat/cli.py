"""What the four scripts share at their edge: error translation, and starting a Streamlit app.

``run(handler, args)`` turns a ``MemChatError`` into one line on stderr and exit
code 1, and Ctrl-C into one line and 130. ``launch_streamlit`` execs
``streamlit run`` bound to 127.0.0.1 unless told otherwise, refusing a
non-loopback address without an app password (``memchat.auth``).

Deliberately left out: argument parsing (each script owns its flags) and
anything Streamlit renders (``memchat.ui``). Imports nothing heavy.
"""

from __future__ import annotations

import os
import sys
from typing import Callable

from .errors import MemChatError

INTERRUPTED = "interrupted"


def run(handler: Callable[..., int], *args, interrupted: str = INTERRUPTED) -> int:
    """``handler(*args)`` with Mem_Chat's errors as one line on stderr (exit 1); Ctrl-C exits 130."""
    try:
        return handler(*args)
    except MemChatError as exc:
        print(f"error: {one_line(str(exc))}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(interrupted, file=sys.stderr)
        return 130


def one_line(text: str) -> str:
    """The message on one line: newlines and other control characters shown escaped."""
    from .names import escape_controls

    return escape_controls(text)


def add_app_flags(parser, default_port: int) -> None:
    """--host / --port for a launcher, with the same help everywhere."""
    from .config import AppConfig

    g = parser.add_argument_group("serving")
    g.add_argument("--host", default=AppConfig.host,
                   help="address to listen on (default 127.0.0.1, this machine only). Anything else, e.g. 0.0.0.0, "
                        "needs MEMCHAT_APP_PASSWORD or MEMCHAT_APP_PASSWORD_HASH")
    g.add_argument("--port", type=int, default=default_port, help=f"port for the app (default {default_port})")


def max_file_bytes() -> int:
    """Bytes one uploaded PDF may have: ingestion's per-file cap (IngestConfig, MEMCHAT_MAX_FILE_BYTES)."""
    from .config import IngestConfig

    return IngestConfig().max_file_bytes


def max_upload_mb() -> int:
    """Streamlit's server.maxUploadSize (MB, per file): the per-file byte cap, rounded up."""
    return max(1, -(-max_file_bytes() // (1 << 20)))


def streamlit_command(script: str, host: str, port: int, script_args: list[str] | None = None) -> list[str]:
    """The ``streamlit run`` command line: the settings of .streamlit/config.toml, from any folder."""
    cmd = [sys.executable, "-m", "streamlit", "run", os.path.abspath(script),
           "--server.address", host, "--server.port", str(port),
           "--server.maxUploadSize", str(max_upload_mb()),
           "--client.showErrorDetails", "none",
           "--browser.gatherUsageStats", "false"]
    if script_args:
        cmd += ["--", *script_args]
    return cmd


def launch_streamlit(script: str, host: str, port: int, script_args: list[str] | None = None) -> int:
    """Exec Streamlit on ``script``. Raises AuthError (before anything starts) for an exposed bind without a password."""
    from .auth import check_exposure, is_loopback

    check_exposure(host, port)
    if not is_loopback(host):
        print(f"Serving on {host}:{port} behind the app password. Anyone who can reach this port gets the login "
              "page; traffic is not encrypted: prefer an SSH tunnel or a TLS proxy.", file=sys.stderr)
    cmd = streamlit_command(script, host, port, script_args)
    os.execv(sys.executable, cmd)  # replaces this process: Ctrl-C reaches Streamlit directly
    return 0  # not reached
