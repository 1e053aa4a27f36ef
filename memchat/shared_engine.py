"""One model instance shared by every request of ``main.py serve``: ``SharedEngine``.

Non-streamed one-conversation ``generate`` calls that arrive together are queued and run
as one batched call by a worker thread; streams and scoring take the model's lock in
turn. The wrapped engine (an in-process ``Generator`` or an ``LLMServerClient``) is
otherwise used as is.

Deliberately not here: HTTP, routing and error shapes (``memchat.serve``), and how a
batch is generated (``memchat.generation``): this only decides who runs when, with
plain threads, so a serving engine (vLLM's continuous batching) can replace it.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field

from .config import ServeConfig
from .errors import MemChatError


@dataclass
class _Pending:
    messages: list
    kwargs: dict
    future: Future = field(default_factory=Future)


class SharedEngine:
    """A ``GenerationEngine`` wrapper that many request threads call at once.

    ``generate`` of ONE conversation (what RAG and chat requests make) is queued; a
    worker thread takes what is queued when the model is free and runs it as one
    batched ``generate`` (up to ``max_batch``, same settings). Before it starts it
    waits, ``window_s`` at most, while companions are coming: ``pending()`` (requests
    in flight that may still call ``generate``) exceeds the queue, or the last one
    arrived under ``gap_s`` ago (a burst, such as the extractor's concurrent requests,
    still arriving). A lone request waits ``gap_s`` at most. Anything
    else (several conversations, streams, scoring) takes the model's lock in turn.
    Everything else (``resolved``, ``notice``, ``stats``, ``format_prompt``) is the
    wrapped engine's.
    """

    def __init__(self, inner, *, max_batch: int = ServeConfig.max_batch,
                 window_s: float = ServeConfig.batch_window_ms / 1000, gap_s: float = ServeConfig.batch_gap_ms / 1000,
                 pending: Callable[[], int] | None = None):
        self.inner = inner
        self.gap_s = gap_s
        self._last_arrival = 0.0
        # In-process Generators prefill a prefix shared by rows of a batch once (same answers).
        from .generation import Generator

        self.share_prefix = isinstance(inner, Generator)
        self.pending = pending or (lambda: self.max_batch)  # unknown: always worth the window
        self.max_batch = max(1, max_batch)
        self.window_s = window_s
        self.lock = threading.Lock()  # held while the model runs
        self.batches: list[int] = []  # sizes of the batched calls made (tests and the bench read it)
        self._queue: list[_Pending] = []
        self._cv = threading.Condition()
        self._worker: threading.Thread | None = None
        self._closed = False

    def __getattr__(self, name):  # resolved, notice, stats, model, format_prompt, encode, ...
        if name == "inner":  # not set yet (copy, pickle): no recursion
            raise AttributeError(name)
        return getattr(self.inner, name)

    def generate(self, batch, **kwargs):
        if len(batch) != 1 or kwargs.get("progress") or self.max_batch == 1:
            with self.lock:
                return self.inner.generate(batch, **kwargs)
        item = _Pending(batch[0], kwargs)
        with self._cv:
            if self._closed:
                raise MemChatError("The server is shutting down.")
            self._queue.append(item)
            self._last_arrival = time.monotonic()
            if self._worker is None:
                self._worker = threading.Thread(target=self._work, name="memchat-batcher", daemon=True)
                self._worker.start()
            self._cv.notify()
        return [item.future.result()]

    def _work(self) -> None:
        while True:
            with self._cv:
                while not self._queue and not self._closed:
                    self._cv.wait()
                if self._closed and not self._queue:
                    return
                first_at = time.monotonic()
                while len(self._queue) < self.max_batch:  # companions on their way?
                    now = time.monotonic()
                    left = self.window_s - (now - first_at)
                    coming = self.pending() > len(self._queue)
                    burst = now - self._last_arrival < self.gap_s
                    if left <= 0 or not (coming or burst):
                        break
                    self._cv.wait(timeout=left if coming else min(left, self.gap_s))
                key = _settings_key(self._queue[0].kwargs)
                take = [p for p in self._queue if _settings_key(p.kwargs) == key][: self.max_batch]
                self._queue = [p for p in self._queue if p not in take]
            try:
                with self.lock:
                    kwargs = dict(take[0].kwargs, batch_size=len(take))
                    if self.share_prefix:  # requests that begin alike (one chunk's questions) prefill it once
                        kwargs["share_prefix"] = True
                    results = self.inner.generate([p.messages for p in take], **kwargs)
                self.batches.append(len(take))
                for p, r in zip(take, results):
                    p.future.set_result(r)
            except BaseException as exc:  # each waiting request gets the error
                for p in take:
                    if not p.future.done():
                        p.future.set_exception(exc)

    def stream(self, messages, **kwargs) -> Iterator[str]:
        with self.lock:
            yield from self.inner.stream(messages, **kwargs)

    def loglikelihoods(self, requests, **kwargs):
        with self.lock:
            return self.inner.loglikelihoods(requests, **kwargs)

    def prompt_logprobs(self, messages, **kwargs):
        with self.lock:
            return self.inner.prompt_logprobs(messages, **kwargs)

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify_all()


def _settings_key(kwargs: dict) -> str:
    return json.dumps({k: v for k, v in kwargs.items() if k != "batch_size"}, sort_keys=True, default=str)
