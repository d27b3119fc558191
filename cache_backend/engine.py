"""The one thread that runs MLX: a FIFO of jobs, chunked prefill, decode, stop rules, cancellation.

Why one thread: MLX streams belong to the thread that created them, and the model and KV cache
are not safe to share, so every model call happens here and HTTP handlers only queue jobs and
read events. Requests are served in arrival order (never rejected for being busy). A job's
`cancel` flag is checked between prefill chunks and before every decode step, so a client that
goes away stops costing compute within one step. The prompt cache comes from a `PrefixCache`
(see prefix_cache.py): only the tokens it could not restore are prefilled.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx
from mlx_lm.models.cache import can_trim_prompt_cache, make_prompt_cache, trim_prompt_cache
from mlx_lm.sample_utils import make_sampler

from cache_backend.detok import IncrementalDetokenizer
from cache_backend.metrics import ServerMetrics
from cache_backend.output import Cause, OutputAssembler, StopReason
from cache_backend.prefix_cache import NoCache, PrefixCache, Restored
from cache_backend.render import RenderedPrompt
from cache_backend.structured import validate as validate_json
from cache_backend.toolcalls import ToolCallSyntax

log = logging.getLogger("cache_backend.engine")


@dataclass(frozen=True)
class GenerationParams:
    max_tokens: int
    temperature: float = 1.0
    top_p: float | None = None
    top_k: int | None = None
    stop_sequences: tuple[str, ...] = ()
    tool_syntax: ToolCallSyntax | None = None
    json_schema: dict[str, Any] | None = None
    deadline_s: float | None = None  # wall-clock budget for the whole job once it starts
    forced_tokens: tuple[int, ...] = ()  # fed through the model as if sampled, before sampling
    fail_after_tokens: int | None = None  # test-only: raise after this many output tokens


@dataclass(frozen=True)
class Started:
    """The worker picked the job up; the prefix cache restored `n_restored` of `prompt_tokens`."""

    prompt_tokens: int
    n_restored: int


@dataclass(frozen=True)
class Finished:
    stop_reason: StopReason
    stop_sequence: str | None
    prompt_tokens: int
    n_restored: int
    output_tokens: int
    ttft_s: float | None
    blocks: list[dict[str, Any]]


@dataclass(frozen=True)
class Failed:
    message: str


Event = Started | Finished | Failed | dict  # dicts are wire-shaped content block events


class Cancelled(Exception):
    pass


@dataclass
class Job:
    prompt: RenderedPrompt
    params: GenerationParams
    sink: Callable[[Event], None]
    request_id: str = ""
    cancel: threading.Event = field(default_factory=threading.Event)
    created: float = field(default_factory=time.monotonic)
    prefilled: int = 0  # progress, for logs: prompt tokens fed so far (restored ones excluded)
    generated: int = 0  # output tokens so far


class Engine:
    """Owns the model, the tokenizer's detokenizer and the MLX worker thread."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        prefix_cache: PrefixCache | None = None,
        *,
        prefill_chunk: int = 512,
        test_prefill_delay: float = 0.0,
        on_output: Callable[[str, list[int]], None] | None = None,
        metrics: ServerMetrics | None = None,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.prefix_cache = prefix_cache or NoCache()
        self.prefill_chunk = max(1, prefill_chunk)
        self.test_prefill_delay = test_prefill_delay
        self.on_output = on_output  # (generated text, its tokens): e.g. Renderer.remember_output
        self.metrics = metrics
        self.eos_ids = set(getattr(tokenizer, "eos_token_ids", None) or [])
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._thread = threading.Thread(target=self._loop, name="mlx-worker", daemon=True)
        self.busy = False

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._queue.put(None)
        self._thread.join(timeout)

    def submit(self, job: Job) -> None:
        self._queue.put(job)

    @property
    def queued(self) -> int:
        return self._queue.qsize()

    # --- worker ---------------------------------------------------------------------------

    def _warmup(self) -> None:
        """One tiny forward pass and sample, so the first real request does not pay for setup."""
        try:
            cache = make_prompt_cache(self.model)
            logits = self.model(mx.array([[0, 1, 2]]), cache=cache)[:, -1, :]
            logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
            mx.eval(make_sampler(1.0, top_p=0.9, top_k=5)(logprobs), make_sampler(0.0)(logprobs))
        except Exception:
            log.exception("warm-up failed (continuing)")

    def _loop(self) -> None:
        self._warmup()
        while True:
            job = self._queue.get()
            if job is None:
                return
            if job.cancel.is_set():
                log.info("request %s cancelled while queued", job.request_id)
                continue
            self.busy = True
            try:
                self._run(job)
            except Cancelled:
                log.info(
                    "request %s cancelled by the client after %.2fs: prompt=%d prefilled=%d output=%d",
                    job.request_id, time.monotonic() - job.created, len(job.prompt.tokens), job.prefilled, job.generated,
                )
            except Exception as e:  # never let one request kill the worker
                log.exception("request %s failed", job.request_id)
                job.sink(Failed(f"{type(e).__name__}: {e}"))
            finally:
                self.busy = False

    def _check(self, job: Job) -> None:
        if job.cancel.is_set():
            raise Cancelled()

    def _restore(self, prompt: RenderedPrompt) -> Restored:
        restored = self.prefix_cache.restore(self.model, prompt)
        n = restored.n_restored
        if n >= len(prompt.tokens):
            extra = n - len(prompt.tokens) + 1
            if can_trim_prompt_cache(restored.cache):
                trim_prompt_cache(restored.cache, extra)
                restored = Restored(restored.cache, n - extra)
            else:
                restored = Restored(make_prompt_cache(self.model), 0)
        return restored

    def _prefill(self, job: Job, cache: list[Any], start: int) -> mx.array:
        """Feed prompt[start:] in chunks (pausing at checkpoints); return the last token's logits.

        All but the last token go through in chunks whose logits are never evaluated (MLX is
        lazy, so the vocabulary projection is skipped); the last token alone yields the logits.
        """
        tokens = job.prompt.tokens
        last = len(tokens) - 1
        stops = sorted({p for p in self.prefix_cache.checkpoints(job.prompt, start) if start < p < len(tokens)})
        pos = start
        while pos < last:
            self._check(job)
            end = min(pos + self.prefill_chunk, last)
            for p in stops:
                if pos < p < end:
                    end = p
                    break
            self.model(mx.array(tokens[pos:end])[None], cache=cache)
            mx.eval([c.state for c in cache])
            job.prefilled += end - pos
            pos = end
            if pos in stops:
                self.prefix_cache.save(tokens[:pos], cache, "checkpoint")
            if self.test_prefill_delay:
                time.sleep(self.test_prefill_delay)
        self._check(job)
        logits = self.model(mx.array(tokens[last:])[None], cache=cache)[:, -1, :]
        mx.eval(logits)
        job.prefilled += 1
        return logits

    def _run(self, job: Job) -> None:
        t0 = time.monotonic()
        p = job.params
        prompt = job.prompt.tokens
        restored = self._restore(job.prompt)
        cache, n_restored = restored.cache, restored.n_restored
        job.sink(Started(prompt_tokens=len(prompt), n_restored=n_restored))
        deadline = t0 + p.deadline_s if p.deadline_s else None

        logits = self._prefill(job, cache, n_restored)
        self.prefix_cache.save(prompt, cache, "prompt")
        t_prefill = time.monotonic()

        assembler = OutputAssembler(
            emit=job.sink, stop_sequences=p.stop_sequences, tool_syntax=p.tool_syntax, json_mode=p.json_schema is not None
        )
        sampler = make_sampler(p.temperature if p.temperature is not None else 1.0, top_p=p.top_p or 0.0, top_k=p.top_k or 0)
        detok = IncrementalDetokenizer(self.tokenizer)
        forced = list(p.forced_tokens)
        out: list[int] = []
        pieces: list[str] = []
        ttft = None
        cause: Cause = "max_tokens"
        while True:
            self._check(job)
            if deadline is not None and time.monotonic() > deadline:
                cause = "deadline"
                break
            if forced:
                tok = forced.pop(0)
            else:
                logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
                tok = int(sampler(logprobs).item())
            out.append(tok)
            job.generated = len(out)
            if ttft is None:
                ttft = time.monotonic() - job.created
            if p.fail_after_tokens is not None and len(out) > p.fail_after_tokens:
                raise RuntimeError(f"test-induced failure after {p.fail_after_tokens} output tokens")
            if tok in self.eos_ids:
                cause = "eos"
                break
            piece = detok.add(tok)
            pieces.append(piece)
            if assembler.feed(piece):
                cause = assembler.cause or "eos"
                break
            if len(out) >= p.max_tokens:
                cause = "max_tokens"
                break
            logits = self.model(mx.array([[tok]]), cache=cache)[:, -1, :]
            mx.eval(logits)
        if cause not in ("stop_sequence", "json_complete"):
            piece = detok.finish()
            pieces.append(piece)
            assembler.feed(piece)
            if self.on_output is not None:
                self.on_output("".join(pieces), out[:-1] if cause == "eos" else list(out))
        stop_reason = assembler.finish(cause)
        held = prompt + out[:-1]  # the last token was sampled but never fed back
        self.prefix_cache.save(held, cache, "generation")

        if p.json_schema is not None:
            problem = validate_json(p.json_schema, assembler.json_text or "")
            log.info("request %s structured output %s", job.request_id, "valid" if problem is None else f"invalid: {problem}")
        t1 = time.monotonic()
        n_dec = max(len(out) - 1, 0)
        log.info(
            "request %s prompt=%d restored=%d prefilled=%d ttft=%s output=%d stop=%s prefill=%.2fs decode=%.1ftok/s queued=%.2fs",
            job.request_id, len(prompt), n_restored, len(prompt) - n_restored,
            f"{ttft:.3f}s" if ttft is not None else "-", len(out), stop_reason, t_prefill - t0,
            n_dec / (t1 - t_prefill) if t1 > t_prefill and n_dec else 0.0, t0 - job.created,
        )
        if self.metrics is not None:
            self.metrics.observe(len(prompt), n_restored, len(out), ttft)
        job.sink(Finished(
            stop_reason=stop_reason,
            stop_sequence=assembler.stop_sequence if stop_reason == "stop_sequence" else None,
            prompt_tokens=len(prompt),
            n_restored=n_restored,
            output_tokens=len(out),
            ttft_s=ttft,
            blocks=assembler.blocks,
        ))
