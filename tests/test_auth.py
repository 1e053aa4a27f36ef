"""The apps are private by default: loopback bind, a password to expose them, a login gate.

The launch tests start the real launchers and read the listening socket's
address from the kernel (psutil); they send no traffic at all, and none to a
non-loopback address.
"""

from __future__ import annotations

import os
import runpy
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from memchat import auth
from memchat.auth import AuthError

REPO = Path(__file__).resolve().parents[1]
PASSWORD = "correct horse battery staple"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _listening(pid: int, port: int) -> set[str]:
    """Addresses that process ``pid`` (or a child) listens on at ``port``."""
    try:
        procs = [psutil.Process(pid)]
        procs += procs[0].children(recursive=True)
    except psutil.NoSuchProcess:
        return set()
    addrs = set()
    for p in procs:
        try:
            for c in p.net_connections(kind="inet"):
                if c.status == psutil.CONN_LISTEN and c.laddr.port == port:
                    addrs.add(c.laddr.ip)
        except psutil.NoSuchProcess:
            pass
    return addrs


def _launch_and_read_bind(argv: list[str], cwd: Path, port: int) -> set[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "MEMCHAT_APP_PASSWORD", "MEMCHAT_APP_PASSWORD_HASH")}
    env["HOME"] = str(cwd)  # Streamlit may write ~/.streamlit: keep it in the tmp folder
    proc = subprocess.Popen(argv, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 60
        addrs: set[str] = set()
        while time.time() < deadline and proc.poll() is None:
            addrs = _listening(proc.pid, port)
            if addrs:
                time.sleep(0.5)  # let every socket of the server come up, then read again
                return _listening(proc.pid, port)
            time.sleep(0.3)
        raise AssertionError(f"{argv} never listened on {port}: {proc.stderr.read().decode()[-2000:] if proc.poll() is not None else 'timeout'}")
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize("launcher", [
    ["main.py", "app"],
    ["main_hybrid.py"],
    ["test_finetuned_model.py", "streamlit"],
])
def test_launchers_listen_on_loopback_only(launcher, isolated_home):
    port = _free_port()
    argv = [sys.executable, str(REPO / launcher[0]), *launcher[1:], "--port", str(port)]
    addrs = _launch_and_read_bind(argv, isolated_home, port)
    assert addrs == {"127.0.0.1"}, addrs


def test_plain_streamlit_run_reads_the_committed_config(isolated_home):
    """`streamlit run main.py` from the repository root: .streamlit/config.toml binds it to loopback."""
    shutil.copytree(REPO / ".streamlit", isolated_home / ".streamlit")  # the repo root's config, in a tmp cwd
    port = _free_port()
    argv = [sys.executable, "-m", "streamlit", "run", str(REPO / "main.py"), "--server.port", str(port)]
    assert _launch_and_read_bind(argv, isolated_home, port) == {"127.0.0.1"}


def test_committed_streamlit_config():
    import tomllib

    from memchat.cli import max_upload_mb

    cfg = tomllib.loads((REPO / ".streamlit" / "config.toml").read_text())
    assert cfg["server"]["address"] == "127.0.0.1"
    assert cfg["client"]["showErrorDetails"] == "none"
    assert cfg["server"]["maxUploadSize"] == max_upload_mb()  # ingestion's per-file cap, as the launchers pass it
    assert cfg["browser"]["gatherUsageStats"] is False


# ---------------------------------------------------------------------------
# Exposing takes a password
# ---------------------------------------------------------------------------
LAUNCHERS = [("main.py", ["app"]), ("main_hybrid.py", []), ("test_finetuned_model.py", ["streamlit"])]


def _run_script(monkeypatch, script: str, argv: list[str]) -> tuple[int, list | None]:
    execs = []
    monkeypatch.setattr(os, "execv", lambda exe, cmd: execs.append(cmd))  # record instead of starting Streamlit
    monkeypatch.setattr(sys, "argv", [script, *argv])
    with pytest.raises(SystemExit) as exc:
        runpy.run_path(str(REPO / script), run_name="__main__")
    return exc.value.code, (execs[0] if execs else None)


@pytest.mark.parametrize("script,sub", LAUNCHERS)
def test_exposing_without_password_is_refused(monkeypatch, capsys, script, sub):
    monkeypatch.delenv("MEMCHAT_APP_PASSWORD", raising=False)
    monkeypatch.delenv("MEMCHAT_APP_PASSWORD_HASH", raising=False)
    code, cmd = _run_script(monkeypatch, script, [*sub, "--host", "0.0.0.0"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and cmd is None  # nothing started
    assert len(err) == 1 and "Refusing to serve on 0.0.0.0 without a password" in err[0] and "MEMCHAT_APP_PASSWORD" in err[0]


@pytest.mark.parametrize("script,sub", LAUNCHERS)
def test_exposing_with_password_binds_as_asked(monkeypatch, capsys, script, sub):
    monkeypatch.setenv("MEMCHAT_APP_PASSWORD", PASSWORD)
    code, cmd = _run_script(monkeypatch, script, [*sub, "--host", "0.0.0.0", "--port", "9999"])
    assert cmd is not None, capsys.readouterr().err
    flags = dict(zip(cmd[::1], cmd[1::1]))
    assert flags["--server.address"] == "0.0.0.0" and flags["--server.port"] == "9999"
    assert flags["--client.showErrorDetails"] == "none" and "--server.maxUploadSize" in flags


@pytest.mark.parametrize("script,sub", [*LAUNCHERS, ("main.py", [])])  # bare `python main.py` too
def test_default_bind_is_loopback(monkeypatch, script, sub):
    monkeypatch.delenv("MEMCHAT_APP_PASSWORD", raising=False)
    _, cmd = _run_script(monkeypatch, script, sub)
    assert cmd[cmd.index("--server.address") + 1] == "127.0.0.1"


def test_short_or_empty_password_is_refused(monkeypatch):
    monkeypatch.setenv("MEMCHAT_APP_PASSWORD", "")
    with pytest.raises(AuthError, match="empty"):
        auth.check_exposure("0.0.0.0")
    monkeypatch.setenv("MEMCHAT_APP_PASSWORD", "abc")
    with pytest.raises(AuthError, match="at least"):
        auth.check_exposure("127.0.0.1")


def test_loopback_detection():
    assert auth.is_loopback("127.0.0.1") and auth.is_loopback("::1") and auth.is_loopback("localhost")
    assert auth.is_loopback("127.0.0.2")
    for host in ("0.0.0.0", "::", "", None, "192.168.1.5", "example.com"):
        assert not auth.is_loopback(host), host


# ---------------------------------------------------------------------------
# Password hashes and the constant-time compare
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("scheme", ["scrypt", "pbkdf2_sha256"])
def test_hash_roundtrip_and_constant_time_compare(monkeypatch, scheme):
    calls = []
    real = auth.hmac.compare_digest
    monkeypatch.setattr(auth.hmac, "compare_digest", lambda a, b: calls.append(1) or real(a, b))
    h = auth.hash_password(PASSWORD, scheme)
    assert h.startswith(scheme + "$") and PASSWORD not in h
    v = auth.parse_hash(h)
    assert v.check(PASSWORD) and not v.check(PASSWORD + "x") and not v.check("")
    assert len(calls) == 3  # every guess went through hmac.compare_digest
    assert auth.hash_password(PASSWORD, scheme) != h  # salted


def test_plain_password_compare_is_constant_time(monkeypatch):
    monkeypatch.setenv("MEMCHAT_APP_PASSWORD", PASSWORD)
    calls = []
    real = auth.hmac.compare_digest
    monkeypatch.setattr(auth.hmac, "compare_digest", lambda a, b: calls.append((len(a), len(b))) or real(a, b))
    v = auth.configured_verifier()
    assert v.check(PASSWORD) and not v.check("x")
    assert calls == [(32, 32), (32, 32)]  # fixed-length digests: the length of a guess leaks nothing


@pytest.mark.parametrize("bad", [
    "nonsense", "scrypt$1$8$1$AAAAAAAAAAAAAAAAAAAAAA$AAAAAAAAAAAAAAAAAAAAAA",  # n far below the floor
    f"scrypt${2**40}$8$1$AAAAAAAAAAAAAAAAAAAAAA$AAAAAAAAAAAAAAAAAAAAAA",  # n above the ceiling
    "scrypt$x$8$1$AAAA$AAAA", "pbkdf2_sha256$10$AAAAAAAAAAAAAAAAAAAAAA$AAAAAAAAAAAAAAAAAAAAAA",
    "pbkdf2_sha256$600000$!!$AAAA",
])
def test_malformed_hash_is_one_line(monkeypatch, bad):
    monkeypatch.setenv("MEMCHAT_APP_PASSWORD_HASH", bad)
    with pytest.raises(AuthError) as exc:
        auth.check_exposure("0.0.0.0")
    assert "MEMCHAT_APP_PASSWORD_HASH" in str(exc.value) and "\n" not in str(exc.value)


# ---------------------------------------------------------------------------
# The login gate in the apps (AppTest)
# ---------------------------------------------------------------------------
APPS = [("main.py", "Add PDFs in the sidebar"), ("main_hybrid.py", "Nothing to chat with yet"),
        ("test_finetuned_model.py", "No fine-tuned model in")]


def _texts(at) -> str:
    parts = [e.value for kind in ("markdown", "info", "error", "warning", "caption", "title") for e in getattr(at, kind)]
    return " ".join(str(p) for p in parts)


@pytest.mark.parametrize("script,content", APPS)
def test_login_gate_shows_nothing_until_the_password(monkeypatch, script, content):
    from streamlit.testing.v1 import AppTest

    from memchat.config import AppConfig

    monkeypatch.setattr(AppConfig, "login_failure_delay_s", 0.0)
    monkeypatch.setenv("MEMCHAT_APP_PASSWORD", PASSWORD)
    at = AppTest.from_file(str(REPO / script), default_timeout=60).run()
    assert not at.exception
    assert content not in _texts(at) and not at.sidebar.children and not at.chat_input
    assert [t.label for t in at.text_input] == ["Password"]

    at.text_input[0].input("wrong password, long enough")
    at.button[0].click().run()
    assert any("Wrong password" in e.value for e in at.error)
    assert content not in _texts(at) and not at.chat_input and not at.get("file_uploader")

    at.text_input[0].input(PASSWORD)
    at.button[0].click().run()
    assert not at.exception
    assert content in _texts(at) and not at.text_input  # in: the app itself, no password field
    state = str(at.session_state)
    assert "_memchat_logged_in" in state and PASSWORD not in state  # only a flag is kept


def test_login_gate_with_hash(monkeypatch):
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("MEMCHAT_APP_PASSWORD_HASH", auth.hash_password(PASSWORD))
    at = AppTest.from_file(str(REPO / "main.py"), default_timeout=60).run()
    at.text_input[0].input(PASSWORD)
    at.button[0].click().run()
    assert not at.exception and "Add PDFs in the sidebar" in _texts(at)


def test_app_served_on_all_interfaces_without_password_shows_nothing(monkeypatch):
    """`streamlit run main.py --server.address 0.0.0.0`, bypassing the launcher: the app itself refuses."""
    from streamlit import config as st_config
    from streamlit.testing.v1 import AppTest

    monkeypatch.delenv("MEMCHAT_APP_PASSWORD", raising=False)
    old = st_config.get_option("server.address")
    st_config.set_option("server.address", "0.0.0.0")
    try:
        at = AppTest.from_file(str(REPO / "main.py"), default_timeout=60).run()
    finally:
        st_config.set_option("server.address", old)
    assert not at.exception
    assert any("without a password" in e.value for e in at.error)
    assert "Add PDFs in the sidebar" not in _texts(at) and not at.sidebar.children


def test_hash_maker_prompts_twice(monkeypatch, capsys):
    import getpass

    answers = iter([PASSWORD, PASSWORD, PASSWORD, "a different one!"])
    monkeypatch.setattr(getpass, "getpass", lambda prompt="": next(answers))
    assert auth.main() == 0
    printed = capsys.readouterr().out.strip()
    assert auth.parse_hash(printed).check(PASSWORD)
    assert auth.main() == 1 and "differ" in capsys.readouterr().err  # a typo in the confirmation


def test_tightening_a_file_we_cannot_chmod_does_not_block_reading(tmp_path, monkeypatch, caplog):
    from memchat import fsperm

    f = tmp_path / "read-only-copy"
    f.write_text("x")
    f.chmod(0o644)

    def refuse(path, mode):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(fsperm.os, "chmod", refuse)
    fsperm.tighten_tree(f)  # logs, does not raise
    assert "Cannot make" in caplog.text
