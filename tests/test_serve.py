"""`main.py serve`: the OpenAI-compatible API, driven by the official `openai` client.

Every test starts a real uvicorn server on a free loopback port in a thread, over a
tiny random Qwen2 (RAG, hybrid and the base model) and a tiny DialoGPT-like GPT-2
copied into finetuned_model/, with the deterministic FakeEmbedder.
"""

from __future__ import annotations

import shutil
import socket
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import openai
import pytest

from memchat import config
from memchat.config import GenerationConfig, ServeConfig
from memchat.generation import Generator, GenerationResult, GenerationStats
from memchat.knowledge import KnowledgeBase
from memchat.serve import (
    FINETUNED_MODEL, HYBRID_MODEL, RAG_MODEL, MemChatService, check_bind, create_app, parse_chat_request,
)
from memchat.errors import MemChatError
from tests.fakes import FakeEmbedder

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
QA_PDFS = sorted((DATA / "qa_dev" / "pdfs").glob("*.pdf"))
BAD_PDF = DATA / "pdfs" / "bad" / "password-example.pdf"
KEY = "test-key-0123456789"
BASE = "tiny-qwen"


class ServerThread:
    """uvicorn serving ``app`` on a free 127.0.0.1 port in a thread; ``url`` is its /v1 base."""

    def __init__(self, app):
        import uvicorn

        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}/v1"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off", timeout_graceful_shutdown=2))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "server did not start"
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.sock.close()


@contextmanager
def running_server(app):
    """A ServerThread for the duration; yields its /v1 base URL."""
    server = ServerThread(app)
    try:
        yield server.url
    finally:
        server.stop()


def make_service(tiny_qwen_dir, *, pdfs=QA_PDFS[3:4], generator=None, finetuned=None, **serve) -> MemChatService:
    kb = KnowledgeBase(embedder=FakeEmbedder())
    if pdfs:
        assert all(r.status == "added" for r in kb.add_documents(list(pdfs)))
    return MemChatService(kb, generator=generator or Generator(str(tiny_qwen_dir)),
                          generation=GenerationConfig(model_name=str(tiny_qwen_dir), max_new_tokens=6),
                          serve=ServeConfig(**serve), base_model_name=BASE, finetuned_generator=finetuned)


def client(url: str, key: str = KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=url, api_key=key, max_retries=0, timeout=60)


def install_finetuned(source: Path) -> Path:
    target = config.finetuned_dir()
    shutil.copytree(source, target)
    return target


ASK = [{"role": "user", "content": "How long is the Rhine?"}]


@pytest.fixture
def api(tiny_qwen_dir, tiny_gpt2_dir, torch_single_thread):
    install_finetuned(tiny_gpt2_dir)
    service = make_service(tiny_qwen_dir)
    with running_server(create_app(service, api_key=KEY)) as url:
        yield service, client(url)
    service.close()


def extra(obj, name):
    return (obj.model_extra or {}).get(name)


# ---------------------------------------------------------------------------
# Models and chat
# ---------------------------------------------------------------------------
def test_models_list(api, tiny_qwen_dir):
    service, c = api
    ids = [m.id for m in c.models.list()]
    assert ids == [BASE, RAG_MODEL, HYBRID_MODEL, FINETUNED_MODEL]
    shutil.rmtree(config.finetuned_dir())  # not trained (any more): not listed
    assert FINETUNED_MODEL not in [m.id for m in c.models.list()]


