"""The one thread that runs MLX: a FIFO of jobs, chunked prefill, decode, stop rules, cancellation.

Why one thread: MLX streams belong to the thread that created them, and the model and KV cache
are not safe to share, so every model call happens here and HTTP handlers only queue jobs and
read events. Requests are served in arrival order (never rejected for being busy). A job's
`cancel` flag is checked before every decode step, and within the prefill as prefill.py says.
The prompt cache comes from a `PrefixCache` (see prefix_cache.py): only the tokens it could not
restore are prefilled, by `ChunkedPrefill` (prefill.py), which also keeps what a cancelled
prefill computed.

Why not mlx-lm's `generate_step` / `stream_generate`: they prefill in fixed steps with only a
progress callback, so they cannot stop inside a prefill, keep what it computed, pause at the
snapshot points the prefix cache asks for, or size steps to a time budget; and their decode loop
has no place for forced tokens (a tool-call or JSON opening) or a wall-clock deadline. What fits
is reused: `make_sampler` for sampling, the mlx-lm cache classes and their trim functions. A
decode step runs in cpu_decode.py where it covers the model (float32 Llama on the CPU), else
through the model's own forward pass.
"""

from __future__ import annotations

import gc
import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

import mlx.core as mx
from mlx_lm.models.cache import can_trim_prompt_cache, make_prompt_cache, trim_prompt_cache
from mlx_lm.sample_utils import make_repetition_penalty, make_sampler

from cache_backend.cpu_decode import NumpyDecoder
from cache_backend.detok import IncrementalDetokenizer
from cache_backend.jobs import (
    Failed,
    Finished,
    Job,
    Started,
)
from cache_backend.metrics import RequestRecord, ServerMetrics
from cache_backend.output import Cause, OutputAssembler
from cache_backend.prefill import Cancelled, ChunkedPrefill, check_cancel
from cache_backend.prefix_cache import NoCache, PrefixCache, Restored
from cache_backend.prompt import RenderedPrompt
from cache_backend.structured import validate as validate_json

log = logging.getLogger("cache_backend.engine")


WARMUP_TOKENS = 128
# The tokens a repetition penalty looks back over, the prompt's last ones and then the answer's:
# Ollama's default. mlx-lm's 20 misses a repeated sentence longer than that (the bundled model
# looped on one of ~35 tokens).
REPETITION_WINDOW = 64

# What a job gets when the server stops before it is done: clients retry overloaded errors.
SHUTTING_DOWN = Failed("the server is shutting down; retry this request", error_type="overloaded_error")


