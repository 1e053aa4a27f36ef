"""A real browser drives the running RAG app: log in, upload a PDF, ask, see an answer with a citation.

Headless Debian Chromium via Playwright, against `streamlit run main.py` on a
loopback port with an app password set (MEMCHAT_APP_PASSWORD): a wrong password
sees nothing of the app; the right one gets in. The generation model is a tiny
random Qwen2 (MEMCHAT_LLM), so the test checks the whole flow (login -> upload ->
encrypted store -> retrieval -> streamed answer -> citation), not the model's wisdom.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PDF = REPO.parent / "shared" / "data" / "qa_dev" / "pdfs"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
PASSWORD = "browser-test password 7f3a"

pytestmark = [pytest.mark.browser, pytest.mark.slow]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def app_server(tmp_path, tiny_qwen_dir):
    if not os.path.exists(CHROMIUM):
        pytest.fail("Debian chromium is not installed: run `make test`, which installs it")
    port = _free_port()
    env = dict(os.environ, MEMCHAT_LLM=str(tiny_qwen_dir), HF_HUB_OFFLINE="1", MEMCHAT_APP_PASSWORD=PASSWORD)
    log = open(tmp_path / "streamlit.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", str(REPO / "main.py"), "--server.headless", "true",
         "--server.port", str(port), "--server.address", "127.0.0.1", "--browser.gatherUsageStats", "false"],
        cwd=os.getcwd(), env=env, stdout=log, stderr=subprocess.STDOUT,
    )
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.5)
    yield f"http://127.0.0.1:{port}", tmp_path / "streamlit.log"
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


def _log_in(page, password: str) -> None:
    from playwright.sync_api import expect

    box = page.get_by_label("Password", exact=True)
    expect(box).to_be_visible(timeout=90_000)
    box.fill(password)
    page.get_by_role("button", name="Log in").click()


def test_login_upload_ask_and_see_citation(app_server):
    from playwright.sync_api import expect, sync_playwright

    url, log = app_server
    pdf = sorted(PDF.glob("*.pdf"))[0]
    with sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=CHROMIUM,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                  "--disable-sync", "--no-first-run"],
        )
        page = browser.new_page()
        try:
            # a wrong password: an error, and nothing of the app (no documents, no uploader, no chat)
            page.goto(url, timeout=60_000)
            _log_in(page, "not the password at all")
            expect(page.get_by_text("Wrong password.")).to_be_visible(timeout=60_000)
            assert page.get_by_text("Add PDFs in the sidebar").count() == 0
            assert page.locator("input[type=file]").count() == 0
            assert page.get_by_placeholder("Ask a question about your documents").count() == 0
            # a fresh browser (no session) sees only the login form too
            other = browser.new_page()
            other.goto(url, timeout=60_000)
            expect(other.get_by_label("Password", exact=True)).to_be_visible(timeout=90_000)
            assert other.get_by_text("Add PDFs in the sidebar").count() == 0
            other.close()

            _log_in(page, PASSWORD)
            expect(page.get_by_text("Add PDFs in the sidebar")).to_be_visible(timeout=90_000)
            page.locator("input[type=file]").set_input_files(str(pdf))
            page.get_by_role("button", name="Add to knowledge base").click()
            expect(page.get_by_text(f"{pdf.name}: added")).to_be_visible(timeout=180_000)
            box = page.get_by_placeholder("Ask a question about your documents")
            expect(box).to_be_visible(timeout=120_000)
            box.fill("What is this document about?")
            box.press("Enter")
            # the answer carries a citation "(file, p. N)" and the sources line
            expect(page.get_by_text("Sources:")).to_be_visible(timeout=180_000)
            expect(page.get_by_text(f"{pdf.name}, p. 1").first).to_be_visible()
            page.screenshot(path=str(log.parent / "answer.png"), full_page=True)
        except Exception:
            page.screenshot(path=str(log.parent / "failure.png"), full_page=True)
            print(log.read_text()[-5000:])
            raise
        finally:
            browser.close()
