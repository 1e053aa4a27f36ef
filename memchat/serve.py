"""Mem_Chat's OpenAI-compatible HTTP API (``python main.py serve``), on FastAPI + uvicorn.

Routes (every one needs ``Authorization: Bearer $MEMCHAT_API_KEY`` unless the server
was started on loopback with ``--no-auth``):

  GET    /v1/models             ``memchat-rag``, ``memchat-hybrid``, ``memchat-finetuned``
                                (only while finetuned_model/ holds a model) and the base
                                instruct model under its own name: plain chat, no
                                retrieval, so other tools (and ``--llm-server``) can use
                                this server as their generation engine.
  POST   /v1/chat/completions   OpenAI's request and response; ``stream: true`` sends
                                server-sent events in OpenAI's chunk format, then
                                ``data: [DONE]``. The memchat-* models answer the LAST
                                user message (earlier turns are not retrieved on).
  GET    /v1/documents          the knowledge base's documents
  POST   /v1/documents          multipart upload, one or more ``file`` parts (PDF)
  DELETE /v1/documents/{name}   remove a document and its chunks

Fields beyond OpenAI's, on the response object and on the LAST stream chunk (the one
whose ``finish_reason`` is set):

  citations  [{"index", "document", "page_start", "page_end", "citation", "passage",
             "score"}] the chunks the answer was made from, best first ("passage" is
             the chunk's text); [] for memchat-finetuned and the base model.
  memchat    {"model", "evidence", "abstained", "mode", "status", "route"}: the engine
             that wrote the answer, the sentence it rests on, and whatever the pipeline
             reports about how it answered (absent keys: not reported). On the last
             stream chunk, "text" is the answer to show when the pipeline replaced the
             streamed draft (a generative answer that failed verification).

Request fields beyond OpenAI's, honoured for the base model (vLLM's names):
``repetition_penalty``, and ``prompt_logprobs`` with ``add_generation_prompt`` /
``continue_final_message`` (the response then carries ``prompt_logprobs``, one entry
per prompt token, as vLLM sends it). ``memchat.llm_client`` scores with them.

Errors are OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``: 400
bad input (no messages, bad JSON, a bad PDF), 401 a wrong or missing key, 404 an
unknown model or document, 409 no knowledge base yet / a model not trained yet,
413 an oversize body, 502 an external engine failing, 503 a locked store.

Concurrency: one model instance per model (``memchat.shared_engine.SharedEngine``). Non-streamed requests
arriving together share one batched ``generate`` call; streams and scoring take the
model in turn. Retrieval, document listing and uploads are not held up by a running
generation. A client that hangs up mid-stream stops its generation at the next token.

Deliberately not here: retrieval and prompting (``rag``, ``hybrid``), the store's
rules (``knowledge``: uploads go through the same ``add_documents`` as the CLI), and
TLS (put a reverse proxy in front to serve beyond this machine).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from starlette.requests import Request  # at module level: FastAPI resolves route annotations here

from . import config
from .config import GenerationConfig, RAGConfig, ServeConfig
from .errors import (
    BadDocumentError,
    LLMServerError,
    MemChatError,
    ModelUnavailableError,
    NoStoreError,
    StoreError,
    WrongKeyError,
)
from .shared_engine import SharedEngine

log = logging.getLogger(__name__)

RAG_MODEL = "memchat-rag"
HYBRID_MODEL = "memchat-hybrid"
FINETUNED_MODEL = "memchat-finetuned"


# ---------------------------------------------------------------------------
# Errors in OpenAI's shape
# ---------------------------------------------------------------------------
class APIError(Exception):
    """An error answered as ``{"error": {...}}`` with ``status``."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None, extra: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type, code, param
        self.extra = extra or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code},
                **self.extra}


def api_error_for(exc: MemChatError) -> APIError:
    """The HTTP answer for a library error."""
    if isinstance(exc, BadDocumentError):
        return APIError(400, str(exc), code="bad_document")
    if isinstance(exc, NoStoreError):
        return APIError(409, f"{exc} (over the API: POST /v1/documents with a PDF)", code="no_knowledge_base")
    if isinstance(exc, WrongKeyError):
        return APIError(500, str(exc), type="server_error", code="wrong_store_key")
    if isinstance(exc, StoreError):
        return APIError(503, str(exc), type="server_error", code="store_unavailable")
    if isinstance(exc, LLMServerError):
        return APIError(502, str(exc), type="server_error", code="llm_server_error")
    if isinstance(exc, ModelUnavailableError):
        return APIError(409, str(exc), code="model_not_available")
    return APIError(400, str(exc), code="memchat_error")


