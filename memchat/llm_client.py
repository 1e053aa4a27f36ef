"""Generation on an external OpenAI-compatible engine: vLLM, llama-server, Ollama, or ``main.py serve``.

``LLMServerClient`` has the in-process ``Generator``'s interface
(``memchat.generation.GenerationEngine``), so RAG, the hybrid, the evaluation and the
extractor take either one as their ``generator``:

  generate(batch)      one ``POST /v1/chat/completions`` per conversation, up to
                       ``LLMServerConfig.concurrency`` in flight at once: a vLLM
                       server batches whatever is in flight (continuous batching),
                       a llama-server fills its ``-np`` slots and queues the rest.
                       Results in input order; text cut at stop strings and stripped,
                       as ``Generator.generate`` returns it.
  stream(messages)     the same request with ``stream: true`` (server-sent events);
                       pieces join to what ``generate`` returns. Closing the iterator
                       closes the connection, which stops the generation on servers
                       that watch for it (vLLM, ``main.py serve``).
  loglikelihoods(...)  log p(continuation | prompt) from the server's prompt
                       log-probabilities: vLLM's ``prompt_logprobs`` extension of the
                       chat API (with ``continue_final_message``), which ``main.py serve``
                       implements too. A server without it (llama-server, Ollama, OpenAI)
                       is detected on the first call; scoring then runs in-process on
                       ``fallback_model``, with a notice.

Sampling settings map onto the request: ``max_new_tokens`` -> ``max_tokens``,
``temperature`` (0 = greedy), ``top_p``, ``stop``, and ``repetition_penalty`` as
vLLM's extra parameter (servers without it ignore it).

HTTP is the standard library's (``urllib``): nothing to install for the client. A
loopback URL bypasses any proxy settings, so local traffic never leaves the machine.

Deliberately not here: prompt wording (callers build the messages), tokenisation
(the server applies its model's chat template), and starting a server.
"""

from __future__ import annotations

import http.client
import ipaddress
import json
import logging
import os
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from .config import LLM_API_KEY_ENV, LLM_SERVER_ENV, LLMServerConfig
from .errors import LLMServerError
from .generation import GenerationResult, GenerationStats, Messages, cut_at_stop, hold_back

log = logging.getLogger(__name__)

_RETRY_STATUS = {429, 500, 502, 503, 504}  # busy or restarting: worth another try


@dataclass
class ServerModel:
    """A served model, shaped like ``memchat.models.ResolvedModel`` for the callers."""

    requested: str  # the model name the server serves it under
    path: str  # the server's base URL
    source: str = "server"
    notice: str | None = None
    kind: str = "llm"

    @property
    def display_name(self) -> str:
        return f"{self.requested} @ {urllib.parse.urlsplit(self.path).netloc}"

    @property
    def model_id(self) -> str:
        # The served name: the same model answers the same way whichever server runs it
        # (greedy outputs can still differ slightly across engines).
        return self.requested


def server_url(url: str | None = None) -> str | None:
    """``url`` if given, else ``$MEMCHAT_LLM_SERVER``, else None (generate in-process)."""
    url = (url or os.environ.get(LLM_SERVER_ENV) or "").strip()
    return url or None


def base_url(url: str) -> str:
    """``http://host:port`` or ``.../v1`` -> ``.../v1`` (where every OpenAI-compatible server puts its routes)."""
    url = url.strip().rstrip("/")
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise LLMServerError(f"--llm-server must be an http(s) URL such as http://127.0.0.1:8000/v1, not {url!r}")
    return url if parts.path.endswith("/v1") else url + "/v1"


def is_loopback(host: str) -> bool:
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def make_engine(model_name: str, llm_server: str | None = None, *, llm_model: str | None = None,
                config: LLMServerConfig | None = None):
    """The generation engine a script asked for: a server client when a URL is given (or in the
    environment), else the in-process ``Generator(model_name)``."""
    url = server_url(llm_server)
    if url:
        return LLMServerClient(url, llm_model, config=config, fallback_model=model_name)
    from .generation import Generator

    return Generator(model_name)


