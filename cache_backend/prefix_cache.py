"""The seam between the engine and a prefix KV cache: a small interface plus `NoCache`.

Why a separate module: the engine must not know how snapshots are kept (memory, disk, LRU,
trimming). It asks for a restored cache for a prompt, prefills only the rest, and offers the
cache back at points the cache asked for, after the prompt, and after generation. A real cache
implements `PrefixCache`; `NoCache` always starts from scratch.

Contract (all calls happen on the engine's single MLX worker thread):
1. `restore(model, prompt)` returns `Restored(cache, n)`: an mlx-lm prompt cache (a list of
   per-layer caches as made by `make_prompt_cache`) that holds exactly `prompt.tokens[:n]`.
   `n` must be < len(prompt.tokens) (at least one token has to be fed to get logits); if an
   implementation returns `n == len(tokens)`, the engine trims one token when the cache is
   trimmable and otherwise starts from scratch.
2. `checkpoints(prompt, n)` names positions p (n < p < len(tokens)) where prefill should pause
   and call `save(tokens[:p], cache, "checkpoint")`, e.g. the end of system + tools, so that
   caches that cannot be trimmed (sliding window, SSM) still get a snapshot at a boundary.
3. `save(tokens, cache, kind)` is offered the live cache; `tokens` are exactly the tokens it
   holds. kind is "checkpoint" (mid-prefill, at a position `checkpoints` named), "partial" (a
   prefill cut short by a cancel or a shutdown, or a periodic save during a long prefill: what a
   retry resumes from), "prompt" (after the whole prompt) or "generation" (after decoding:
   prompt + every generated token that was fed back). For "checkpoint", "partial" and "prompt"
   the engine may keep appending to the same cache afterwards, so an implementation that wants
   to keep it must snapshot (copy, or keep arrays that later appends do not overwrite). After
   "generation" (and after a "partial" save on cancel) the engine drops its reference.
4. `Restored.resumed` is True when the restored snapshot was a "partial" one: the request
   resumes a prefill that an earlier request began.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from cache_backend.prompt import RenderedPrompt

SaveKind = Literal["checkpoint", "partial", "prompt", "generation"]


@dataclass
class Restored:
    """A prompt cache holding the first `n_restored` tokens of the prompt."""

    cache: list[Any]
    n_restored: int
    resumed: bool = False


class PrefixCache(ABC):
    """What the engine needs from a prefix cache; see the module docstring for the contract."""

    @abstractmethod
    def restore(self, model: Any, prompt: RenderedPrompt) -> Restored: ...

    def checkpoints(self, prompt: RenderedPrompt, n_restored: int) -> Sequence[int]:
        return ()

    def save(self, tokens: Sequence[int], cache: list[Any], kind: SaveKind) -> None:
        return None

    def set_busy(self, busy: bool) -> None:
        """The engine starts (True) or ends (False) a request: background work may wait meanwhile."""
        return None

    def warm_start(self, model: Any, should_stop: Callable[[], bool]) -> None:
        """Load back what a restart left on disk before the first request asks for it (the engine's
        worker runs this once at start; `should_stop` turns true when a request is waiting)."""
        return None

    def describe(self) -> str:
        return type(self).__name__

    def stats(self) -> dict[str, Any]:
        """Figures for `/v1/cache/stats` and `/metrics` (names are the keys); none by default."""
        return {}

    @property
    def disk_dir(self) -> Path | None:
        """The folder that holds this cache's files, if it keeps any (the token logs go beside them)."""
        return None

    def flush(self) -> None:
        """Make every snapshot offered so far durable (a no-op for a memory-only cache)."""
        return None

    def close(self) -> None:
        """Flush, then release files and threads; the engine has stopped."""
        return None


class StoredCache(PrefixCache):
    """What the block and the snapshot cache share: a `store` whose optional disk tier
    (`store.disk`) is flushed and closed through it, and the same storage figures."""

    store: Any

    def flush(self) -> None:
        if self.store.disk is not None:
            self.store.disk.flush()

    def close(self) -> None:
        if self.store.disk is not None:
            self.store.disk.close()

    def storage_stats(self, memory_bytes: int, unique: int, logical: int) -> dict[str, Any]:
        """Figures both stores report: `unique` distinct cached tokens (a trie's count), `logical`
        what whole copies of every stored sequence would hold."""
        disk = self.store.disk
        return {
            "unique_tokens": unique,
            "kv_bytes_per_token": round(memory_bytes / unique) if unique else 0,
            "dedup_ratio": round(logical / unique, 3) if unique else 1.0,
            "memory_bytes": memory_bytes,
            "memory_budget_bytes": self.store.memory_budget,
            "disk_bytes": disk.disk_bytes if disk else 0,
            # Evicted from memory or not yet written, held until the file is durable: RAM on top
            # of memory_budget_bytes.
            "disk_pending_bytes": disk.pending_bytes if disk else 0,
            "disk_bytes_written": disk.bytes_written if disk else 0,
            # Request number (1 = the first since start) -> bytes its saves caused to be written.
            "disk_bytes_written_by_request": disk.written_by_request.snapshot() if disk else {},
            "bad_files_removed": disk.removed_bad if disk else 0,
        }


def system_prefix_checkpoint(prompt: RenderedPrompt, n_restored: int) -> tuple[int, ...]:
    """The end of system + tools, when the prefill will pass it: what every later request of any
    conversation shares, so both stores snapshot there (and untrimmable caches can only reuse
    whole snapshots)."""
    if n_restored < prompt.prefix_end < len(prompt.tokens):
        return (prompt.prefix_end,)
    return ()


def protected_length(prefix_end: int, saved: int) -> int:
    """How many leading tokens of a save of `saved` tokens are the system + tools prefix."""
    return prefix_end if 0 < prefix_end <= saved else 0


class NoCache(PrefixCache):
    """Never restores anything: every request prefills its whole prompt."""

    def restore(self, model: Any, prompt: RenderedPrompt) -> Restored:
        from mlx_lm.models.cache import make_prompt_cache

        return Restored(cache=make_prompt_cache(model), n_restored=0)