@pytest.mark.parametrize("model", [RAG_MODEL, HYBRID_MODEL, FINETUNED_MODEL, BASE])
def test_chat_streamed_and_not_for_each_model(api, model):
    service, c = api
    response = c.chat.completions.create(model=model, messages=ASK, max_tokens=6)
    assert response.object == "chat.completion" and response.model == model
    text = response.choices[0].message.content
    assert isinstance(text, str) and response.choices[0].message.role == "assistant"
    citations = extra(response, "citations")
    assert isinstance(citations, list)
    if model in (RAG_MODEL, HYBRID_MODEL):  # grounded answers cite the Rhine page
        assert citations and citations[0]["document"] == QA_PDFS[3].name
        assert {"index", "document", "page_start", "page_end", "citation", "passage", "score"} <= set(citations[0])
        assert citations[0]["citation"] == f"{QA_PDFS[3].name}, p. 1" and "Rhine" in citations[0]["passage"]
        assert extra(response, "memchat")["evidence"]
    else:
        assert citations == []

    chunks = list(c.chat.completions.create(model=model, messages=ASK, max_tokens=6, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(ch.object == "chat.completion.chunk" and ch.id == chunks[0].id for ch in chunks)
    streamed = "".join(ch.choices[0].delta.content or "" for ch in chunks)
    last = chunks[-1]
    # greedy: the same answer both ways (a draft the pipeline replaced comes with the final text)
    assert streamed == text or extra(last, "memchat").get("text") == text
    assert last.choices[0].finish_reason == "stop"
    assert extra(last, "citations") == citations
    assert all(extra(ch, "citations") is None for ch in chunks[:-1])  # only the final chunk carries them


def test_base_model_honours_generation_settings(api, tiny_qwen_dir):
    service, c = api
    messages = [{"role": "user", "content": "The capital of France is"}]
    response = c.chat.completions.create(model=BASE, messages=messages, max_tokens=5, temperature=0)
    expected = Generator(str(tiny_qwen_dir)).generate([messages], max_new_tokens=5)[0]
    assert response.choices[0].message.content == expected.text
    assert response.usage.completion_tokens == expected.new_tokens and response.usage.prompt_tokens == expected.prompt_tokens


# ---------------------------------------------------------------------------
# Documents
# ---------------------------------------------------------------------------
def upload(c: openai.OpenAI, *files: tuple[str, bytes]):
    return c.post("/documents", cast_to=object, body={},
                  files=[("file", (name, data, "application/pdf")) for name, data in files],
                  options={"headers": {"Content-Type": "multipart/form-data"}})


def test_documents_add_list_remove(api):
    service, c = api
    listed = c.get("/documents", cast_to=object)["data"]
    assert [d["id"] for d in listed] == [QA_PDFS[3].name]

    added = upload(c, (QA_PDFS[0].name, QA_PDFS[0].read_bytes()))["data"]
    assert added[0]["name"] == QA_PDFS[0].name and added[0]["status"] == "added" and added[0]["chunks"] > 0
    assert upload(c, (QA_PDFS[0].name, QA_PDFS[0].read_bytes()))["data"][0]["status"] == "unchanged"
    listed = c.get("/documents", cast_to=object)["data"]
    assert sorted(d["name"] for d in listed) == sorted([QA_PDFS[0].name, QA_PDFS[3].name])
    assert {d["name"]: d for d in listed}[QA_PDFS[0].name]["version"] == 1

    r = c.chat.completions.create(model=RAG_MODEL, messages=[{"role": "user", "content": "What is geology?"}])
    assert any(x["document"] == QA_PDFS[0].name for x in extra(r, "citations"))  # the new document is searched

    removed = c.delete(f"/documents/{QA_PDFS[0].name}", cast_to=object)
    assert removed == {"id": QA_PDFS[0].name, "object": "document", "deleted": True, "version": 1,
                       "chunks": added[0]["chunks"]}
    assert [d["name"] for d in c.get("/documents", cast_to=object)["data"]] == [QA_PDFS[3].name]
    with pytest.raises(openai.NotFoundError) as exc:
        c.delete(f"/documents/{QA_PDFS[0].name}", cast_to=object)
    assert exc.value.body["code"] == "document_not_found"


# ---------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------
def store_files(home: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in (home / config.STORAGE_DIRNAME).iterdir() if p.is_file()}


def test_wrong_key_is_401_on_every_route(api):
    service, c = api
    bad = openai.OpenAI(base_url=str(c.base_url), api_key="wrong-key", max_retries=0)
    calls = [lambda: bad.models.list(), lambda: bad.chat.completions.create(model=RAG_MODEL, messages=ASK),
             lambda: bad.get("/documents", cast_to=object), lambda: bad.delete(f"/documents/{QA_PDFS[3].name}", cast_to=object),
             lambda: upload(bad, ("x.pdf", QA_PDFS[0].read_bytes()))]
    for call in calls:
        with pytest.raises(openai.AuthenticationError) as exc:
            call()
        assert exc.value.status_code == 401
        assert exc.value.body["code"] == "invalid_api_key"
        assert exc.value.body["type"] == "invalid_request_error" and exc.value.body["message"]
    assert [d["name"] for d in service.documents()] == [QA_PDFS[3].name]  # the DELETE did nothing


def test_missing_key_is_401(api):
    """The openai client will not even send a request without a key, so plain HTTP here."""
    import json
    import urllib.error
    import urllib.request

    service, c = api
    base = str(c.base_url).rstrip("/")
    for method, path, body in (("GET", "/models", None), ("POST", "/chat/completions", {"model": RAG_MODEL, "messages": ASK}),
                               ("GET", "/documents", None), ("DELETE", f"/documents/{QA_PDFS[3].name}", None)):
        data = json.dumps(body).encode() if body else None
        request = urllib.request.Request(base + path, data=data, method=method, headers={"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as exc:
            urllib.request.build_opener(urllib.request.ProxyHandler({})).open(request, timeout=30)
        assert exc.value.code == 401 and exc.value.headers["WWW-Authenticate"] == "Bearer"
        assert json.loads(exc.value.read())["error"]["code"] == "missing_api_key"
    assert [d["name"] for d in service.documents()] == [QA_PDFS[3].name]


def test_bad_requests_are_openai_errors_and_change_nothing(api, isolated_home):
    service, c = api
    before = store_files(isolated_home)
    with pytest.raises(openai.NotFoundError) as exc:
        c.chat.completions.create(model="gpt-4o", messages=ASK)
    assert exc.value.body["code"] == "model_not_found" and exc.value.body["param"] == "model"
    with pytest.raises(openai.BadRequestError) as exc:
        c.chat.completions.create(model=RAG_MODEL, messages=[])
    assert exc.value.body["code"] == "invalid_messages"
    with pytest.raises(openai.BadRequestError):
        c.chat.completions.create(model=RAG_MODEL, messages=[{"role": "system", "content": "no question"}])
    with pytest.raises(openai.BadRequestError) as exc:  # a blank question asks nothing
        c.chat.completions.create(model=RAG_MODEL, messages=[{"role": "user", "content": "  \n"}])
    assert "empty" in exc.value.body["message"]
    with pytest.raises(openai.BadRequestError):
        c.chat.completions.create(model=BASE, messages=ASK, max_tokens=-3)

    with pytest.raises(openai.BadRequestError) as exc:  # not a PDF / a broken PDF
        upload(c, ("notes.pdf", b"this is not a pdf"))
    assert exc.value.body["code"] == "bad_document" and "notes.pdf" in exc.value.body["message"]
    with pytest.raises(openai.BadRequestError) as exc:
        upload(c, (BAD_PDF.name, BAD_PDF.read_bytes()))
    assert exc.value.response.json()["data"][0]["status"] == "error"  # which files went in, per file
    assert store_files(isolated_home) == before  # byte for byte: nothing half-written

    service.cfg.max_upload_bytes = 10_000
    with pytest.raises(openai.APIStatusError) as exc:
        upload(c, (QA_PDFS[0].name, QA_PDFS[0].read_bytes()))
    assert exc.value.status_code == 413 and exc.value.body["code"] == "request_too_large"
    assert store_files(isolated_home) == before
    assert [d["name"] for d in c.get("/documents", cast_to=object)["data"]] == [QA_PDFS[3].name]


def test_missing_store_and_untrained_model(tiny_qwen_dir, torch_single_thread):
    service = make_service(tiny_qwen_dir, pdfs=[])  # no store, no finetuned_model/
    with running_server(create_app(service, api_key=KEY)) as url:
        c = client(url)
        assert c.get("/documents", cast_to=object)["data"] == []
        with pytest.raises(openai.ConflictError) as exc:
            c.chat.completions.create(model=RAG_MODEL, messages=ASK)
        assert exc.value.body["code"] == "no_knowledge_base" and "POST /v1/documents" in exc.value.body["message"]
        with pytest.raises(openai.ConflictError):
            c.chat.completions.create(model=RAG_MODEL, messages=ASK, stream=True)
        for model in (FINETUNED_MODEL, HYBRID_MODEL):
            with pytest.raises(openai.ConflictError) as exc:
                c.chat.completions.create(model=model, messages=ASK)
            assert exc.value.body["code"] == "model_not_trained" and "train_conversational.py" in exc.value.body["message"]
        with pytest.raises(openai.NotFoundError):
            c.delete("/documents/none.pdf", cast_to=object)
    service.close()


def test_start_refuses_unsafe_settings():
    with pytest.raises(MemChatError, match="MEMCHAT_API_KEY"):
        check_bind("127.0.0.1", no_auth=False, api_key=None)
    with pytest.raises(MemChatError, match="loopback only"):
        check_bind("0.0.0.0", no_auth=True, api_key=None)
    assert check_bind("::1", no_auth=True, api_key=None) is None
    assert check_bind("0.0.0.0", no_auth=False, api_key="k") == "k"


def test_no_auth_on_loopback(tiny_qwen_dir, torch_single_thread):
    service = make_service(tiny_qwen_dir, pdfs=[])
    with running_server(create_app(service, api_key=None)) as url:
        assert BASE in [m.id for m in client(url, key="anything").models.list()]
    service.close()


# ---------------------------------------------------------------------------
# Concurrency
# ---------------------------------------------------------------------------
def test_concurrent_requests_complete_and_share_one_batch(tiny_qwen_dir, torch_single_thread):
    # A long window: the batch closes when both requests are in, so this cannot flake on timing.
    service = make_service(tiny_qwen_dir, max_batch=2, batch_window_ms=20_000)
    service.base.pending = lambda: 2  # "another request is on its way": the batch waits for it
    prompts = [[{"role": "user", "content": "How long is the Rhine?"}],
               [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Where does the Rhine flow?"}]]
    direct = Generator(str(tiny_qwen_dir))
    expected = [direct.generate([p], max_new_tokens=6)[0].text for p in prompts]  # one at a time, in-process
    with running_server(create_app(service, api_key=KEY)) as url:
        c = client(url)
        out: dict[int, str] = {}

        def ask(i: int) -> None:
            r = c.chat.completions.create(model=BASE, messages=prompts[i], max_tokens=6)
            out[i] = r.choices[0].message.content

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert sorted(out) == [0, 1]
        assert service.base.batches == [2]  # one generate call for both
        assert [out[0], out[1]] == expected  # batching did not change the greedy answers
        # a RAG question and a document listing are served meanwhile too
        assert c.get("/documents", cast_to=object)["data"]
    service.close()


def test_a_lone_request_does_not_wait_for_companions(tiny_qwen_dir, torch_single_thread):
    service = make_service(tiny_qwen_dir, pdfs=[], max_batch=8, batch_window_ms=20_000)
    t = time.perf_counter()
    service.reply(parse_chat_request({"model": BASE, "messages": ASK, "max_tokens": 2}))
    assert time.perf_counter() - t < 10  # nothing else in flight: no 20 s window
    assert service.base.batches == [1]
    service.close()


class SlowEngine:
    """A countable engine whose stream never ends by itself (a piece every 10 ms)."""

    def __init__(self):
        from memchat.models import ResolvedModel

        self.resolved = ResolvedModel(requested="slow", path="slow", source="local")
        self.notice = None
        self.stats = GenerationStats()
        self.pieces = 0
        self.closed = threading.Event()

    def stream(self, messages, **kwargs):
        try:
            while True:
                time.sleep(0.01)
                self.pieces += 1
                yield "tok "
        finally:
            self.closed.set()

    def generate(self, batch, **kwargs):
        return [GenerationResult(text=f"answer {len(m)}", prompt_tokens=1, new_tokens=2, finish_reason="eos")
                for m in batch]


def test_client_disconnect_mid_stream_stops_generation(tiny_qwen_dir):
    engine = SlowEngine()
    service = make_service(tiny_qwen_dir, pdfs=[], generator=engine)
    with running_server(create_app(service, api_key=KEY)) as url:
        c = client(url)
        stream = c.chat.completions.create(model=BASE, messages=ASK, stream=True)
        received = 0
        for chunk in stream:
            received += bool(chunk.choices and chunk.choices[0].delta.content)
            if received == 3:
                break
        stream.close()  # hang up mid-answer
        assert engine.closed.wait(10), "the generation went on after the client left"
        stopped_at = engine.pieces
        time.sleep(0.2)
        assert engine.pieces == stopped_at  # nothing more is generated
        deadline = time.monotonic() + 5
        while service.cancelled_streams < 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert service.cancelled_streams == 1
        # ...and the server still answers, streamed and not
        assert c.chat.completions.create(model=BASE, messages=ASK).choices[0].message.content == "answer 1"
        assert BASE in [m.id for m in c.models.list()]
    service.close()
