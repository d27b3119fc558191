"""The engine's prefix cache on KV blocks (kv_blocks.py, kv_block_files.py) behind the PrefixCache seam.

The same snapshot points as the snapshot cache (end of system + tools, end of prompt, after
generation, partial prefills), but each save stores only the blocks that are new, and a lookup
walks block keys instead of comparing the prompt with every stored snapshot. The cache the last
request ended with is kept as it is: the next turn of that conversation continues it without a
copy (rewound to where the prompts diverge), and any other prompt reuses its memory for the
cache it assembles from blocks (no fresh allocation, which costs page faults here). Used for models
whose caches are all plain `KVCache` layers; the server falls back to `SnapshotCache` otherwise.

A restart would otherwise read every block of the next turn from disk while the user waits (at
this machine's ~0.7 GB/s, that was 3x an in-memory warm turn). So the disk tier records the
conversations served last, and at start the worker loads them back, newest first, within the
memory budget, and makes the newest the live cache again: the next turn continues it as if the
server had never stopped. It gives way to a request that arrives meanwhile (between two
conversations).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from mlx_lm.models.cache import make_prompt_cache, trim_prompt_cache

from cache_backend.kv_arrays import DECODE_ROOM
from cache_backend.kv_block_files import BlockFiles
from cache_backend.kv_block_keys import DEFAULT_BLOCK_TOKENS, Block, Match, chain_seed
from cache_backend.kv_blocks import BlockStore
from cache_backend.kv_files import model_fingerprint, weight_hashes_path
from cache_backend.prefix_cache import (
    Restored,
    SaveKind,
    StoredCache,
    protected_length,
    system_prefix_checkpoint,
)
from cache_backend.prompt import RenderedPrompt
from cache_backend.token_prefix import common_prefix_len

RECENT_CONVERSATIONS = 8  # the conversations a restart loads back, at most (within the memory budget)
log = logging.getLogger("ccwarm.block_cache")


@dataclass
class WarmStart:
    """What the start-up load of recent conversations did (`state`: off, waiting, running, done,
    or stopped when a request came first)."""

    state: str = "off"
    conversations: int = 0
    tokens: int = 0
    bytes: int = 0
    seconds: float = 0.0


class BlockCache(StoredCache):
    def __init__(
        self,
        memory_budget: int,
        disk_dir: Path | None = None,
        disk_budget: int = 0,
        model_dir: Path | None = None,
        block_size: int = DEFAULT_BLOCK_TOKENS,
        fingerprint: str | None = None,
    ) -> None:
        if block_size < 16:
            raise ValueError(f"block size {block_size} is too small (16 tokens at least)")
        disk = None
        if fingerprint is None:
            fingerprint = (
                model_fingerprint(model_dir, weight_hashes_path(disk_dir)) if model_dir is not None else "unknown-model"
            )
        if disk_dir is not None and disk_budget > 0 and model_dir is not None:
            disk = BlockFiles(disk_dir, fingerprint, block_size)
        self.store = BlockStore(
            seed=chain_seed(fingerprint, block_size),
            memory_budget=memory_budget,
            size=block_size,
            disk=disk,
            disk_budget=disk_budget,
        )
        # The model's folder (blocks-<size>/ is inside it): the token logs go there.
        self._disk_root = disk.dir.parent if disk is not None else None
        self._prefix_end = 0
        # The cache the last request ended with, and its tokens: the next turn of the same
        # conversation continues it as it is (no copy); another prompt reuses its memory.
        self._live: tuple[np.ndarray, list[Any]] | None = None
        self.continued = 0
        self._recent = disk.load_recent() if disk is not None else []
        self.warm = WarmStart(state="waiting" if self._recent else "off")

    def restore(self, model: Any, prompt: RenderedPrompt) -> Restored:
        self._prefix_end = prompt.prefix_end
        self._request_started()
        tokens = np.asarray(prompt.tokens, dtype=np.int32)
        match = self.store.lookup(tokens)
        live, self._live = self._live, None
        if live is not None:
            n = min(common_prefix_len(live[0], tokens), len(tokens) - 1)
            if n > 0 and n >= match.length:
                trim_prompt_cache(live[1], live[1][0].offset - n)
                self.continued += 1
                return Restored(cache=live[1], n_restored=n)
        if match.length:
            reuse = live[1] if live is not None else None
            room = len(tokens) - match.length + DECODE_ROOM  # the engine never has to grow it
            caches, n, resumed = self.store.restore(match, room=room, reuse=reuse)
            if n:
                return Restored(cache=caches, n_restored=n, resumed=resumed)
        return Restored(cache=make_prompt_cache(model), n_restored=0)

    def checkpoints(self, prompt: RenderedPrompt, n_restored: int) -> Sequence[int]:
        return system_prefix_checkpoint(prompt, n_restored)

    def save(self, tokens: Sequence[int], cache: list[Any], kind: SaveKind) -> None:
        self.store.put(tokens, cache, kind=kind, protected=protected_length(self._prefix_end, len(tokens)))
        if kind == "generation":  # the engine lets go of the cache after this save
            self._live = (np.asarray(tokens, dtype=np.int32), cache)
            self._remember()

    def _remember(self) -> None:
        """Put the conversation just answered first in the disk tier's record of recent ones."""
        disk, ends = self.store.disk, self.store.last_put
        if disk is None or ends is None:
            return
        covered = {b.key for b in self.store.chain_to(ends[0])}  # earlier turns of the same one
        older = [e for e in self._recent if e[0] not in covered and e[1] not in covered]
        self._recent = [ends, *older][:RECENT_CONVERSATIONS]
        try:
            disk.save_recent(self._recent, self.store.request)
        except OSError as e:  # costs the next warm start at most
            log.warning(f"kv cache: cannot record the recent conversations ({e})")

    def warm_start(self, model: Any, should_stop: Callable[[], bool]) -> None:
        if not self._recent:
            return
        started = time.monotonic()
        self.warm.state = "running"
        chains = [c for leaf, whole in self._recent if (c := self.store.chain_to(leaf) or self.store.chain_to(whole))]
        loaded: list[list[Block]] = []
        spare: list[Any] | None = None  # an older conversation's cache, whose memory the next reuses
        for chain in chains:
            if should_stop():
                self.warm.state = "stopped"
                break
            missing = sum(b.nbytes for b in chain if b.arrays is None)
            if missing > self.store.memory_budget - self.store.memory_bytes:
                continue
            match = Match(tuple((b, len(b.tokens)) for b in chain))
            caches, n, _ = self.store.restore(match, room=DECODE_ROOM, reuse=spare)
            if not n:
                continue
            tokens = np.concatenate([b.tokens for b in chain])[:n]
            self.store.put(tokens, caches, kind="generation")  # its blocks are back in memory
            loaded.append(chain)
            self.warm.conversations += 1
            self.warm.tokens += n
            self.warm.bytes += missing
            if self._live is None:
                self._live = (tokens, caches)
            else:
                spare = caches
        for chain in reversed(loaded):  # loaded newest first; LRU must see the newest as the last used
            self.store.touch(chain)
        if self.warm.state == "running":
            self.warm.state = "done"
        self.warm.seconds = round(time.monotonic() - started, 3)
        log.info(
            f"warm start: {self.warm.conversations} recent conversation(s), {self.warm.tokens:,} tokens "
            f"({self.warm.bytes / 1e6:.0f} MB from disk) back in memory in {self.warm.seconds:.2f}s"
            + (" (stopped early: a request came)" if self.warm.state == "stopped" else "")
        )

    def set_busy(self, busy: bool) -> None:
        if self.store.disk is not None:
            self.store.disk.set_busy(busy)

    def _request_started(self) -> None:
        # New blocks are stamped with the request that made them: writes (which land later) are
        # counted against it in disk_bytes_written_by_request.
        self.store.request += 1

    @property
    def disk_dir(self) -> Path | None:
        return self._disk_root

    def stats(self) -> dict[str, Any]:
        s = self.store
        disk = s.disk
        return {
            "store": "blocks",
            "block_tokens": s.size,
            "blocks": s.resident_blocks(),
            "disk_blocks": disk.blocks_on_disk if disk else 0,
            **self.storage_stats(s.memory_bytes, s.unique_tokens(), s.logical_tokens()),
            "disk_blocks_written": disk.blocks_written if disk else 0,
            "disk_budget_bytes": s.disk_budget if disk else 0,
            "blocks_created": s.created,
            # The last request's cache, kept for the next turn of its conversation: RAM on top
            # of memory_budget_bytes (the same a request holds while it runs).
            "live_cache_bytes": sum(c.nbytes for c in live[1]) if (live := self._live) is not None else 0,
            "continued": self.continued,
            "warm_start_state": self.warm.state,
            "warm_start_conversations": self.warm.conversations,
            "warm_start_tokens": self.warm.tokens,
            "warm_start_bytes": self.warm.bytes,
            "warm_start_seconds": self.warm.seconds,
            "evictions": s.evictions,
            "superseded": s.superseded,
        }

    def describe(self) -> str:
        where = f", disk {self.store.disk.dir}" if self.store.disk else ""
        return f"BlockCache({self.store.size}-token blocks, memory {self.store.memory_budget / 2**20:.0f} MiB{where})"
