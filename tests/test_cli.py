"""main.py run the way a user runs it (runpy + argv), with the real bundled embedder."""

from __future__ import annotations

import runpy
import subprocess
import sys
import time
from pathlib import Path

import pytest

from memchat import config

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
QA_PDFS = sorted((DATA / "qa_dev" / "pdfs").glob("*.pdf"))


def run_main(monkeypatch, *argv: str) -> int:
    monkeypatch.setattr(sys, "argv", ["main.py", *argv])
    with pytest.raises(SystemExit) as exc:
        runpy.run_path(str(REPO / "main.py"), run_name="__main__")
    return exc.value.code


def test_add_list_ask_remove(monkeypatch, capsys, tiny_qwen_dir):
    bad = DATA / "pdfs" / "bad" / "password-example.pdf"
    code = run_main(monkeypatch, "add", str(QA_PDFS[0]), str(QA_PDFS[3]), str(bad))
    out, err = capsys.readouterr()
    assert code == 1  # one file failed...
    assert "password-example.pdf" in err and "password" in err.lower()
    assert f"{QA_PDFS[0].name}: added" in out and f"{QA_PDFS[3].name}: added" in out  # ...the rest went in

    assert run_main(monkeypatch, "add", str(QA_PDFS[0])) == 0
    assert "same content" in capsys.readouterr().out

    assert run_main(monkeypatch, "list") == 0
    out = capsys.readouterr().out
    assert QA_PDFS[0].name in out and QA_PDFS[3].name in out and "version" in out

    code = run_main(monkeypatch, "ask", "How long is the Rhine?", "--model", str(tiny_qwen_dir), "--max-new-tokens", "8")
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "Sources:" in out and "(similarity " in out and f"{QA_PDFS[3].name}, p. 1" in out
    assert "Evidence:" in out

    assert run_main(monkeypatch, "remove", QA_PDFS[3].name) == 0
    assert f"Removed {QA_PDFS[3].name}" in capsys.readouterr().out
    assert run_main(monkeypatch, "list") == 0
    out = capsys.readouterr().out
    assert QA_PDFS[0].name in out and QA_PDFS[3].name not in out


def test_errors_are_one_line_exit_1(monkeypatch, capsys):
    assert run_main(monkeypatch, "ask", "anything") == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "python main.py add FILE.pdf" in err[0]

    assert run_main(monkeypatch, "remove", "nothing.pdf") == 1
    assert len(capsys.readouterr().err.strip().splitlines()) == 1

    assert run_main(monkeypatch, "ask", "   ") == 1  # checked before the store or any model
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "question is empty" in err[0]

    txt = Path("notes.pdf")
    txt.write_text("just text, not a PDF")
    assert run_main(monkeypatch, "add", str(txt)) == 1
    err = capsys.readouterr().err
    assert "notes.pdf" in err and "PDF" in err
    assert not (config.storage_dir() / config.INDEX_FILENAME).exists()  # nothing was written


def test_a_folder_adds_the_pdfs_directly_inside_it(monkeypatch, capsys, tmp_path):
    import shutil

    docs, empty = tmp_path / "docs", tmp_path / "empty"
    (docs / "sub").mkdir(parents=True)
    empty.mkdir()
    for pdf in QA_PDFS[:2]:
        shutil.copy(pdf, docs / pdf.name)
    shutil.copy(QA_PDFS[2], docs / "sub" / QA_PDFS[2].name)  # not searched
    (docs / "notes.txt").write_text("not a PDF")  # not picked up
    assert run_main(monkeypatch, "add", str(docs), str(empty)) == 1  # the empty folder is an error...
    out, err = capsys.readouterr()
    assert f"{QA_PDFS[0].name}: added" in out and f"{QA_PDFS[1].name}: added" in out  # ...the rest went in
    assert QA_PDFS[2].name not in out and "notes.txt" not in out + err
    assert f"{empty}: a folder with no PDF files directly inside it\n" in err


def test_help_for_every_subcommand(monkeypatch, capsys):
    for sub in ("add", "list", "remove", "ask"):
        assert run_main(monkeypatch, sub, "--help") == 0
        assert "usage" in capsys.readouterr().out


def test_list_and_remove_load_no_model(monkeypatch):
    """`list` and `remove` must stay fast: no torch, transformers or streamlit import."""
    from memchat.knowledge import KnowledgeBase
    from tests.fakes import FakeEmbedder

    KnowledgeBase(embedder=FakeEmbedder()).add_documents(QA_PDFS[:2])
    probe = (
        "import runpy, sys; sys.path.insert(0, %r); sys.argv=['main.py'] + sys.argv[1:];\n"
        "try:\n runpy.run_path(%r, run_name='__main__')\n"
        "except SystemExit as e:\n"
        " heavy = [m for m in ('torch', 'transformers', 'streamlit', 'sentence_transformers') if m in sys.modules]\n"
        " print('HEAVY', heavy); sys.exit(e.code)\n" % (str(REPO), str(REPO / "main.py"))
    )
    for argv in (["list"], ["remove", QA_PDFS[0].name]):
        t0 = time.perf_counter()
        r = subprocess.run([sys.executable, "-c", probe, *argv], capture_output=True, text=True)
        elapsed = time.perf_counter() - t0
        assert r.returncode == 0, r.stderr
        assert "HEAVY []" in r.stdout, r.stdout
        print(f"{argv[0]}: {elapsed:.2f} s")  # shown with -s; not a pass/fail threshold