class Engine:
    """Owns the model, the tokenizer's detokenizer and the MLX worker thread."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        prefix_cache: PrefixCache | None = None,
        *,
        prefill_chunk: int = 512,
        chunk_seconds: float = 1.0,
        checkpoint_seconds: float = 30.0,
        on_output: Callable[[str, list[int]], None] | None = None,
        metrics: ServerMetrics | None = None,
        decoder: NumpyDecoder | None = None,
    ) -> None:
        self.model = model
        self.decoder = decoder  # one decode step (cpu_decode.NumpyDecoder); None: the model's forward
        self.tokenizer = tokenizer
        self.prefix_cache = prefix_cache or NoCache()
        self.prefill = ChunkedPrefill(model, self.prefix_cache, prefill_chunk, chunk_seconds, checkpoint_seconds)
        self.on_output = on_output  # (generated text, its tokens): e.g. Renderer.remember_output
        self.metrics = metrics
        self.eos_ids = set(getattr(tokenizer, "eos_token_ids", None) or [])
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._thread = threading.Thread(target=self._loop, name="mlx-worker", daemon=True)
        self.busy = False
        self._current: Job | None = None
        self._stopping = threading.Event()
        self.resumed_prefills = 0  # requests that restored a partial prefill

    def start(self) -> None:
        self._thread.start()

    def begin_stop(self) -> None:
        """Cancel the running job (its prefill is kept) and refuse queued ones; safe in a signal handler."""
        self._stopping.set()
        current = self._current
        if current is not None:
            current.cancel.set()

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the worker thread (after `begin_stop`)."""
        self.begin_stop()
        self._queue.put(None)
        self._thread.join(timeout)

    def submit(self, job: Job) -> None:
        self._queue.put(job)

    @property
    def queued(self) -> int:
        return self._queue.qsize()

    @property
    def in_flight(self) -> int:
        """Requests queued or running."""
        return self.queued + (1 if self.busy else 0)

    # --- worker ---------------------------------------------------------------------------

    def _warmup(self) -> None:
        """A short forward pass and sample, so the first real request does not pay for setup.

        WARMUP_TOKENS positions, not a handful: BLAS sets up its threads and buffers at the first
        matrix product big enough to use them (+8-30 ms on the first warm turn after a restart,
        measured with a 3-token warm-up on the bench model)."""
        try:
            cache = make_prompt_cache(self.model)
            tokens = mx.arange(WARMUP_TOKENS)[None] % (getattr(self.tokenizer, "vocab_size", None) or WARMUP_TOKENS)
            logits = self.model(tokens, cache=cache)[:, -1, :]
            mx.eval(logits)
            logits = self._step(0, cache)
            logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
            mx.eval(make_sampler(1.0, top_p=0.9, min_p=0.05, top_k=5)(logprobs), make_sampler(0.0)(logprobs))
        except Exception:
            log.exception("warm-up failed (continuing)")

    def _step(self, tok: int, cache: list[Any]) -> mx.array:
        """Feed one token; its logits, evaluated."""
        if self.decoder is not None and self.decoder.covers(cache):
            return self.decoder(tok, cache)
        logits = self.model(mx.array([[tok]]), cache=cache)[:, -1, :]
        mx.eval(logits)
        return logits

    def _warm_start(self) -> None:
        try:
            self.prefix_cache.warm_start(
                self.model, should_stop=lambda: not self._queue.empty() or self._stopping.is_set()
            )
        except Exception:
            log.exception("warm start of the prefix cache failed (continuing; restores read from disk)")

    def _loop(self) -> None:
        self._warmup()
        self._warm_start()
        # What start-up made (model, tokenizer, the warm start's blocks) lives as long as the
        # process: out of the collector's sight, a full collection no longer walks it in the
        # middle of a request.
        gc.collect()
        gc.freeze()
        while True:
            job = self._queue.get()
            if job is None:
                return
            if self._stopping.is_set():
                job.sink(SHUTTING_DOWN)
                continue
            if job.cancel.is_set():
                log.info("request %s cancelled while queued", job.request_id)
                continue
            self.busy = True
            self._current = job
            self.prefix_cache.set_busy(True)
            outcome = "failed"
            try:
                outcome = self._run(job)
            except Cancelled:
                stopping = self._stopping.is_set()
                log.info(
                    "request %s %s after %.2fs: prompt=%d prefilled=%d output=%d",
                    job.request_id,
                    "stopped by the server shutdown" if stopping else "cancelled by the client",
                    time.monotonic() - job.created,
                    len(job.prompt.tokens),
                    job.prefilled,
                    job.generated,
                )
                outcome = "shutdown" if stopping else "cancelled"
                if stopping:
                    job.sink(SHUTTING_DOWN)
            except Exception as e:  # never let one request kill the worker
                log.exception("request %s failed", job.request_id)
                job.sink(Failed(f"{type(e).__name__}: {e}"))
            finally:
                self.prefix_cache.set_busy(False)
                self._record(job, outcome)
                self._current = None
                self.busy = False

    def _record(self, job: Job, outcome: str) -> None:
        if self.metrics is None:
            return
        queued = (job.started or time.monotonic()) - job.created
        self.metrics.record(
            RequestRecord(
                request_id=job.request_id,
                prompt=len(job.prompt.tokens),
                restored=job.restored,
                prefilled=job.prefilled,
                output=job.generated,
                ttft_s=None if job.ttft_s is None else round(job.ttft_s, 4),
                queued_s=round(queued, 4),
                resumed=job.resumed,
                outcome=outcome,
            )
        )

    def _restore(self, prompt: RenderedPrompt) -> Restored:
        restored = self.prefix_cache.restore(self.model, prompt)
        n = restored.n_restored
        if n >= len(prompt.tokens):
            extra = n - len(prompt.tokens) + 1
            if can_trim_prompt_cache(restored.cache):
                trim_prompt_cache(restored.cache, extra)
                restored = Restored(restored.cache, n - extra, restored.resumed)
            else:
                restored = Restored(make_prompt_cache(self.model), 0)
        return restored

    def _run(self, job: Job) -> str:
        """Serve one job; returns its stop reason."""
        t0 = job.started = time.monotonic()
        p = job.params
        prompt = job.prompt.tokens
        restored = self._restore(job.prompt)
        t_restored = time.monotonic()
        cache, n_restored = restored.cache, restored.n_restored
        job.restored, job.resumed = n_restored, restored.resumed
        if restored.resumed:
            self.resumed_prefills += 1
            log.info(
                "request %s resumes a partial prefill: %d of %d tokens restored",
                job.request_id,
                n_restored,
                len(prompt),
            )
        job.sink(Started(prompt_tokens=len(prompt), n_restored=n_restored))
        deadline = t0 + p.deadline_s if p.deadline_s else None

        logits = self.prefill.run(job, cache, n_restored)
        t_fed = time.monotonic()
        self.prefix_cache.save(prompt, cache, "prompt")
        t_prefill = time.monotonic()

        assembler = OutputAssembler(
            emit=job.sink,
            stop_sequences=p.stop_sequences,
            tool_syntax=p.tool_syntax,
            json_mode=p.json_schema is not None,
        )
        sampler = make_sampler(p.temperature, top_p=p.top_p, min_p=p.min_p, top_k=p.top_k)
        penalize = None
        if p.repetition_penalty != 1.0:
            penalize = make_repetition_penalty(p.repetition_penalty, REPETITION_WINDOW)
        detok = IncrementalDetokenizer(self.tokenizer)
        forced = iter(p.forced_tokens)
        out: list[int] = []
        fed = 0  # how many of `out` went through the model (the last one sampled usually did not)
        pieces: list[str] = []
        ttft = None
        cause: Cause = "max_tokens"
        while True:
            check_cancel(job)
            if deadline is not None and time.monotonic() > deadline:
                cause = "deadline"
                break
            tok = next(forced, None)
            if tok is None:
                if penalize is not None:
                    recent = (prompt[-REPETITION_WINDOW:] + out[-REPETITION_WINDOW:])[-REPETITION_WINDOW:]
                    logits = penalize(mx.array(recent), logits)
                logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
                tok = int(sampler(logprobs).item())
            out.append(tok)
            job.generated = len(out)
            if ttft is None:
                ttft = job.ttft_s = time.monotonic() - job.created
            if tok in self.eos_ids:
                cause = "eos"
                break
            piece = detok.add(tok)
            pieces.append(piece)
            if assembler.feed(piece):
                cause = assembler.cause or "eos"
                break
            if len(out) >= p.max_tokens:
                cause = "context_window" if p.context_cut else "max_tokens"
                break
            logits = self._step(tok, cache)
            fed += 1
        if cause not in ("stop_sequence", "json_complete"):  # text held back may still be released
            piece = detok.finish()
            pieces.append(piece)
            assembler.feed(piece)
            if self.on_output is not None:
                self.on_output("".join(pieces), out[:-1] if cause == "eos" else list(out))
        stop_reason = assembler.finish(cause)
        held = prompt + out[:fed]  # the cache holds exactly the tokens fed back to the model
        self.prefix_cache.save(held, cache, "generation")

        if p.json_schema is not None:
            problem = validate_json(p.json_schema, assembler.json_text or "")
            log.info(
                "request %s structured output %s", job.request_id, "valid" if problem is None else f"invalid: {problem}"
            )
        t1 = time.monotonic()
        n_dec = max(len(out) - 1, 0)
        log.info(
            "request %s prompt=%d restored=%d prefilled=%d ttft=%s output=%d stop=%s prefill=%.2fs decode=%.1ftok/s "
            "queued=%.2fs restore=%.3fs save=%.3fs",
            job.request_id,
            len(prompt),
            n_restored,
            len(prompt) - n_restored,
            f"{ttft:.3f}s" if ttft is not None else "-",
            len(out),
            stop_reason,
            t_prefill - t0,
            n_dec / (t1 - t_prefill) if t1 > t_prefill and n_dec else 0.0,
            t0 - job.created,
            t_restored - t0,
            t_prefill - t_fed,
        )
        if self.metrics is not None:
            self.metrics.observe(len(prompt), n_restored, len(out), ttft)
        job.sink(
            Finished(
                stop_reason=stop_reason,
                stop_sequence=assembler.stop_sequence if stop_reason == "stop_sequence" else None,
                prompt_tokens=len(prompt),
                n_restored=n_restored,
                output_tokens=len(out),
                ttft_s=ttft,
                blocks=assembler.blocks,
            )
        )
        return stop_reason
