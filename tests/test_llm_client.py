"""The external-engine path: ``LLMServerClient`` against Mem_Chat's own server as the engine.

The server (``memchat.serve`` in a thread, on a free loopback port) serves a tiny
random Qwen2 or the scripted QA fake as its base model; RAG answers, scores and the
extractor call it through ``--llm-server`` / ``LLMServerClient`` and must come out
as they do in-process.
"""

from __future__ import annotations

import json
import runpy
import socket
import sys
from pathlib import Path

import pytest

from memchat import config
from memchat.config import ExtractConfig, GenerationConfig, LLMServerConfig, ServeConfig
from memchat.errors import LLMServerError
from memchat.extraction import PROGRESS_FILENAME, FAISSDataExtractor
from memchat.generation import Generator
from memchat.knowledge import KnowledgeBase
from memchat.llm_client import LLMServerClient, base_url
from memchat.rag import RAGPipeline
from memchat.serve import MemChatService, create_app
from tests.fakes import FakeEmbedder
from tests.qa_fakes import ScriptedGenerator
from tests.test_serve import KEY, QA_PDFS, ServerThread, running_server

REPO = Path(__file__).resolve().parents[1]
CONVERSATIONS = [
    [{"role": "user", "content": "The capital of France is"}],
    [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "What does a retriever find?"}],
    [{"role": "user", "content": "Encryption keeps private files safe"}],
]
FAST_FAIL = LLMServerConfig(retries=0, timeout_s=30)


def service_for(engine, name: str, kb=None, **serve) -> MemChatService:
    return MemChatService(kb or KnowledgeBase(embedder=FakeEmbedder()), generator=engine, base_model_name=name,
                          generation=GenerationConfig(model_name=name), serve=ServeConfig(**serve))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_base_url_forms():
    assert base_url("http://127.0.0.1:8000") == "http://127.0.0.1:8000/v1"
    assert base_url("http://localhost:11434/v1/") == "http://localhost:11434/v1"
    with pytest.raises(LLMServerError, match="http"):
        base_url("127.0.0.1:8000")


def test_generate_stream_and_scores_match_in_process(tiny_qwen_dir, torch_single_thread):
    local = Generator(str(tiny_qwen_dir))
    service = service_for(Generator(str(tiny_qwen_dir)), "tiny", max_batch=3, batch_window_ms=10_000)
    service.base.pending = lambda: 3  # the batch waits (up to 10 s) until all three requests are in
    with running_server(create_app(service, api_key=KEY)) as url:
        remote = LLMServerClient(url, api_key=KEY, config=FAST_FAIL)
        assert remote.model == "tiny" and remote.resolved.model_id == "tiny" and remote.notice is None

        got = remote.generate(CONVERSATIONS, max_new_tokens=8)
        want = local.generate(CONVERSATIONS, max_new_tokens=8)
        assert [r.text for r in got] == [r.text for r in want]
        assert [(r.prompt_tokens, r.new_tokens) for r in got] == [(r.prompt_tokens, r.new_tokens) for r in want]
        assert service.base.batches == [3]  # sent concurrently: the server batched all three
        assert remote.stats.prompts == 3 and remote.stats.new_tokens == sum(r.new_tokens for r in want)
        service.base.pending = lambda: 1  # single requests from here on

        stop = want[0].text[2:4]
        assert remote.generate(CONVERSATIONS[:1], max_new_tokens=8, stop=[stop])[0].text == \
            local.generate(CONVERSATIONS[:1], max_new_tokens=8, stop=[stop])[0].text
        assert "".join(remote.stream(CONVERSATIONS[1], max_new_tokens=8)) == want[1].text

        pairs = [(CONVERSATIONS[0], " Paris"), (CONVERSATIONS[0], " Rome"), (CONVERSATIONS[1], "chunks"),
                 (CONVERSATIONS[2], "")]
        assert remote.loglikelihoods(pairs) == pytest.approx(local.loglikelihoods(pairs), abs=1e-3)
        assert remote.notice is None  # the server gave the log-probabilities itself
    service.close()


def test_scores_fall_back_in_process_with_a_notice(tiny_qwen_dir, torch_single_thread, caplog):
    local = Generator(str(tiny_qwen_dir))
    service = service_for(ScriptedGenerator(), "scripted")  # an engine without prompt log-probabilities
    with running_server(create_app(service, api_key=KEY)) as url:
        remote = LLMServerClient(url, api_key=KEY, config=FAST_FAIL, fallback=local)
        pairs = [(CONVERSATIONS[0], " Paris"), (CONVERSATIONS[0], " Rome")]
        assert remote.loglikelihoods(pairs) == local.loglikelihoods(pairs)
        assert remote.notice and "no prompt log-probabilities" in remote.notice
        assert "in-process" in caplog.text
    service.close()


def test_rag_through_the_server_answers_as_in_process(tiny_qwen_dir, torch_single_thread, monkeypatch):
    monkeypatch.setenv("MEMCHAT_ANSWER_MODE", "generative")  # both paths write with the model (auto would differ)
    kb = KnowledgeBase(embedder=FakeEmbedder())
    kb.add_documents([QA_PDFS[3]])
    gen_cfg = GenerationConfig(model_name=str(tiny_qwen_dir), max_new_tokens=8)
    local = RAGPipeline(kb, Generator(str(tiny_qwen_dir)), generation=gen_cfg)
    service = service_for(Generator(str(tiny_qwen_dir)), "tiny")
    with running_server(create_app(service, api_key=KEY)) as url:
        rag = RAGPipeline(kb, LLMServerClient(url, api_key=KEY, config=FAST_FAIL), generation=gen_cfg)
        for question in ("How long is the Rhine?", "Where does the Rhine begin?"):
            want, got = local.answer(question), rag.answer(question)
            assert got.text == want.text and got.citations == want.citations
            pieces, answer = rag.stream(question)
            "".join(pieces)  # the draft as it streams; the Answer holds what to show once they are exhausted
            assert answer.text == want.text
        # the server got the generation calls that ran in-process, twice (answer, then stream)
        assert rag.generator.stats.prompts == 2 * local.generator.stats.prompts > 0
    service.close()