# ---------------------------------------------------------------------------
# What the routes serve
# ---------------------------------------------------------------------------
@dataclass
class Reply:
    """One answer, whichever model wrote it."""

    text: str
    citations: list[dict]
    memchat: dict
    usage: dict | None = None
    finish_reason: str = "stop"
    prompt_logprobs: list | None = None


class MemChatService:
    """The knowledge base and the models behind the API, loaded once.

    ``generator``: the engine for RAG, the hybrid and the base model (an in-process
    ``Generator``, an ``LLMServerClient``, or a test's fake); built from
    ``generation.model_name`` when not given. ``finetuned_generator``: the engine of
    finetuned_model/ (else loaded from the folder on first use).
    """

    def __init__(self, kb=None, *, generator=None, generation: GenerationConfig | None = None,
                 rag: RAGConfig | None = None, serve: ServeConfig | None = None, base_model_name: str | None = None,
                 finetuned_dir: str | Path | None = None, finetuned_generator=None):
        from .knowledge import KnowledgeBase
        from .rag import RAGPipeline

        self.cfg = serve or ServeConfig()
        self.gen_cfg = generation or GenerationConfig()
        self.kb = kb if kb is not None else KnowledgeBase()
        if generator is None:
            from .generation import Generator

            generator = Generator(self.gen_cfg.model_name)
        self.base = self._share(generator)
        self.base_model_name = base_model_name or self.gen_cfg.model_name
        self.rag = RAGPipeline(self.kb, self.base, rag=rag or RAGConfig(), generation=self.gen_cfg)
        self.finetuned_dir = Path(finetuned_dir) if finetuned_dir is not None else config.finetuned_dir()
        self._finetuned_generator = finetuned_generator
        self._finetuned = None
        self._hybrid = None
        self._active = 0  # non-streamed chat requests in progress: the batcher's companions
        self._active_lock = threading.Lock()
        self._load_lock = threading.Lock()
        self._write_lock = threading.Lock()  # uploads and removals one at a time (the store also locks)
        self.cancelled_streams = 0  # streams whose client hung up before the end

    def _share(self, engine) -> SharedEngine:
        return engine if isinstance(engine, SharedEngine) else SharedEngine(
            engine, max_batch=self.cfg.max_batch, window_s=self.cfg.batch_window_ms / 1000,
            gap_s=self.cfg.batch_gap_ms / 1000, pending=lambda: self._active)

    # -- models ----------------------------------------------------------------
    def finetuned_available(self) -> bool:
        return (self.finetuned_dir / "config.json").is_file()

    def model_ids(self) -> list[str]:
        # The base model first: a client that takes "the first model listed" (``--llm-server``
        # without ``--llm-model``) gets plain generation, not RAG answers to its prompts.
        ids = [self.base_model_name, RAG_MODEL, HYBRID_MODEL]
        if self.finetuned_available():
            ids.append(FINETUNED_MODEL)
        return ids

    def finetuned(self):
        """The fine-tuned ChatModel; ModelUnavailableError (with the fix) when there is none."""
        from .finetuned import FineTunedChat, check_model_dir

        with self._load_lock:
            if self._finetuned is None:
                check_model_dir(self.finetuned_dir)  # ModelUnavailableError with the commands that make one
                inner = self._finetuned_generator
                if inner is None:
                    from .generation import Generator

                    inner = Generator(str(self.finetuned_dir))
                self._finetuned = FineTunedChat(self.finetuned_dir, generator=self._share(inner), load=False)
            return self._finetuned

    def hybrid(self):
        from .hybrid import HybridPipeline

        chat = self.finetuned()
        with self._load_lock:
            if self._hybrid is None:
                self._hybrid = HybridPipeline(self.rag, chat)
            return self._hybrid

    def check_model(self, name: str) -> None:
        if name in (RAG_MODEL, self.base_model_name):
            return
        if name in (HYBRID_MODEL, FINETUNED_MODEL):
            try:
                self.finetuned()
            except ModelUnavailableError as exc:
                raise APIError(409, f"{name} needs a fine-tuned model: {exc}", code="model_not_trained",
                               param="model") from None
            return
        raise APIError(404, f"The model '{name}' does not exist; this server serves: {', '.join(self.model_ids())}.",
                       code="model_not_found", param="model")

    # -- answering -------------------------------------------------------------
    def _gen_kwargs(self, req: "ChatRequest") -> dict:
        g = self.gen_cfg
        kw = dict(max_new_tokens=req.max_tokens or g.max_new_tokens,
                  temperature=g.temperature if req.temperature is None else req.temperature,
                  top_p=g.top_p if req.top_p is None else req.top_p,
                  repetition_penalty=g.repetition_penalty if req.repetition_penalty is None else req.repetition_penalty)
        if req.stop:
            kw["stop"] = req.stop
        return kw

    def reply(self, req: "ChatRequest") -> Reply:
        """A whole answer (the non-streamed route)."""
        with self._active_lock:
            self._active += 1
        try:
            return self._reply(req)
        finally:
            with self._active_lock:
                self._active -= 1

    def _reply(self, req: "ChatRequest") -> Reply:
        if req.model == RAG_MODEL:
            return _answer_reply(self.rag.answer(req.question))
        if req.model == HYBRID_MODEL:
            return _answer_reply(self.hybrid().answer(req.question))
        chat_engine, messages = self._plain(req)
        if req.prompt_logprobs is not None:
            if not hasattr(chat_engine.inner, "prompt_logprobs"):
                raise APIError(400, f"{req.model} is generated elsewhere; this server cannot give its prompt_logprobs.",
                               param="prompt_logprobs", code="unsupported")
            ids, logprobs = chat_engine.prompt_logprobs(messages, continue_final_message=req.continue_final_message)
            tokenizer = getattr(chat_engine, "tokenizer", None)
            entries = [None if lp is None else {str(t): {"logprob": lp, "rank": None,
                                                         "decoded_token": tokenizer.decode([t]) if tokenizer else ""}}
                       for t, lp in zip(ids, logprobs)]
            return Reply("", [], {"model": chat_engine.resolved.display_name}, finish_reason="length",
                         usage={"prompt_tokens": len(ids), "completion_tokens": 0, "total_tokens": len(ids)},
                         prompt_logprobs=entries)
        result = chat_engine.generate([messages], **self._gen_kwargs(req))[0]
        usage = {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.new_tokens,
                 "total_tokens": result.prompt_tokens + result.new_tokens}
        return Reply(result.text, [], {"model": chat_engine.resolved.display_name}, usage=usage,
                     finish_reason="length" if result.finish_reason == "length" else "stop")

    def stream(self, req: "ChatRequest") -> tuple[Iterator[str], Callable[[], Reply]]:
        """(pieces, final): ``final()`` after the pieces are exhausted gives the citations."""
        if req.model in (RAG_MODEL, HYBRID_MODEL):
            pipeline = self.rag if req.model == RAG_MODEL else self.hybrid()
            pieces, answer = pipeline.stream(req.question)
            return pieces, lambda: _answer_reply(answer)
        chat_engine, messages = self._plain(req)
        pieces = chat_engine.stream(messages, **self._gen_kwargs(req))
        return pieces, lambda: Reply("", [], {"model": chat_engine.resolved.display_name})

    def _plain(self, req: "ChatRequest"):
        """(engine, messages) for memchat-finetuned (its training prompt) and the base model (as sent)."""
        if req.model == FINETUNED_MODEL:
            chat = self.finetuned()
            return chat.generator, chat.messages(req.question)
        return self.base, req.messages

    # -- documents -------------------------------------------------------------
    def documents(self) -> list[dict]:
        return self.kb.documents()

    def add(self, files: list[tuple[str, bytes]]):
        with self._write_lock:
            return self.kb.add_documents(files)

    def remove(self, name: str) -> dict:
        with self._write_lock:
            if name not in {d["name"] for d in self.kb.documents()}:
                raise APIError(404, f"No document named '{name}' in the knowledge base.", code="document_not_found",
                               param="name")
            return self.kb.remove(name)

    def close(self) -> None:
        self.base.close()
        if self._finetuned is not None and isinstance(self._finetuned.generator, SharedEngine):
            self._finetuned.generator.close()


