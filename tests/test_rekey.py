"""Key management: `main.py rekey` in every direction, SIGKILL during it, scrypt parameters and their bounds."""

from __future__ import annotations

import base64
import io
import json
import os
import random
import runpy
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cryptography.fernet import Fernet

from memchat import config, crypto
from memchat.config import KdfConfig
from memchat.errors import StoreError, WrongKeyError
from memchat.store import EncryptedStore, StoreState

REPO = Path(__file__).resolve().parents[1]
QA_PDFS = sorted((REPO.parent / "shared" / "data" / "qa_dev" / "pdfs").glob("*.pdf"))
OLD_PASS, NEW_PASS = "old passphrase, long enough", "new passphrase, longer still"
DOCS = {"documents": {"a.pdf": {"name": "a.pdf", "version": 1, "pages": 1, "chunks": 1, "added": 1.7e9}}}


def run_main(monkeypatch, *argv: str) -> int:
    monkeypatch.setattr(sys, "argv", ["main.py", *argv])
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))  # no terminal
    with pytest.raises(SystemExit) as exc:
        runpy.run_path(str(REPO / "main.py"), run_name="__main__")
    return exc.value.code


def make_store(index_bytes: bytes = b"index bytes") -> StoreState:
    store = EncryptedStore()
    state = StoreState(index_bytes, {"format_version": config.STORE_FORMAT_VERSION, "chunks": {"1": {"text": "secret words"}}},
                       json.loads(json.dumps(DOCS)))
    with store.transaction():
        store.commit(state)
    return state


def read_with(monkeypatch, key: str | None = None, passphrase: str | None = None) -> StoreState:
    for var, value in (("MEMCHAT_KEY", key), ("MEMCHAT_PASSPHRASE", passphrase)):
        if value is None:
            monkeypatch.delenv(var, raising=False)
        else:
            monkeypatch.setenv(var, value)
    return EncryptedStore().read()


def store_dir() -> Path:
    return config.storage_dir()


# ---------------------------------------------------------------------------
# Every direction
# ---------------------------------------------------------------------------
def test_key_file_to_fresh_key_file(monkeypatch, capsys):
    make_store()
    old_key = (store_dir() / "key.key").read_text()
    assert run_main(monkeypatch, "rekey") == 0  # no new secret, no terminal: a fresh random key
    assert "fresh random key" in capsys.readouterr().out
    new_key = (store_dir() / "key.key").read_text()
    assert new_key != old_key
    assert read_with(monkeypatch).metadata["chunks"]["1"]["text"] == "secret words"
    with pytest.raises(WrongKeyError):
        read_with(monkeypatch, key=old_key)


def test_key_file_to_passphrase_deletes_key_file(monkeypatch):
    make_store()
    old_key = (store_dir() / "key.key").read_text()
    monkeypatch.setenv("MEMCHAT_NEW_PASSPHRASE", NEW_PASS)
    assert run_main(monkeypatch, "rekey") == 0
    monkeypatch.delenv("MEMCHAT_NEW_PASSPHRASE")
    assert not (store_dir() / "key.key").exists()
    params = json.loads((store_dir() / "kdf.json").read_text())
    assert (params["n"], params["r"], params["p"]) == (2**17, 8, 1)
    assert read_with(monkeypatch, passphrase=NEW_PASS).versions == DOCS
    with pytest.raises(WrongKeyError):
        read_with(monkeypatch, key=old_key)
    with pytest.raises(StoreError, match="opens with a passphrase"):
        read_with(monkeypatch)  # neither set: says which variable to set


def test_passphrase_to_passphrase_new_salt(monkeypatch):
    monkeypatch.setenv("MEMCHAT_PASSPHRASE", OLD_PASS)
    make_store()
    salt = json.loads((store_dir() / "kdf.json").read_text())["salt"]
    monkeypatch.setenv("MEMCHAT_NEW_PASSPHRASE", NEW_PASS)
    assert run_main(monkeypatch, "rekey") == 0
    monkeypatch.delenv("MEMCHAT_NEW_PASSPHRASE")
    assert json.loads((store_dir() / "kdf.json").read_text())["salt"] != salt
    assert read_with(monkeypatch, passphrase=NEW_PASS).index_bytes == b"index bytes"
    with pytest.raises(WrongKeyError):
        read_with(monkeypatch, passphrase=OLD_PASS)
    assert not (store_dir() / "key.key").exists()