class LLMServerClient:
    """An OpenAI-compatible server as a ``GenerationEngine``. See the module docstring.

    ``model`` None takes the first model the server lists. ``api_key`` None reads
    ``$MEMCHAT_LLM_API_KEY``. ``fallback_model`` is loaded in-process only if log-
    probabilities are asked for and the server cannot give them (default: the served name).
    Raises ``LLMServerError`` at once when the server cannot be reached or lacks the model.
    """

    def __init__(self, url: str | None = None, model: str | None = None, *, api_key: str | None = None,
                 config: LLMServerConfig | None = None, fallback_model: str | None = None, fallback=None):
        self.cfg = config or LLMServerConfig()
        url = server_url(url or self.cfg.url)
        if not url:
            raise LLMServerError(f"No LLM server given: pass --llm-server URL or set {LLM_SERVER_ENV}.")
        self.base = base_url(url)
        self.api_key = api_key if api_key is not None else os.environ.get(LLM_API_KEY_ENV) or None
        host = urllib.parse.urlsplit(self.base).hostname or ""
        # Loopback traffic never goes through a proxy; other hosts follow the environment's proxy rules.
        handlers = [urllib.request.ProxyHandler({})] if is_loopback(host) else []
        self._opener = urllib.request.build_opener(*handlers)
        # No retries here: a server that is not there at the start is a setup problem, said at once.
        served = [m.get("id") for m in self._json("GET", "/models", retries=0).get("data") or [] if m.get("id")]
        model = model or self.cfg.model
        if model is None:
            if not served:
                raise LLMServerError(f"The LLM server at {self.base} lists no models (GET /v1/models).")
            model = served[0]
        elif served and model not in served:
            raise LLMServerError(f"The LLM server at {self.base} does not serve {model!r}; it serves: {', '.join(served)}.")
        self.model = model
        self.resolved = ServerModel(requested=model, path=self.base)
        self.notice: str | None = None
        self.stats = GenerationStats()
        self._stats_lock = threading.Lock()
        self._fallback = fallback
        self._fallback_model = fallback_model or model
        self._server_logprobs: bool | None = None  # unknown until the first loglikelihoods call

    def __repr__(self) -> str:
        return f"LLMServerClient({self.base!r}, model={self.model!r})"

    # ------------------------------------------------------------------ HTTP
    def _open(self, method: str, path: str, body: dict | None = None, *, stream: bool = False,
              retries: int | None = None):
        data = json.dumps(body).encode() if body is not None else None
        headers = {"Accept": "text/event-stream" if stream else "application/json"}
        if data is not None:
            headers["Content-Type"] = "application/json"
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(self.base + path, data=data, headers=headers, method=method)
        retries = self.cfg.retries if retries is None else retries
        for attempt in range(retries + 1):
            last = attempt == retries
            try:
                return self._opener.open(request, timeout=self.cfg.timeout_s)
            except urllib.error.HTTPError as exc:
                message = _error_message(exc)
                if exc.code in _RETRY_STATUS and not last:
                    time.sleep(2**attempt)
                    continue
                if exc.code in (401, 403):
                    raise LLMServerError(f"The LLM server at {self.base} refused the request ({exc.code}: {message}). "
                                         f"Set {LLM_API_KEY_ENV} to its API key.") from None
                raise LLMServerError(f"The LLM server at {self.base} answered {exc.code} to {path}: {message}") from None
            except (urllib.error.URLError, ConnectionError, TimeoutError, http.client.HTTPException) as exc:
                if not last:
                    time.sleep(2**attempt)
                    continue
                reason = getattr(exc, "reason", None) or exc
                raise LLMServerError(
                    f"Cannot reach the LLM server at {self.base} ({reason}). Start it (e.g. vllm serve MODEL), "
                    f"check --llm-server / {LLM_SERVER_ENV}, or leave both unset to generate in-process."
                ) from None
        raise AssertionError("unreachable")

    def _json(self, method: str, path: str, body: dict | None = None, *, retries: int | None = None) -> dict:
        with self._open(method, path, body, retries=retries) as response:
            raw = response.read()
        try:
            return json.loads(raw)
        except ValueError:
            raise LLMServerError(f"The LLM server at {self.base} sent something that is not JSON for {path}.") from None

    # ------------------------------------------------------------------ requests
    def _body(self, messages: Messages, max_new_tokens: int, temperature: float, top_p: float,
              repetition_penalty: float, do_sample: bool | None, stop: Sequence[str] | None) -> dict:
        if do_sample is None:
            do_sample = temperature > 0
        body = {
            "model": self.model,
            "messages": [{"role": m["role"], "content": m["content"]} for m in messages],
            "max_tokens": max_new_tokens,
            "temperature": (temperature if temperature > 0 else 1.0) if do_sample else 0.0,
        }
        if do_sample:
            body["top_p"] = top_p
        if stop:
            body["stop"] = list(stop)
        if repetition_penalty and repetition_penalty != 1.0:
            body["repetition_penalty"] = repetition_penalty  # vLLM's (and main.py serve's) extra parameter
        return body

    def _complete(self, body: dict, stop: list[str]) -> GenerationResult:
        data = self._json("POST", "/chat/completions", body)
        try:
            choice = data["choices"][0]
            text = choice["message"].get("content") or ""
        except (KeyError, IndexError, TypeError, AttributeError):
            raise LLMServerError(f"The LLM server at {self.base} sent a chat completion without choices: "
                                 f"{str(data)[:200]}") from None
        text, hit = cut_at_stop(text, stop)
        reason = choice.get("finish_reason") or "stop"
        stopped_on = choice.get("stop_reason")  # vLLM: the stop string that ended it, else null
        finish = "length" if reason == "length" else ("stop" if hit or isinstance(stopped_on, str) else "eos")
        usage = data.get("usage") or {}
        return GenerationResult(text=text.strip(), prompt_tokens=int(usage.get("prompt_tokens") or 0),
                                new_tokens=int(usage.get("completion_tokens") or 0), finish_reason=finish)

    def _record(self, calls: int, prompts: int, prompt_tokens: int, new_tokens: int, seconds: float) -> None:
        with self._stats_lock:
            s = self.stats
            s.calls += calls
            s.prompts += prompts
            s.prompt_tokens += prompt_tokens
            s.new_tokens += new_tokens
            s.seconds += seconds

    # ------------------------------------------------------------------ the interface
    def generate(
        self,
        batch: Sequence[Messages],
        *,
        max_new_tokens: int = 256,
        temperature: float = 0.0,
        top_p: float = 0.9,
        repetition_penalty: float = 1.1,
        do_sample: bool | None = None,
        batch_size: int = 16,  # noqa: ARG002 - the server batches; kept for the Generator's signature
        stop: Sequence[str] | None = None,
        progress: bool = False,
        share_prefix: bool = False,  # noqa: ARG002 - servers share prefixes themselves (vLLM: --enable-prefix-caching)
    ) -> list[GenerationResult]:
        """Every conversation as its own request, ``concurrency`` in flight; results in input order."""
        if not batch:
            return []
        stop = [s for s in (stop or []) if s]
        bodies = [self._body(m, max_new_tokens, temperature, top_p, repetition_penalty, do_sample, stop) for m in batch]
        results: list[GenerationResult | None] = [None] * len(bodies)
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(bodies), unit="prompt", desc="Generating (server)")
        start = time.perf_counter()
        pool = ThreadPoolExecutor(max_workers=max(1, min(self.cfg.concurrency, len(bodies))),
                                  thread_name_prefix="memchat-llm")
        try:
            futures = {pool.submit(self._complete, body, stop): i for i, body in enumerate(bodies)}
            for future, index in futures.items():  # in order: the first failure is raised here
                results[index] = future.result()
                if bar is not None:
                    bar.update(1)
        finally:
            pool.shutdown(wait=True, cancel_futures=True)  # a failure cancels what has not started
            if bar is not None:
                bar.close()
        done = [r for r in results if r is not None]
        self._record(1, len(done), sum(r.prompt_tokens for r in done), sum(r.new_tokens for r in done),
                     time.perf_counter() - start)
        return results  # type: ignore[return-value]

    def stream(
        self,
        messages: Messages,
        *,
        max_new_tokens: int = 256,
        temperature: float = 0.0,
        top_p: float = 0.9,
        repetition_penalty: float = 1.1,
        do_sample: bool | None = None,
        stop: Sequence[str] | None = None,
    ) -> Iterator[str]:
        """Pieces of the answer as the server sends them; they join to ``generate``'s text."""
        stop = [s for s in (stop or []) if s]
        body = self._body(messages, max_new_tokens, temperature, top_p, repetition_penalty, do_sample, stop)
        body.update(stream=True, stream_options={"include_usage": True})
        start = time.perf_counter()
        usage: dict = {}
        text, emitted = "", ""
        response = self._open("POST", "/chat/completions", body, stream=True)
        try:
            for event in _sse_events(response):
                if "error" in event:
                    raise LLMServerError(f"The LLM server at {self.base} failed mid-answer: {_message_of(event)}")
                usage = event.get("usage") or usage
                for choice in event.get("choices") or []:
                    text += (choice.get("delta") or {}).get("content") or ""
                visible, hit = cut_at_stop(text, stop)
                visible = visible.lstrip()
                safe = visible if hit else hold_back(visible, stop)
                if len(safe) > len(emitted) and safe.startswith(emitted):
                    yield safe[len(emitted):]
                    emitted = safe
                if hit:
                    break
            final = cut_at_stop(text, stop)[0].strip()
            if len(final) > len(emitted) and final.startswith(emitted):
                yield final[len(emitted):]
        finally:
            response.close()  # a consumer that stops early hangs up: the server stops generating
            self._record(1, 1, int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0),
                         time.perf_counter() - start)

    def loglikelihood(self, context_messages: Messages, continuation: str) -> float:
        return self.loglikelihoods([(context_messages, continuation)])[0]

    def loglikelihoods(self, requests: Sequence[tuple[Messages, str]], *, batch_size: int = 8) -> list[float]:
        """Sum of log p(continuation tokens | prompt), from the server when it can, else in-process."""
        requests = list(requests)
        if not requests:
            return []
        if self._server_logprobs is not False:
            scores = self._server_loglikelihoods(requests)
            if scores is not None:
                return scores
        return self._fallback_engine().loglikelihoods(requests, batch_size=batch_size)

    # ------------------------------------------------------------------ log-probabilities
    def _prompt_logprobs(self, messages: Messages, continuation: str | None) -> tuple[int, list | None]:
        """(prompt tokens, per-token prompt log-probs or None) of one request."""
        body = {"model": self.model, "messages": [{"role": m["role"], "content": m["content"]} for m in messages],
                "max_tokens": 1, "temperature": 0.0}
        if continuation is not None:
            body["messages"].append({"role": "assistant", "content": continuation})
            body.update(prompt_logprobs=0, add_generation_prompt=False, continue_final_message=True)
        data = self._json("POST", "/chat/completions", body)
        return int((data.get("usage") or {}).get("prompt_tokens") or 0), data.get("prompt_logprobs")

    def _server_loglikelihoods(self, requests: list[tuple[Messages, str]]) -> list[float] | None:
        todo = [i for i, (_, c) in enumerate(requests) if c]
        scores = [0.0] * len(requests)  # an empty continuation has log-probability 0
        if not todo:
            return scores
        first = todo[0]
        try:
            probe = self._prompt_logprobs(requests[first][0], requests[first][1])
        except LLMServerError as exc:  # a server that rejects the extension's fields
            probe = (0, None)
            log.debug("prompt_logprobs probe failed: %s", exc)
        if not isinstance(probe[1], list):
            self._server_logprobs = False
            self.notice = (f"The LLM server at {self.base} gives no prompt log-probabilities (vLLM's prompt_logprobs); "
                           f"scoring runs in-process on {self._fallback_model} instead.")
            log.warning("%s", self.notice)
            return None
        self._server_logprobs = True
        start = time.perf_counter()
        contexts: dict[str, Messages] = {}
        for i in todo:
            contexts.setdefault(json.dumps(requests[i][0], sort_keys=True), requests[i][0])
        with ThreadPoolExecutor(max_workers=max(1, min(self.cfg.concurrency, len(todo) + len(contexts)))) as pool:
            context_futures = {k: pool.submit(self._prompt_logprobs, m, None) for k, m in contexts.items()}
            whole_futures = {i: (pool.submit(self._prompt_logprobs, *requests[i]) if i != first else None) for i in todo}
            for i in todo:
                context_tokens = context_futures[json.dumps(requests[i][0], sort_keys=True)].result()[0]
                _, logprobs = probe if i == first else whole_futures[i].result()
                scores[i] = float(sum(v for v in (_picked(entry) for entry in (logprobs or [])[context_tokens:]) if v is not None))
        self._record(1, len(todo), 0, 0, time.perf_counter() - start)
        return scores

    def _fallback_engine(self):
        if self._fallback is None:
            from .generation import Generator

            self._fallback = Generator(self._fallback_model)
        return self._fallback