def _answer_reply(answer) -> Reply:
    """A RAG / hybrid ``Answer`` -> the reply with its citations."""
    citations = [
        {"index": i, "document": h.document, "page_start": h.page_start, "page_end": h.page_end,
         "citation": h.citation, "passage": h.text, "score": round(float(h.score), 4)}
        for i, h in enumerate(answer.hits, 1)
    ]
    meta = {"model": answer.model, "evidence": answer.evidence[0].sentence if answer.evidence else None}
    for name in ("abstained", "mode", "status", "route", "strategy"):  # what the pipeline reports, where it does
        value = getattr(answer, name, None)
        if value not in (None, ""):
            meta[name] = value
    return Reply(answer.text, citations, meta)


# ---------------------------------------------------------------------------
# Requests
# ---------------------------------------------------------------------------
@dataclass
class ChatRequest:
    model: str
    messages: list[dict]
    stream: bool = False
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop: list[str] | None = None
    repetition_penalty: float | None = None
    prompt_logprobs: int | None = None
    continue_final_message: bool = False

    @property
    def question(self) -> str:
        return next(m["content"] for m in reversed(self.messages) if m["role"] == "user")


def parse_chat_request(body) -> ChatRequest:
    """Validate a chat completion request body; APIError 400 on anything wrong."""
    if not isinstance(body, dict):
        raise APIError(400, "The request body must be a JSON object.", code="invalid_body")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise APIError(400, "'model' is required: one of GET /v1/models.", param="model", code="missing_model")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "'messages' must be a non-empty list of {role, content}.", param="messages",
                       code="invalid_messages")
    clean = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant", "developer"):
            raise APIError(400, f"messages[{i}] needs a role of system, user or assistant.", param=f"messages[{i}]",
                           code="invalid_messages")
        content = m.get("content")
        if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
        if not isinstance(content, str):
            raise APIError(400, f"messages[{i}].content must be text.", param=f"messages[{i}].content",
                           code="invalid_messages")
        clean.append({"role": "system" if m["role"] == "developer" else m["role"], "content": content})
    req = ChatRequest(model=model, messages=clean, stream=bool(body.get("stream", False)))
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is not None:
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
            raise APIError(400, "'max_tokens' must be a positive integer.", param="max_tokens", code="invalid_value")
        req.max_tokens = max_tokens
    for name, low, high in (("temperature", 0.0, 2.0), ("top_p", 0.0, 1.0), ("repetition_penalty", 0.0, 10.0)):
        value = body.get(name)
        if value is None:
            continue
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not low <= value <= high:
            raise APIError(400, f"'{name}' must be a number from {low} to {high}.", param=name, code="invalid_value")
        setattr(req, name, float(value))
    if req.top_p == 0.0:
        req.top_p = None
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None:
        if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
            raise APIError(400, "'stop' must be a string or a list of strings.", param="stop", code="invalid_value")
        req.stop = [s for s in stop if s] or None
    if (body.get("n") or 1) != 1:
        raise APIError(400, "Only n=1 is supported.", param="n", code="invalid_value")
    if body.get("prompt_logprobs") is not None:
        req.prompt_logprobs = int(body["prompt_logprobs"])
        req.continue_final_message = bool(body.get("continue_final_message", False))
    if not any(m["role"] == "user" for m in clean) and model.startswith("memchat-"):
        raise APIError(400, "'messages' has no user message: nothing to answer.", param="messages",
                       code="invalid_messages")
    if model.startswith("memchat-") and not req.question.strip():
        raise APIError(400, "The last user message is empty: nothing to answer.", param="messages",
                       code="invalid_messages")
    return req