def test_passphrase_to_key_file_and_env_key_to_passphrase(monkeypatch, capsys):
    monkeypatch.setenv("MEMCHAT_PASSPHRASE", OLD_PASS)
    make_store()
    assert run_main(monkeypatch, "rekey") == 0  # to a fresh key.key
    assert "Unset MEMCHAT_PASSPHRASE" in capsys.readouterr().out
    assert not (store_dir() / "kdf.json").exists()
    with pytest.raises(StoreError, match="salt is gone"):
        read_with(monkeypatch, passphrase=OLD_PASS)  # its salt went with the commit: the old passphrase is no key
    key = (store_dir() / "key.key").read_text()
    read_with(monkeypatch)

    # key file -> MEMCHAT_NEW_KEY -> passphrase
    env_key = Fernet.generate_key().decode()
    monkeypatch.setenv("MEMCHAT_NEW_KEY", env_key)
    assert run_main(monkeypatch, "rekey") == 0
    monkeypatch.delenv("MEMCHAT_NEW_KEY")
    assert not (store_dir() / "key.key").exists()
    with pytest.raises(WrongKeyError):
        read_with(monkeypatch, key=key)
    read_with(monkeypatch, key=env_key)
    monkeypatch.setenv("MEMCHAT_NEW_PASSPHRASE", NEW_PASS)
    assert run_main(monkeypatch, "rekey") == 0
    monkeypatch.delenv("MEMCHAT_NEW_PASSPHRASE")
    assert read_with(monkeypatch, passphrase=NEW_PASS).index_bytes == b"index bytes"
    with pytest.raises(WrongKeyError):
        read_with(monkeypatch, key=env_key)


def test_prompted_passphrase(monkeypatch, capsys):
    import getpass

    make_store()
    answers = iter([NEW_PASS, NEW_PASS])
    monkeypatch.setattr(getpass, "getpass", lambda prompt="": next(answers))
    monkeypatch.setattr(sys, "argv", ["main.py", "rekey"])
    tty = io.StringIO("")
    tty.isatty = lambda: True
    monkeypatch.setattr(sys, "stdin", tty)
    with pytest.raises(SystemExit) as exc:
        runpy.run_path(str(REPO / "main.py"), run_name="__main__")
    assert exc.value.code == 0, capsys.readouterr().err
    assert read_with(monkeypatch, passphrase=NEW_PASS).index_bytes == b"index bytes"

    answers = iter(["one passphrase here", "another one here"])  # a typo in the confirmation: nothing changes
    before = {p.name: p.read_bytes() for p in store_dir().iterdir() if p.is_file() and p.name != ".lock"}
    monkeypatch.setenv("MEMCHAT_PASSPHRASE", NEW_PASS)
    with pytest.raises(SystemExit) as exc:
        runpy.run_path(str(REPO / "main.py"), run_name="__main__")
    assert exc.value.code == 1 and "differ" in capsys.readouterr().err
    assert before == {p.name: p.read_bytes() for p in store_dir().iterdir() if p.is_file() and p.name != ".lock"}


def test_rekey_needs_the_current_key_and_a_store(monkeypatch, capsys):
    assert run_main(monkeypatch, "rekey") == 1
    assert "No knowledge base" in capsys.readouterr().err
    make_store()
    monkeypatch.setenv("MEMCHAT_KEY", Fernet.generate_key().decode())
    assert run_main(monkeypatch, "rekey") == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "does not open the store" in err[0]


@pytest.mark.parametrize("var", ["MEMCHAT_NEW_PASSPHRASE", "MEMCHAT_PASSPHRASE", "MEMCHAT_KEY"])
def test_empty_passphrase_or_key_is_an_error(monkeypatch, capsys, var):
    if var != "MEMCHAT_NEW_PASSPHRASE":  # a new store: no silent fall-back to writing key.key
        monkeypatch.setenv(var, "")
        with pytest.raises(StoreError, match=f"{var} is set but empty"):
            make_store()
        assert not (store_dir() / "key.key").exists()
        monkeypatch.delenv(var)
    make_store()
    before = {p.name: p.read_bytes() for p in store_dir().iterdir() if p.is_file()}
    monkeypatch.setenv(var, "")
    code = run_main(monkeypatch, "rekey" if var == "MEMCHAT_NEW_PASSPHRASE" else "list")
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1 and var in err[0] and "empty" in err[0]
    assert before == {p.name: p.read_bytes() for p in store_dir().iterdir() if p.is_file()}


# ---------------------------------------------------------------------------
# SIGKILL at random points: the old state with the old key, or the new with the new, never neither
# ---------------------------------------------------------------------------
CHILD = r"""
import os, sys, time
sys.path.insert(0, {repo!r})
from memchat.crypto import new_secret
from memchat.store import EncryptedStore
store = EncryptedStore()
store.read()  # derive/load the current key first: the window below is the rekey itself
secret = new_secret(passphrase=os.environ.get("NEW_PASS")) if os.environ.get("NEW_PASS") else new_secret()
print("READY", flush=True)
t0 = time.perf_counter()
store.rekey(secret)
print("DONE", time.perf_counter() - t0, flush=True)
"""


