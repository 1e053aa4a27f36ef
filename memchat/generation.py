"""Chat-formatted text generation: batched for throughput, streamed for the apps.

``Generator`` wraps one causal LM and its tokenizer:

  generate(batch)      many conversations per ``model.generate`` call. Prompts are
                       sorted by length so each batch pads little, padded on the
                       LEFT (decoder-only models continue from the last column),
                       decoded with the KV cache, and returned in input order.
  stream(messages)     one conversation; text pieces as they are produced (a thread
                       runs ``generate``, a streamer hands tokens back). The pieces
                       concatenate exactly to what ``generate`` returns.
  loglikelihood(...)   sum of log-probs of a continuation after a prompt (scoring
                       multiple-choice answers without sampling).

Prompts use the tokenizer's chat template when it has one. Models without one
(GPT-2, DialoGPT) get the DialoGPT convention: each turn's text followed by eos,
so one question reads ``question<eos>`` and the model answers ``answer<eos>``.

The same interface (``GenerationEngine`` below: ``generate``, ``stream``,
``loglikelihoods``, ``resolved``, ``notice``, ``stats``) has a second
implementation, ``memchat.llm_client.LLMServerClient``, which sends the same
conversations to an external OpenAI-compatible engine (vLLM, llama-server,
Ollama, or Mem_Chat's own ``main.py serve``). ``prompt_logprobs`` is what that
server side needs to give log-probabilities of a prompt.

Deliberately not here: choosing device or dtype (``memchat.device``), finding the
model (``memchat.models``), prompt wording for RAG or QA (``memchat.rag``,
``memchat.qa``), and any hand-made parallelism: this is plain transformers
``generate``, so a serving engine (vLLM) can replace it behind the same methods.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from transformers import StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from memchat.config import DEFAULT_GENERATION_MODEL
from memchat.models import ResolvedModel, load_causal_lm

log = logging.getLogger(__name__)

Messages = list[dict]  # [{"role": "system"|"user"|"assistant", "content": str}, ...]


@dataclass
class GenerationResult:
    text: str  # the answer: special tokens removed, cut before any stop string, stripped
    prompt_tokens: int  # tokens in the formatted prompt (after any left truncation)
    new_tokens: int  # tokens the model produced, including a final eos
    finish_reason: str = "length"  # "eos" | "stop" (a stop string) | "length" (max_new_tokens)


@dataclass
class GenerationStats:
    """Running totals across calls, for tokens/s lines."""

    calls: int = 0  # generate() batches and stream() calls
    prompts: int = 0
    prompt_tokens: int = 0
    new_tokens: int = 0
    seconds: float = 0.0  # wall time inside generation (prefill + decode)
    shared_prefix_tokens: int = 0  # prompt tokens not prefilled again: served from a shared prefix (share_prefix=True)

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else 0.0

    def reset(self) -> None:
        self.calls = self.prompts = self.prompt_tokens = self.new_tokens = self.shared_prefix_tokens = 0
        self.seconds = 0.0

    def __str__(self) -> str:
        return f"{self.new_tokens} tokens in {self.seconds:.1f} s ({self.tokens_per_s:.1f} tokens/s, {self.prompts} prompts)"


class GenerationEngine(Protocol):
    """What RAG, the hybrid, the extractor and the evaluation call: ``Generator`` or ``LLMServerClient``."""

    resolved: ResolvedModel  # .display_name for the UI, .model_id for metadata, .requested
    notice: str | None  # one line to show the user (a fallback was used), or None
    stats: GenerationStats

    def generate(self, batch: Sequence[Messages], **kwargs) -> list[GenerationResult]: ...

    def stream(self, messages: Messages, **kwargs) -> Iterator[str]: ...

    def loglikelihoods(self, requests: Sequence[tuple[Messages, str]], **kwargs) -> list[float]: ...


from .prompting import uses_chat_template as has_chat_template  # noqa: E402  (one definition: memchat.prompting)


def format_chat(tokenizer, messages: Messages, add_generation_prompt: bool = True) -> str:
    """The prompt text for ``messages``: the chat template if any, else the DialoGPT convention.

    DialoGPT convention: system text (if any) joins the first turn with a newline;
    every user/assistant turn is its text followed by eos: ``q<eos>`` or
    ``q1<eos>a1<eos>q2<eos>``.
    """
    if not messages:
        raise ValueError("messages is empty: give at least one {'role': 'user', 'content': ...}")
    if has_chat_template(tokenizer):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    eos = tokenizer.eos_token or ""
    system = "\n".join(m["content"] for m in messages if m["role"] == "system")
    turns = [m["content"] for m in messages if m["role"] != "system"]
    if system:
        turns = [system + ("\n" + turns[0] if turns else "")] + turns[1:]
    return "".join(turn + eos for turn in turns)


class Generator:
    """One causal LM ready for chat generation. See the module docstring."""

    def __init__(
        self,
        model_name: str = DEFAULT_GENERATION_MODEL,
        *,
        model=None,
        tokenizer=None,
        resolved: ResolvedModel | None = None,
    ):
        if (model is None) != (tokenizer is None):
            raise ValueError("Pass both model and tokenizer, or neither (then model_name is loaded).")
        if model is None:
            model, tokenizer, resolved = load_causal_lm(resolved or model_name)
        elif resolved is None:
            path = getattr(model.config, "_name_or_path", "") or model_name
            resolved = ResolvedModel(requested=path, path=path, source="local")
        self.model = model
        self.tokenizer = tokenizer
        self.resolved = resolved
        self.notice = resolved.notice
        self.stats = GenerationStats()

        eos_ids: list[int] = []
        for candidate in (tokenizer.eos_token_id, getattr(model.generation_config, "eos_token_id", None)):
            for token_id in candidate if isinstance(candidate, (list, tuple)) else [candidate]:
                if token_id is not None and token_id not in eos_ids:
                    eos_ids.append(int(token_id))
        if not eos_ids:
            raise ValueError(f"{resolved.display_name}: the tokenizer has no eos token; generation could not stop.")
        self.eos_ids = eos_ids
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0]
        self._add_special_tokens = not has_chat_template(tokenizer)  # templates write their own BOS
        config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        self.max_positions: int | None = getattr(config, "max_position_embeddings", None)

    @property
    def device(self) -> torch.device:
        return self.model.device

    # ------------------------------------------------------------------ prompts
    def format_prompt(self, messages: Messages) -> str:
        return format_chat(self.tokenizer, messages)

    def encode(self, text: str) -> list[int]:
        """Token ids of a formatted prompt, as ``generate`` feeds them (BOS only where no chat template writes it)."""
        return self.tokenizer(text, add_special_tokens=self._add_special_tokens)["input_ids"]

    def _fit(self, ids: list[int], max_new_tokens: int) -> list[int]:
        """Keep the prompt's last tokens so prompt + answer fit the model's window."""
        if not self.max_positions or len(ids) + max_new_tokens <= self.max_positions:
            return ids
        keep = max(1, self.max_positions - max_new_tokens)
        log.warning("Prompt of %d tokens cut to its last %d to fit %s's %d positions", len(ids), keep,
                    self.resolved.display_name, self.max_positions)
        return ids[-keep:]

    def _generation_kwargs(self, max_new_tokens, temperature, top_p, repetition_penalty, do_sample) -> dict:
        if do_sample is None:
            do_sample = temperature > 0
        kwargs = {
            "max_new_tokens": max_new_tokens,
            "do_sample": do_sample,
            "repetition_penalty": repetition_penalty,
            "pad_token_id": self.pad_id,
            "eos_token_id": self.eos_ids,
        }
        if do_sample:
            kwargs.update(temperature=temperature if temperature > 0 else 1.0, top_p=top_p)
        return kwargs

    # ------------------------------------------------------------------ batched
    def generate(
        self,
        batch: Sequence[Messages],
        *,
        max_new_tokens: int = 256,
        temperature: float = 0.0,
        top_p: float = 0.9,
        repetition_penalty: float = 1.1,
        do_sample: bool | None = None,
        batch_size: int = 16,
        stop: Sequence[str] | None = None,
        progress: bool = False,
        share_prefix: bool = False,
    ) -> list[GenerationResult]:
        """Answer every conversation in ``batch``; results in input order.

        temperature 0 (default) is greedy decoding; do_sample overrides that choice.
        ``stop`` strings end an answer early and are not part of its text.

        ``share_prefix``: prompts whose formatted tokens begin alike (at least
        SHARED_PREFIX_MIN_TOKENS, e.g. one chunk's text followed by different questions)
        are put in the same batch, and each distinct prefix is prefilled ONCE: its KV cache
        is copied to every row that starts with it, and only the rows' own tails are
        prefilled. The answers are the same as without it (greedy; up to float noise); the
        prefill saved is counted in ``stats.shared_prefix_tokens``.
        """
        if not batch:
            return []
        stop = [s for s in (stop or []) if s]
        encoded = [self._fit(self.encode(self.format_prompt(m)), max_new_tokens) for m in batch]
        if share_prefix:
            order = sorted(range(len(encoded)), key=lambda i: encoded[i])  # rows with a common prefix become neighbours
        else:
            order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))  # longest first: OOM shows early
        kwargs = self._generation_kwargs(max_new_tokens, temperature, top_p, repetition_penalty, do_sample)
        results: list[GenerationResult | None] = [None] * len(encoded)
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(encoded), unit="prompt", desc="Generating")
        try:
            batch_size = max(1, batch_size)
            for start in range(0, len(order), batch_size):
                chunk = order[start : start + batch_size]
                run = self._generate_shared if share_prefix else self._generate_chunk
                for index, result in zip(chunk, run([encoded[i] for i in chunk], kwargs, stop)):
                    results[index] = result
                if bar is not None:
                    bar.update(len(chunk))
                    bar.set_postfix_str(f"{self.stats.tokens_per_s:.1f} tok/s")
        finally:
            if bar is not None:
                bar.close()
        return results  # type: ignore[return-value]

    def _generate_chunk(self, prompts: list[list[int]], kwargs: dict, stop: list[str]) -> list[GenerationResult]:
        width = max(len(ids) for ids in prompts)
        input_ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, ids in enumerate(prompts):  # left padding: every prompt ends in the last column
            input_ids[row, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
            attention_mask[row, width - len(ids) :] = 1
        criteria = _StopStrings(self.tokenizer, stop, prompt_width=width)
        start = time.perf_counter()
        try:
            with eval_mode(self.model), torch.inference_mode():
                output = self.model.generate(
                    input_ids=input_ids.to(self.device),
                    attention_mask=attention_mask.to(self.device),
                    stopping_criteria=StoppingCriteriaList([criteria]),
                    **kwargs,
                )
        except torch.OutOfMemoryError:
            if len(prompts) == 1:
                raise
            half = len(prompts) // 2
            log.warning("Out of memory at batch %d; retrying as %d + %d", len(prompts), half, len(prompts) - half)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            return self._generate_chunk(prompts[:half], kwargs, stop) + self._generate_chunk(prompts[half:], kwargs, stop)
        seconds = time.perf_counter() - start

        results = []
        for row, ids in enumerate(prompts):
            new = output[row, width:].tolist()
            results.append(self._finish(new, len(ids), stop, criteria.finished_at.get(row)))
        self.stats.calls += 1
        self.stats.prompts += len(prompts)
        self.stats.prompt_tokens += sum(len(ids) for ids in prompts)
        self.stats.new_tokens += sum(r.new_tokens for r in results)
        self.stats.seconds += seconds
        return results

    def _generate_shared(self, prompts: list[list[int]], kwargs: dict, stop: list[str]) -> list[GenerationResult]:
        """``_generate_chunk`` with each distinct shared prefix prefilled once (see ``generate``).

        Layout, for G prefix groups and B rows:
          prefixes (G, P)      each group's prefix, left-padded to the longest (P); one forward
                               fills a cache of G rows, then rows are copied to B (index_select);
          input_ids (B, P + W) the row's group prefix (as cached), then the row's own tail,
                               left-padded to W. Padding is masked; positions come from the mask,
                               so every row sees the same positions as in a plain pass.
        """
        groups = _prefix_groups(prompts, SHARED_PREFIX_MIN_TOKENS)
        if all(len(rows) == 1 for rows, _ in groups) or any(p < 1 for _, p in groups):
            return self._generate_chunk(prompts, kwargs, stop)  # nothing shared (or a 1-token prompt): the plain path
        width_p = max(p for _, p in groups)
        prefixes = torch.full((len(groups), width_p), self.pad_id, dtype=torch.long)
        prefix_mask = torch.zeros((len(groups), width_p), dtype=torch.long)
        row_group = [0] * len(prompts)
        for g, (rows, p) in enumerate(groups):
            if p:
                prefixes[g, width_p - p :] = torch.tensor(prompts[rows[0]][:p], dtype=torch.long)
                prefix_mask[g, width_p - p :] = 1
            for r in rows:
                row_group[r] = g
        tails = [prompts[r][groups[row_group[r]][1] :] for r in range(len(prompts))]
        width_t = max(len(t) for t in tails)
        width = width_p + width_t
        input_ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for r, tail in enumerate(tails):
            input_ids[r, :width_p] = prefixes[row_group[r]]
            attention_mask[r, :width_p] = prefix_mask[row_group[r]]
            input_ids[r, width - len(tail) :] = torch.tensor(tail, dtype=torch.long)
            attention_mask[r, width - len(tail) :] = 1
        from transformers import DynamicCache

        criteria = _StopStrings(self.tokenizer, stop, prompt_width=width)
        cache_kw = cache_keyword(self.model)
        start = time.perf_counter()
        try:
            with eval_mode(self.model), torch.inference_mode():
                cache = DynamicCache()
                self.model(input_ids=prefixes.to(self.device), attention_mask=prefix_mask.to(self.device),
                           position_ids=(prefix_mask.cumsum(-1) - 1).clamp(min=0).to(self.device),
                           use_cache=True, **{cache_kw: cache})
                cache.reorder_cache(torch.tensor(row_group, device=self.device))  # (G, ...) -> (B, ...)
                output = self.model.generate(
                    input_ids=input_ids.to(self.device),
                    attention_mask=attention_mask.to(self.device),
                    stopping_criteria=StoppingCriteriaList([criteria]),
                    **{cache_kw: cache},
                    **kwargs,
                )
        except torch.OutOfMemoryError:
            log.warning("Out of memory with shared prefixes at batch %d; retrying without", len(prompts))
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            return self._generate_chunk(prompts, kwargs, stop)
        seconds = time.perf_counter() - start
        results = [self._finish(output[r, width:].tolist(), len(ids), stop, criteria.finished_at.get(r))
                   for r, ids in enumerate(prompts)]
        self.stats.calls += 1
        self.stats.prompts += len(prompts)
        self.stats.prompt_tokens += sum(len(ids) for ids in prompts)
        self.stats.shared_prefix_tokens += sum((len(rows) - 1) * p for rows, p in groups)
        self.stats.new_tokens += sum(r.new_tokens for r in results)
        self.stats.seconds += seconds
        return results

    def _finish(self, new: list[int], prompt_tokens: int, stop: list[str], stopped_after: int | None) -> GenerationResult:
        """Trim one row's new tokens at eos / stop string / padding and decode it."""
        count, reason = len(new), "length"
        for position, token in enumerate(new):
            if token in self.eos_ids:
                count, reason = position + 1, "eos"
                break
        if stopped_after is not None and stopped_after < count:
            count, reason = stopped_after, "stop"
        text = self.tokenizer.decode(new[:count], skip_special_tokens=True)
        text, hit = cut_at_stop(text, stop)
        if hit:
            reason = "stop"
        return GenerationResult(text=text.strip(), prompt_tokens=prompt_tokens, new_tokens=count, finish_reason=reason)

    # ---------------------------------------------------------------- streaming
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
        """Yield the answer in pieces as the model writes it.

        ``"".join(pieces)`` equals ``generate([messages], ...)[0].text`` for the same
        settings. Closing the iterator early (a user pressing stop) ends the
        generation thread at its next token.
        """
        stop = [s for s in (stop or []) if s]
        ids = self._fit(self.encode(self.format_prompt(messages)), max_new_tokens)
        kwargs = self._generation_kwargs(max_new_tokens, temperature, top_p, repetition_penalty, do_sample)
        streamer = _TokenQueue()
        cancel = threading.Event()
        criteria = _StopStrings(self.tokenizer, stop, prompt_width=len(ids), cancel=cancel)
        failure: list[BaseException] = []

        def run() -> None:
            try:
                with eval_mode(self.model), torch.inference_mode():
                    self.model.generate(
                        input_ids=torch.tensor([ids], dtype=torch.long, device=self.device),
                        attention_mask=torch.ones((1, len(ids)), dtype=torch.long, device=self.device),
                        stopping_criteria=StoppingCriteriaList([criteria]),
                        streamer=streamer,
                        **kwargs,
                    )
            except BaseException as exc:  # handed to the consumer thread and raised there
                failure.append(exc)
            finally:
                streamer.end()

        start = time.perf_counter()
        thread = threading.Thread(target=run, name="memchat-stream", daemon=True)
        thread.start()
        tokens: list[int] = []
        emitted = ""
        try:
            for piece in streamer:
                tokens.extend(piece)
                if any(t in self.eos_ids for t in piece):
                    tokens = tokens[: next(i for i, t in enumerate(tokens) if t in self.eos_ids) + 1]
                text = self.tokenizer.decode(tokens, skip_special_tokens=True)
                visible, hit = cut_at_stop(text, stop)
                visible = visible.lstrip()
                safe = visible if hit else hold_back(visible, stop)
                if len(safe) > len(emitted) and safe.startswith(emitted):
                    yield safe[len(emitted) :]
                    emitted = safe
                if hit or tokens and tokens[-1] in self.eos_ids:
                    break
            if failure:
                raise failure[0]
            final, _ = cut_at_stop(self.tokenizer.decode(tokens, skip_special_tokens=True), stop)
            final = final.strip()
            if len(final) > len(emitted) and final.startswith(emitted):
                yield final[len(emitted) :]
        finally:
            cancel.set()
            thread.join()
            self.stats.calls += 1
            self.stats.prompts += 1
            self.stats.prompt_tokens += len(ids)
            self.stats.new_tokens += len(tokens)
            self.stats.seconds += time.perf_counter() - start

    # --------------------------------------------------------------- scoring
    def loglikelihood(self, context_messages: Messages, continuation: str) -> float:
        """Sum of log p(continuation tokens | formatted prompt of context_messages), natural log."""
        return self.loglikelihoods([(context_messages, continuation)])[0]

    def loglikelihoods(self, requests: Sequence[tuple[Messages, str]], *, batch_size: int = 8) -> list[float]:
        """``loglikelihood`` for many (messages, continuation) pairs, batched; input order kept."""
        pairs = []
        for messages, continuation in requests:
            prompt = self.format_prompt(messages)
            context = self.encode(prompt)
            whole = self.encode(prompt + continuation)
            if whole[: len(context)] == context:  # usual case: the boundary does not merge tokens
                cont = whole[len(context) :]
            else:
                cont = self.tokenizer(continuation, add_special_tokens=False)["input_ids"]
            if self.max_positions and len(context) + len(cont) > self.max_positions:
                context = context[-max(1, self.max_positions - len(cont)) :]
            pairs.append((context, cont))
        scores = [0.0] * len(pairs)
        order = sorted(range(len(pairs)), key=lambda i: -(len(pairs[i][0]) + len(pairs[i][1])))
        batch_size = max(1, batch_size)
        for start in range(0, len(order), batch_size):
            chunk = [i for i in order[start : start + batch_size] if pairs[i][1]]  # empty continuation: 0.0
            if not chunk:
                continue
            rows = [pairs[i][0] + pairs[i][1] for i in chunk]
            width = max(len(r) for r in rows)
            input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
            attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
            for row, ids in enumerate(rows):  # right padding: positions 0..n-1 as in an unpadded pass
                input_ids[row, : len(ids)] = torch.tensor(ids)
                attention_mask[row, : len(ids)] = 1
            with eval_mode(self.model), torch.inference_mode():
                logits = self.model(
                    input_ids=input_ids.to(self.device), attention_mask=attention_mask.to(self.device)
                ).logits  # (B, T, V)
            for row, index in enumerate(chunk):
                context, cont = pairs[index]
                first = len(context) - 1  # logits at position t predict token t + 1
                step_logits = logits[row, first : first + len(cont)].float()  # (len(cont), V)
                logprobs = torch.log_softmax(step_logits, dim=-1)
                targets = torch.tensor(cont, device=logprobs.device)
                scores[index] = float(logprobs.gather(1, targets[:, None]).sum())
        return scores


    def prompt_logprobs(self, messages: Messages, *, continue_final_message: bool = False) -> tuple[list[int], list[float | None]]:
        """Token ids of the formatted prompt and, per token, log p(token | the tokens before it).

        The first token has no prediction (None). With ``continue_final_message`` the last
        message (an assistant turn) is appended to the prompt of the ones before it as raw
        text, exactly as ``loglikelihoods`` joins a continuation, so summing the tail of
        the list gives the same score. This is the server side of vLLM's
        ``prompt_logprobs`` extension (``memchat.serve``).
        """
        if continue_final_message:
            if len(messages) < 2 or messages[-1].get("role") != "assistant":
                raise ValueError("continue_final_message needs a conversation ending in an assistant message")
            text = self.format_prompt(messages[:-1]) + messages[-1]["content"]
        else:
            text = self.format_prompt(messages)
        ids = self.encode(text)
        if self.max_positions and len(ids) > self.max_positions:
            ids = ids[-self.max_positions :]
        if not ids:
            return [], []
        with eval_mode(self.model), torch.inference_mode():
            logits = self.model(input_ids=torch.tensor([ids], device=self.device)).logits[0].float()  # (T, V)
        logprobs = torch.log_softmax(logits[:-1], dim=-1)  # row t predicts token t + 1
        picked = logprobs.gather(1, torch.tensor(ids[1:], device=logprobs.device)[:, None])[:, 0].tolist()
        return ids, [None, *picked]


# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------
SHARED_PREFIX_MIN_TOKENS = 32  # shorter common prefixes (a chat template's header) save too little to regroup for


def _prefix_groups(prompts: list[list[int]], min_tokens: int) -> list[tuple[list[int], int]]:
    """Rows (indices) grouped with their neighbours while they share >= min_tokens leading tokens.

    Returns [(rows, prefix length)]; each prefix leaves every row of its group at least one
    token of its own (the model must read one to predict the next), and a lone row's prefix
    is all its tokens but the last. Expects ``prompts``
    sorted so that rows with a common prefix are adjacent (lexicographic order).
    """
    groups: list[tuple[list[int], int]] = []
    rows, shared = [0], len(prompts[0])
    for i in range(1, len(prompts)):
        common = 0
        for a, b in zip(prompts[rows[0]], prompts[i]):
            if a != b or common >= shared:
                break
            common += 1
        if common >= min_tokens:
            rows.append(i)
            shared = common
        else:
            groups.append((rows, shared))
            rows, shared = [i], len(prompts[i])
    groups.append((rows, shared))
    # A lone row's "prefix" is all but its last token: prefilled once as it would be anyway.
    return [(rows, min(p, min(len(prompts[r]) for r in rows) - 1)) for rows, p in groups]


def cache_keyword(model) -> str:
    """``cache`` in transformers releases that renamed ``past_key_values``, else the old name."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


class eval_mode:
    """eval() for the duration (no dropout), then the caller's mode back (a model mid-training)."""

    def __init__(self, model):
        self.model = model

    def __enter__(self):
        self.was_training = self.model.training
        self.model.eval()

    def __exit__(self, *exc):
        if self.was_training:
            self.model.train()


class _StopStrings(StoppingCriteria):
    """Per-row stop on any of ``stop`` in the new text; also a cancel switch for streaming.

    Records, per row, how many new tokens had been produced when it stopped.
    """

    def __init__(self, tokenizer, stop: list[str], prompt_width: int, cancel: threading.Event | None = None):
        self.tokenizer = tokenizer
        self.stop = stop
        self.prompt_width = prompt_width
        self.cancel = cancel
        self.window = max((len(s) for s in stop), default=0) + 4  # tokens: every token is >= 1 char, +slack
        self.finished_at: dict[int, int] = {}

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        if self.cancel is not None and self.cancel.is_set():
            return done.fill_(True)
        if not self.stop:
            return done
        length = input_ids.shape[1]
        begin = max(self.prompt_width, length - self.window)
        for row in range(input_ids.shape[0]):
            if row in self.finished_at:
                done[row] = True
                continue
            tail = self.tokenizer.decode(input_ids[row, begin:], skip_special_tokens=True)
            if any(s in tail for s in self.stop):
                self.finished_at[row] = length - self.prompt_width
                done[row] = True
        return done


class _TokenQueue(BaseStreamer):
    """Streamer that hands token ids (not text) to the consuming thread.

    Decoding is left to the consumer, which decodes the whole answer so far each
    time: the pieces then concatenate exactly to the full decode, whatever the
    tokenizer does at piece boundaries.
    """

    _END = object()

    def __init__(self):
        self.queue: queue.Queue = queue.Queue()
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # generate() first hands over the prompt
            self.prompt_seen = True
            return
        self.queue.put(value.reshape(-1).tolist())

    def end(self) -> None:
        self.queue.put(self._END)

    def __iter__(self):
        while (item := self.queue.get()) is not self._END:
            yield item


def cut_at_stop(text: str, stop: Sequence[str]) -> tuple[str, bool]:
    cut = min((i for i in (text.find(s) for s in stop) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


def hold_back(text: str, stop: Sequence[str]) -> str:
    """The part of a growing answer safe to show now: not trailing whitespace (may be the
    answer's end), not a half-decoded character, not a possible start of a stop string."""
    text = text.rstrip()
    while text.endswith("\ufffd"):
        text = text[:-1]
    for s in stop:
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:k]):
                text = text[:-k]
                break
    return text.rstrip()