# ---------------------------------------------------------------------------
# The app
# ---------------------------------------------------------------------------
def create_app(service: MemChatService, *, api_key: str | None):
    """The FastAPI app over ``service``. ``api_key`` None = no auth (loopback only: see ``check_bind``)."""
    from fastapi import FastAPI
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException as StarletteHTTPException

    app = FastAPI(title="Mem_Chat", summary="OpenAI-compatible API over your encrypted PDFs",
                  docs_url=None, redoc_url=None, openapi_url=None)  # no unauthenticated pages
    app.state.service = service
    cfg = service.cfg

    def error_response(err: APIError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if err.status == 401 else None
        return JSONResponse(err.body(), status_code=err.status, headers=headers)

    class RequireKey:
        """Pure ASGI (not BaseHTTPMiddleware, which gets in the way of streaming and disconnects)."""

        def __init__(self, inner):
            self.inner = inner

        async def __call__(self, scope, receive, send):
            if scope["type"] == "http" and api_key is not None:
                header = dict(scope.get("headers") or []).get(b"authorization", b"").decode("latin-1")
                scheme, _, token = header.partition(" ")
                if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
                    missing = not token.strip()
                    response = error_response(APIError(
                        401, f"No API key given: send Authorization: Bearer ${config.API_KEY_ENV}." if missing
                        else "Incorrect API key provided.", code="missing_api_key" if missing else "invalid_api_key"))
                    return await response(scope, receive, send)
            return await self.inner(scope, receive, send)

    app.add_middleware(RequireKey)

    @app.exception_handler(APIError)
    async def _api_error(request, exc: APIError):
        return error_response(exc)

    @app.exception_handler(MemChatError)
    async def _memchat_error(request, exc: MemChatError):
        return error_response(api_error_for(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return error_response(APIError(exc.status_code, str(exc.detail), code=code))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, exc: RequestValidationError):
        return error_response(APIError(400, f"Invalid request: {exc.errors()[:1]}", code="invalid_request"))

    async def read_body(request: Request, limit: int) -> bytes:
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limit:
            raise APIError(413, f"The request body is {int(declared)} bytes; the limit is {limit}.",
                           code="request_too_large")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise APIError(413, f"The request body is over the limit of {limit} bytes.", code="request_too_large")
            chunks.append(chunk)
        return b"".join(chunks)

    @app.get("/v1/models")
    async def list_models():
        now = int(time.time())
        return {"object": "list", "data": [{"id": m, "object": "model", "created": now, "owned_by": "memchat"}
                                           for m in service.model_ids()]}

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str):
        if model_id not in service.model_ids():
            raise APIError(404, f"The model '{model_id}' does not exist.", code="model_not_found", param="model")
        return {"id": model_id, "object": "model", "created": int(time.time()), "owned_by": "memchat"}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        raw = await read_body(request, cfg.max_request_bytes)
        try:
            body = json.loads(raw or b"null")
        except ValueError:
            raise APIError(400, "The request body is not valid JSON.", code="invalid_json") from None
        req = parse_chat_request(body)
        await run_in_threadpool(service.check_model, req.model)
        cid = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        created = int(time.time())
        if not req.stream:
            reply = await run_in_threadpool(service.reply, req)
            out = {
                "id": cid, "object": "chat.completion", "created": created, "model": req.model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": reply.text},
                             "finish_reason": reply.finish_reason, "logprobs": None}],
                "citations": reply.citations, "memchat": reply.memchat,
            }
            if reply.usage:
                out["usage"] = reply.usage
            if reply.prompt_logprobs is not None:
                out["prompt_logprobs"] = reply.prompt_logprobs
            return out
        # Retrieval runs here, so a missing store is a proper HTTP error; nothing generates (or holds
        # the model) until the response starts pulling the pieces.
        pieces, final = await run_in_threadpool(service.stream, req)
        return StreamingResponse(_sse(service, pieces, final, cid, created, req.model),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    @app.get("/v1/documents")
    async def list_documents():
        docs = await run_in_threadpool(service.documents)
        return {"object": "list", "data": [_document(d) for d in docs]}

    @app.post("/v1/documents")
    async def add_documents(request: Request):
        ctype = request.headers.get("content-type", "")
        raw = await read_body(request, cfg.max_upload_bytes)
        if not ctype.startswith("multipart/form-data"):
            raise APIError(400, "Upload PDFs as multipart/form-data with one or more 'file' parts.",
                           code="invalid_upload")
        files = await run_in_threadpool(parse_multipart_files, raw, ctype)
        if not files:
            raise APIError(400, "No 'file' part with a filename in the upload.", code="invalid_upload", param="file")
        results = await run_in_threadpool(service.add, files)
        data = [{"name": r.name, "status": r.status, "version": r.version, "pages": r.pages, "chunks": r.chunks,
                 "error": r.error, "message": r.message} for r in results]
        failed = [r for r in results if r.status == "error"]
        if failed:  # the good files went in (as with the CLI); the response says which did
            raise APIError(400, "; ".join(r.message for r in failed), code="bad_document", param="file",
                           extra={"data": data})
        return {"object": "list", "data": data}

    @app.delete("/v1/documents/{name:path}")
    async def remove_document(name: str):
        record = await run_in_threadpool(service.remove, name)
        return {"id": record["name"], "object": "document", "deleted": True, "version": record["version"],
                "chunks": record["chunks"]}

    return app


def _document(d: dict) -> dict:
    return {"id": d["name"], "object": "document", **{k: d.get(k) for k in ("name", "version", "pages", "chunks",
                                                                          "sha256", "added")}}


_END = object()


async def _sse(service: MemChatService, pieces: Iterator[str], final, cid: str, created: int, model: str):
    """Server-sent events: a role chunk, content chunks, a final chunk with the citations, [DONE].

    The pieces are pulled on a worker thread. When the client hangs up, Starlette
    cancels this generator; ``finally`` then tells the worker to stop, and the worker
    closes the pieces, which ends the generation at its next token.
    """
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    stop = threading.Event()

    def put(item) -> None:
        try:
            loop.call_soon_threadsafe(queue.put_nowait, item)
        except RuntimeError:  # the loop is gone (server shutting down)
            stop.set()

    def pull() -> None:
        cancelled = False
        try:
            while True:
                if stop.is_set():
                    cancelled = True
                    break
                piece = next(pieces, _END)
                if piece is _END:
                    break
                put(("piece", piece))
            put(("done", None))
        except BaseException as exc:  # sent to the client as an error event
            put(("error", exc))
        finally:
            if cancelled:
                service.cancelled_streams += 1
            close = getattr(pieces, "close", None)
            if close is not None:
                close()

    def chunk(delta: dict, finish: str | None = None, **extra) -> str:
        body = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}], **extra}
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    streamed: list[str] = []
    worker = threading.Thread(target=pull, name="memchat-sse", daemon=True)
    try:
        yield chunk({"role": "assistant", "content": ""})
        worker.start()
        while True:
            kind, value = await queue.get()
            if kind == "piece":
                streamed.append(value)
                yield chunk({"content": value})
            elif kind == "error":
                err = api_error_for(value) if isinstance(value, MemChatError) else APIError(
                    500, f"Generation failed: {value}", type="server_error", code="generation_failed")
                log.error("stream failed: %s", value)
                yield f"data: {json.dumps(err.body())}\n\n"
                break
            else:
                reply = final()
                meta = dict(reply.memchat)
                if reply.text and reply.text.strip() != "".join(streamed).strip():
                    meta["text"] = reply.text  # the pipeline replaced the streamed draft (e.g. it failed verification)
                yield chunk({}, "stop", citations=reply.citations, memchat=meta)
                break
        yield "data: [DONE]\n\n"
    finally:
        stop.set()  # the worker closes the pieces (a started generator is closed on its own thread)