def _child(env: dict) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", CHILD.format(repo=str(REPO))], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


@pytest.mark.parametrize("direction", ["key-file", "passphrase"])
def test_sigkill_during_rekey_leaves_old_or_new(monkeypatch, direction):
    payload = os.urandom(4 << 20)  # 4 MiB index: encrypting and writing it takes long enough to land kills inside
    if direction == "passphrase":
        monkeypatch.setenv("MEMCHAT_PASSPHRASE", OLD_PASS)
    make_store(payload)
    env = dict(os.environ)
    if direction == "passphrase":
        env["NEW_PASS"] = NEW_PASS

    def snapshot() -> dict[str, bytes]:
        return {p.name: p.read_bytes() for p in store_dir().iterdir() if p.is_file() and p.name != ".lock"}

    # One uninterrupted run (on a copy of the state) to learn how long the rekey takes.
    original = snapshot()
    proc = _child(env)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    duration = float(out.split("DONE")[1])
    for name in list(snapshot()):
        (store_dir() / name).unlink()
    for name, data in original.items():
        (store_dir() / name).write_bytes(data)

    rng = random.Random(10)
    trials = 16 if direction == "key-file" else 8
    outcomes = {"old": 0, "new": 0}
    left = {"staging": 0, "commit": 0}  # kills that landed mid-way: a folder left for recovery
    for trial in range(trials):
        before = snapshot()
        old_key = before.get("key.key")
        proc = _child(env)
        assert proc.stdout.readline().strip() == "READY"
        time.sleep(rng.uniform(0, duration * 1.3))
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
        proc.stderr.close()
        left["staging"] += bool(list(store_dir().glob(".staging-*")))
        left["commit"] += bool(list(store_dir().glob(".commit-*")))

        if direction == "key-file":
            state = read_with(monkeypatch)  # whatever key.key is after recovery must open it
            now_key = (store_dir() / "key.key").read_bytes()
            outcome = "old" if now_key == old_key else "new"
            if outcome == "new":
                with pytest.raises(WrongKeyError):
                    read_with(monkeypatch, key=old_key.decode())
        else:
            try:
                state = read_with(monkeypatch, passphrase=OLD_PASS)
                outcome = "old"
            except WrongKeyError:
                state = read_with(monkeypatch, passphrase=NEW_PASS)
                outcome = "new"
            else:
                with pytest.raises(WrongKeyError):
                    read_with(monkeypatch, passphrase=NEW_PASS)
        assert state.index_bytes == payload and state.versions == DOCS
        assert not list(store_dir().glob(".staging-*")) and not list(store_dir().glob(".commit-*"))
        if outcome == "old":
            assert snapshot() == before  # untouched, byte for byte
        outcomes[outcome] += 1
        if direction == "passphrase" and outcome == "new":  # next trial starts from the old passphrase again
            monkeypatch.setenv("MEMCHAT_PASSPHRASE", NEW_PASS)
            store = EncryptedStore()
            store.rekey(crypto.new_secret(passphrase=OLD_PASS))
            monkeypatch.setenv("MEMCHAT_PASSPHRASE", OLD_PASS)
    print(f"{direction}: {outcomes} over {trials} kills in a {duration * 1000:.0f} ms rekey; "
          f"left mid-way: {left}")  # shown with -s
    assert sum(outcomes.values()) == trials


# ---------------------------------------------------------------------------
# scrypt parameters
# ---------------------------------------------------------------------------
def test_new_store_uses_owasp_scrypt(monkeypatch):
    monkeypatch.setenv("MEMCHAT_PASSPHRASE", OLD_PASS)
    make_store()
    params = json.loads((store_dir() / "kdf.json").read_text())
    assert params["kdf"] == "scrypt" and params["n"] >= 2**17 and params["r"] == 8 and params["p"] == 1
    assert len(base64.b64decode(params["salt"])) == 16


def test_old_store_at_2_15_still_opens(monkeypatch):
    monkeypatch.setenv("MEMCHAT_PASSPHRASE", OLD_PASS)
    default_n = KdfConfig.n
    monkeypatch.setattr(KdfConfig, "n", 2**15)  # as the first release made them
    make_store()
    monkeypatch.setattr(KdfConfig, "n", default_n)
    crypto._derive_cached.cache_clear()
    assert json.loads((store_dir() / "kdf.json").read_text())["n"] == 2**15
    assert read_with(monkeypatch, passphrase=OLD_PASS).index_bytes == b"index bytes"