# ---------------------------------------------------------------------------
# Wire helpers
# ---------------------------------------------------------------------------
def _sse_events(response) -> Iterator[dict]:
    """The JSON objects of a server-sent event stream, until ``data: [DONE]``."""
    for raw in response:
        line = raw.decode("utf-8", errors="replace").strip()
        if not line.startswith("data:"):
            continue  # comments, event names, blank separators
        data = line[len("data:"):].strip()
        if data == "[DONE]":
            return
        try:
            yield json.loads(data)
        except ValueError:
            continue


def _picked(entry) -> float | None:
    """The prompt token's log-prob from one vLLM ``prompt_logprobs`` entry ({token_id: {"logprob": x, ...}})."""
    if not isinstance(entry, dict) or not entry:
        return None
    first = next(iter(entry.values()))  # vLLM puts the prompt's own token first
    value = first.get("logprob") if isinstance(first, dict) else first
    return float(value) if value is not None else None


def _message_of(payload) -> str:
    error = payload.get("error") if isinstance(payload, dict) else None
    if isinstance(error, dict):
        return str(error.get("message") or error)
    return str(error or payload)[:300]


def _error_message(exc: urllib.error.HTTPError) -> str:
    try:
        return _message_of(json.loads(exc.read() or b"{}"))
    except (ValueError, OSError):
        return exc.reason or "no detail"