def parse_multipart_files(body: bytes, content_type: str) -> list[tuple[str, bytes]]:
    """(filename, bytes) of every file part, parsed in memory: an upload never touches the disk.

    (Starlette's form parser spools parts over 1 MB to a temporary file: the user's
    plain-text PDF would sit unencrypted in /tmp.)
    """
    from python_multipart.multipart import MultipartParser, parse_options_header

    _, params = parse_options_header(content_type)
    boundary = params.get(b"boundary")
    if not boundary:
        raise APIError(400, "multipart upload without a boundary.", code="invalid_upload")
    files: list[tuple[str, bytes]] = []
    state: dict = {}

    def on_part_begin():
        state.update(headers={}, data=[], field=b"", value=b"")

    def on_header_field(data, start, end):
        state["field"] += data[start:end]

    def on_header_value(data, start, end):
        state["value"] += data[start:end]

    def on_header_end():
        state["headers"][state["field"].decode("latin-1").lower()] = state["value"]
        state["field"], state["value"] = b"", b""

    def on_part_data(data, start, end):
        state["data"].append(data[start:end])

    def on_part_end():
        disposition = state["headers"].get("content-disposition", b"")
        _, opts = parse_options_header(disposition)
        filename = opts.get(b"filename")
        if filename is not None:
            name = Path(filename.decode("utf-8", errors="replace").replace("\\", "/")).name
            if not name:
                raise APIError(400, "A file part has an empty filename.", code="invalid_upload", param="file")
            files.append((name, b"".join(state["data"])))

    parser = MultipartParser(boundary, {
        "on_part_begin": on_part_begin, "on_header_field": on_header_field, "on_header_value": on_header_value,
        "on_header_end": on_header_end, "on_part_data": on_part_data, "on_part_end": on_part_end,
    })
    try:
        parser.write(body)
        parser.finalize()
    except APIError:
        raise
    except Exception as exc:  # python-multipart raises its own error types for malformed bodies
        raise APIError(400, f"Malformed multipart upload: {exc}", code="invalid_upload") from None
    return files


