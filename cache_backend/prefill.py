"""Chunked prefill that can be cancelled within about a second and resumed where it stopped.

A job's `cancel` flag is checked between prefill chunks, and also before each layer where the
attention is cpu_attention's (the CPU path). Chunks are sized from the measured prefill speed so
that the time between two checks is about `chunk_seconds` (never below MIN_CHUNK tokens), so a
client that goes away stops costing compute within about a second. On the CPU that allows
512-token chunks at 12k tokens of context (73 tok/s there, against 40-45 with the ~30-token
chunks a check per chunk needed).

Prefill is resumable: a prefill that is cancelled (client gone, server stopping) offers what it
computed to the prefix cache as a "partial" snapshot, and so does a long prefill after
`checkpoint_seconds`, then after twice as long, and so on; the client's retry, or the same prompt
after a restart, restores it and prefills only the rest. The cache holds exactly the tokens fed,
so the result is the same as an unbroken prefill. Why not mlx-lm's `generate_step`: see engine.py.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import mlx.core as mx

from cache_backend import cpu_attention
from cache_backend.jobs import Job, Progress
from cache_backend.kv_arrays import DECODE_ROOM, reserve
from cache_backend.prefix_cache import PrefixCache

log = logging.getLogger("cache_backend.engine")


class Cancelled(Exception):
    pass


MIN_CHUNK = 16  # prompt tokens: the smallest prefill step, whatever the measured speed


def rewind(cache: list[Any], pos: int) -> bool:
    """Trim layers that a forward pass stopped between layers left ahead of ``pos``; False when a
    layer cannot be trimmed (then the cache is not a prefix of the prompt and must not be kept)."""
    for layer in cache:
        if not hasattr(layer, "offset"):
            return False  # recurrent state (SSM layers): cannot tell whether it took the chunk
        extra = layer.offset - pos
        if extra > 0:
            if not layer.is_trimmable():
                return False
            layer.trim(extra)
    return True


def check_cancel(job: Job) -> None:
    if job.cancel.is_set():
        raise Cancelled()


class ChunkedPrefill:
    """Feeds a prompt's unrestored tokens into its cache for the engine's worker."""

    def __init__(
        self,
        model: Any,
        prefix_cache: PrefixCache,
        max_chunk: int = 512,
        chunk_seconds: float = 1.0,
        checkpoint_seconds: float = 30.0,
    ) -> None:
        self.model = model
        self.prefix_cache = prefix_cache
        self.max_chunk = max(1, max_chunk)  # the largest chunk, for fast models
        self.chunk_seconds = chunk_seconds
        self.checkpoint_seconds = checkpoint_seconds

    def next_chunk(self, fed: int, seconds: float, previous: int, checks: int = 1) -> int:
        """The next chunk size: about `chunk_seconds` between two looks for a cancel, at the speed
        just measured; `checks` is how often the last pass looked (1, or once a layer where
        cpu_attention computed the attention).

        Grows at most 2x a step (the first chunks are small probes) and shrinks as attention
        over a longer context slows prefill down.
        """
        if seconds <= 0:
            return min(self.max_chunk, previous * 2)
        target = int(fed / seconds * self.chunk_seconds * max(1, checks))
        # Never below MIN_CHUNK: a chunk pays a fixed cost that grows with the context (on this
        # CPU ~0.3 s at 4k tokens), so 1-token chunks ran at 3 tok/s where 16-token ones run at 20.
        return max(min(MIN_CHUNK, self.max_chunk), min(self.max_chunk, previous * 2, target))

    def run(self, job: Job, cache: list[Any], start: int) -> mx.array:
        """Feed prompt[start:] in chunks (pausing at checkpoints); return the last token's logits.

        All but the last token go through in chunks whose logits are never evaluated (MLX is
        lazy, so the vocabulary projection is skipped); the last token alone yields the logits.
        Cancelled, it offers the cache (which holds exactly the tokens fed) as a partial snapshot.
        """
        tokens = job.prompt.tokens
        total = len(tokens)
        last = total - 1
        stops = sorted({p for p in self.prefix_cache.checkpoints(job.prompt, start) if start < p < total})
        pos = saved = start
        chunk = min(self.max_chunk, 32)
        t_saved = t_logged = time.monotonic()
        # Each periodic save doubles the wait for the next: a whole-snapshot save writes the whole
        # prefix (600 MB at 12k tokens of the bundled model), so fixed 30 s saves took CPU from the
        # prefill on 2 cores, while doubling still bounds what a crash loses to about half of the
        # work done. (The block store writes only the new blocks; the doubling costs it nothing.)
        interval = self.checkpoint_seconds
        checks = [0]  # cancel checks made inside the current forward pass
        in_pass = False

        def check() -> None:
            checks[0] += 1
            check_cancel(job)

        try:
            while pos < last:
                check_cancel(job)
                end = min(pos + chunk, last)
                for p in stops:
                    if pos < p < end:
                        end = p
                        break
                t = time.monotonic()
                reserve(cache, total + DECODE_ROOM)
                checks[0] = 0
                in_pass = True
                with cpu_attention.between_layers(check):
                    self.model(mx.array(tokens[pos:end])[None], cache=cache)
                    mx.eval([c.state for c in cache])
                in_pass = False
                now = time.monotonic()
                rate = (end - pos) / (now - t) if now > t else 0.0
                chunk = self.next_chunk(end - pos, now - t, chunk, checks[0])
                job.prefilled += end - pos
                pos = end
                progress = Progress(done=pos, total=total, tokens_per_s=rate)
                job.sink(progress)
                if now - t_logged >= 5.0:
                    t_logged = now
                    eta = progress.eta_s
                    log.info(
                        "request %s prefill %d/%d tokens, %.0f tok/s, ~%.0fs left",
                        job.request_id,
                        pos,
                        total,
                        rate,
                        eta if eta is not None else 0,
                    )
                if pos in stops:
                    self.prefix_cache.save(tokens[:pos], cache, "checkpoint")
                    saved, t_saved = pos, now
                elif now - t_saved >= interval:
                    self.prefix_cache.save(tokens[:pos], cache, "partial")
                    saved, t_saved = pos, now
                    interval *= 2
            check_cancel(job)
        except Cancelled:
            # Stopped inside a pass, some layers hold the chunk and some do not: keep the prefix
            # only when every layer can be trimmed back to `pos`.
            if pos > saved and (not in_pass or rewind(cache, pos)):
                self.prefix_cache.save(tokens[:pos], cache, "partial")
                log.info("request %s kept its partial prefill: %d of %d tokens", job.request_id, pos, total)
            raise
        reserve(cache, total + DECODE_ROOM)
        logits = self.model(mx.array(tokens[last:])[None], cache=cache)[:, -1, :]
        mx.eval(logits)
        job.prefilled += 1
        return logits