@pytest.mark.parametrize("content,needle", [
    ({"n": 2}, "n=2,"),
    ({"n": 2**40}, "n=1099511627776"),
    ({"n": 3 * 2**15}, "power of 2"),
    ({"r": 0}, "r=0"),
    ({"p": 1000}, "p=1000"),
    ({"n": 2**20, "r": 16}, "MiB"),  # each in bounds, memory too much together
    ({"n": "32768"}, "integers"),
    ({"salt": "!!not base64!!"}, "salt"),
    ({"salt": base64.b64encode(b"short").decode()}, "salt"),
    ({"kdf": "argon2"}, "not a scrypt"),
    ("not json {", "not valid JSON"),
    ([1, 2, 3], "not a scrypt"),
])
def test_kdf_json_bounds_and_malformed_are_one_line(monkeypatch, capsys, content, needle):
    monkeypatch.setenv("MEMCHAT_PASSPHRASE", OLD_PASS)
    make_store()
    path = store_dir() / "kdf.json"
    if isinstance(content, dict):
        params = json.loads(path.read_text())
        params.update(content)
        text = json.dumps(params)
    else:
        text = content if isinstance(content, str) else json.dumps(content)
    path.write_text(text)
    crypto._derive_cached.cache_clear()
    before = {p.name: p.read_bytes() for p in store_dir().iterdir() if p.is_file()}
    t0 = time.perf_counter()
    assert run_main(monkeypatch, "list") == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and needle in err[0] and "kdf.json" in err[0], err
    assert time.perf_counter() - t0 < 30  # refused before any derivation (n=2**40 would need 128 TiB); not a timing test
    assert before == {p.name: p.read_bytes() for p in store_dir().iterdir() if p.is_file()}


def test_list_warns_once_when_key_sits_beside_data(monkeypatch, capsys):
    from memchat.knowledge import KnowledgeBase
    from tests.fakes import FakeEmbedder

    KnowledgeBase(embedder=FakeEmbedder()).add_documents(QA_PDFS[:1])  # `list` reads a real index
    assert run_main(monkeypatch, "list") == 0
    err = capsys.readouterr().err
    assert err.count("Warning: the key sits beside the data") == 1
    monkeypatch.setenv("MEMCHAT_NEW_PASSPHRASE", NEW_PASS)
    assert run_main(monkeypatch, "rekey") == 0
    monkeypatch.delenv("MEMCHAT_NEW_PASSPHRASE")
    monkeypatch.setenv("MEMCHAT_PASSPHRASE", NEW_PASS)
    capsys.readouterr()
    assert run_main(monkeypatch, "list") == 0
    assert "Warning" not in capsys.readouterr().err


def test_a_running_process_follows_a_key_file_rekey(monkeypatch):
    """An app holding the old key file's cipher picks up the new key.key; nothing is written under the old key."""
    make_store()
    running = EncryptedStore()
    running.read()  # the app's store object, cipher cached
    EncryptedStore().rekey(crypto.new_secret())  # the CLI, another object (another process in real life)
    assert running.read().index_bytes == b"index bytes"  # reloaded from the new key.key
    monkeypatch.setenv("MEMCHAT_NEW_PASSPHRASE", NEW_PASS)
    assert run_main(monkeypatch, "rekey") == 0  # now to a passphrase the running process does not have
    with pytest.raises(StoreError, match="opens with a passphrase"):
        running.read()
    with pytest.raises(StoreError):
        with running.transaction():  # a writer with a stale key cannot commit: its read fails first
            pass


def test_rekey_help(monkeypatch, capsys):
    assert run_main(monkeypatch, "rekey", "--help") == 0
    out = capsys.readouterr().out
    assert "MEMCHAT_NEW_PASSPHRASE" in out and "atomic" in out


def test_rekey_says_when_training_data_was_encrypted_with_the_old_key(monkeypatch, capsys):
    make_store()
    old = EncryptedStore().cipher()
    folder = config.training_dir()
    folder.mkdir()
    (folder / config.DATASET_FILENAME).write_bytes(old.encrypt(b"{}"))  # as extract_faiss_data.py --encrypt writes
    (folder / config.STATS_FILENAME).write_text("{}")  # plain: not mentioned
    assert run_main(monkeypatch, "rekey") == 0
    err = capsys.readouterr().err
    assert "encrypted with the old key" in err and config.DATASET_FILENAME in err and config.STATS_FILENAME not in err
    assert "extract_faiss_data.py --encrypt --restart" in err