# ---------------------------------------------------------------------------
# Starting it
# ---------------------------------------------------------------------------
def check_bind(host: str, no_auth: bool, api_key: str | None) -> str | None:
    """The key to require (None with --no-auth); MemChatError when the combination is unsafe."""
    from .llm_client import is_loopback

    if no_auth:
        if not is_loopback(host):
            raise MemChatError(f"--no-auth is allowed on loopback only (127.0.0.1, ::1, localhost), not on {host}. "
                               f"Set {config.API_KEY_ENV} instead.")
        return None
    if not api_key:
        raise MemChatError(f"Set {config.API_KEY_ENV} to the key clients must send (e.g. export {config.API_KEY_ENV}="
                           "$(python -c 'import secrets; print(secrets.token_urlsafe(32))')), or, on 127.0.0.1 only, "
                           "pass --no-auth.")
    return api_key


def serve(*, host: str = ServeConfig.host, port: int = ServeConfig.port, no_auth: bool = False,
          model_name: str = GenerationConfig.model_name, served_model_name: str | None = None,
          top_k: int = RAGConfig.top_k, max_new_tokens: int = GenerationConfig.max_new_tokens,
          max_batch: int = ServeConfig.max_batch, llm_server: str | None = None, llm_model: str | None = None) -> int:
    """``python main.py serve``: check the settings, load the model once, run uvicorn until Ctrl-C."""
    import os

    import uvicorn

    from .knowledge import KnowledgeBase
    from .llm_client import make_engine

    api_key = check_bind(host, no_auth, os.environ.get(config.API_KEY_ENV))
    kb = KnowledgeBase()
    if kb.exists():
        kb.store.read()  # a wrong key or a damaged store stops the start, not the first request
    engine = make_engine(model_name, llm_server, llm_model=llm_model)
    if engine.notice:
        log.warning("Note: %s", engine.notice)
    resolved = engine.resolved
    base_name = served_model_name or (resolved.model_id if resolved.source == "bundled" else resolved.requested)
    service = MemChatService(kb, generator=engine, generation=GenerationConfig(model_name=model_name,
                                                                               max_new_tokens=max_new_tokens),
                             rag=RAGConfig(top_k=top_k), serve=ServeConfig(host=host, port=port, max_batch=max_batch),
                             base_model_name=base_name)
    app = create_app(service, api_key=api_key)
    shown = f"[{host}]" if ":" in host else host
    print(f"serving {', '.join(service.model_ids())} on http://{shown}:{port}/v1 "
          f"({'no key: loopback only' if api_key is None else 'clients send Bearer $' + config.API_KEY_ENV}); "
          f"generation: {resolved.display_name}, batches of up to {max_batch}", flush=True)
    try:
        uvicorn.run(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=5)
    finally:
        service.close()
    return 0