def test_ask_with_llm_server_flag(tiny_qwen_dir, monkeypatch, capsys, torch_single_thread):
    """`main.py ask --llm-server URL` prints what `main.py ask` prints in-process."""
    monkeypatch.setenv("MEMCHAT_ANSWER_MODE", "generative")  # both paths write with the model (auto would differ)

    def run_main(*argv) -> tuple[int, str, str]:
        monkeypatch.setattr(sys, "argv", ["main.py", *argv])
        with pytest.raises(SystemExit) as exc:
            runpy.run_path(str(REPO / "main.py"), run_name="__main__")
        out, err = capsys.readouterr()
        return exc.value.code, out, err

    assert run_main("add", str(QA_PDFS[3]))[0] == 0
    question = ["ask", "How long is the Rhine?", "--model", str(tiny_qwen_dir), "--max-new-tokens", "8"]
    code, local_out, err = run_main(*question)
    assert code == 0, err
    service = service_for(Generator(str(tiny_qwen_dir)), "tiny")
    server = ServerThread(create_app(service, api_key=None))
    try:
        code, remote_out, err = run_main(*question, "--llm-server", server.url)
        assert code == 0, err
        assert remote_out == local_out and "Sources:" in remote_out
    finally:
        server.stop()
        service.close()
    code, _, err = run_main(*question, "--llm-server", server.url)  # the server is gone
    lines = err.strip().splitlines()
    assert code == 1 and len(lines) == 1 and "Cannot reach the LLM server" in lines[0]


# ---------------------------------------------------------------------------
# The extractor on an external engine
# ---------------------------------------------------------------------------
def make_kb():
    kb = KnowledgeBase(embedder=FakeEmbedder())
    assert all(r.status == "added" for r in kb.add_documents(QA_PDFS[:2]))
    return kb


def run_extractor(kb, generator, out: Path, **kw) -> dict:
    ex = FAISSDataExtractor(kb, generator, embedder=kb._embedder, output_dir=out, progress=False,
                            extract_config=ExtractConfig(batch_size=3), **kw)
    path = ex.create_training_dataset()
    return json.loads(Path(path).read_text(encoding="utf-8"))


def test_extractor_records_through_the_server_match_in_process(tmp_path):
    kb = make_kb()
    want = run_extractor(kb, ScriptedGenerator(), tmp_path / "local")
    engine = ScriptedGenerator()
    service = service_for(engine, "tests/scripted-model", max_batch=16, batch_window_ms=100)
    service.base.pending = lambda: 16  # the fake answers instantly: give concurrent requests time to meet
    with running_server(create_app(service, api_key=KEY)) as url:
        remote = LLMServerClient(url, api_key=KEY, config=FAST_FAIL)
        got = run_extractor(kb, remote, tmp_path / "remote")
    assert got["records"] == want["records"] and got["records"]
    assert got["generator_model"] == want["generator_model"] == "tests/scripted-model"
    assert max(service.base.batches) > 1  # the extractor's requests were in flight together
    assert len(engine.prompts) == remote.stats.prompts
    service.close()


def test_server_down_mid_extraction_keeps_the_resume_log(tmp_path):
    kb = make_kb()
    want = run_extractor(kb, ScriptedGenerator(), tmp_path / "local")
    out = tmp_path / "remote"
    service = service_for(ScriptedGenerator(), "tests/scripted-model")
    server = ServerThread(create_app(service, api_key=KEY))
    remote = LLMServerClient(server.url, api_key=KEY, config=FAST_FAIL)
    with pytest.raises(LLMServerError, match="Cannot reach the LLM server"):
        run_extractor(kb, remote, out, on_group_done=lambda number, results: server.stop())
    progress = out / PROGRESS_FILENAME
    lines = progress.read_bytes().splitlines()
    assert len(lines) == 3  # the first group of 3 chunks, whole
    assert not (out / config.DATASET_FILENAME).exists()

    server = ServerThread(create_app(service, api_key=KEY))  # back up (on another port)
    try:
        remote = LLMServerClient(server.url, api_key=KEY, config=FAST_FAIL)
        got = run_extractor(kb, remote, out)
    finally:
        server.stop()
        service.close()
    assert progress.read_bytes().splitlines()[:3] == lines  # resumed after them, not redone
    assert got["records"] == want["records"]


def test_extract_script_with_the_server_down_says_one_line(monkeypatch, capsys):
    out = config.training_dir()
    out.mkdir(parents=True)
    progress = out / PROGRESS_FILENAME
    progress.write_text('{"hash": "abc", "key": "k", "result": {}}\n', encoding="utf-8")
    before = progress.read_bytes()
    monkeypatch.setattr(sys, "argv", ["extract_faiss_data.py", "--llm-server", f"http://127.0.0.1:{free_port()}/v1"])
    with pytest.raises(SystemExit) as exc:
        runpy.run_path(str(REPO / "extract_faiss_data.py"), run_name="__main__")
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 1 and len(err) == 1
    assert err[0].startswith("error: Cannot reach the LLM server at http://127.0.0.1:") and "--llm-server" in err[0]
    assert progress.read_bytes() == before
