"""KV stored once: fixed-size token blocks keyed by a chained hash, shared by every prompt.

Blocks and their keys are defined in kv_block_keys.py. Two prompts that share 30k tokens share
those blocks. A save copies only the blocks the store does not hold yet, plus a *tail*: the
tokens after the last whole block, kept as a leaf so a prompt that ends mid-block (a checkpoint,
a generation) restores exactly.

Lookup hashes the prompt's whole blocks and walks the chain: one hash per block, whatever the
number of stored prompts. Where the chain stops, the children of the last matching block (whole
blocks and tails, usually one or two) are compared token by token, so a prompt that diverges
mid-block still gets every shared token.

Restore allocates one contiguous cache per layer, with room for the rest of the prompt, and
copies the chain's blocks into it through NumPy views (two threads; blocks on disk are read
straight from their files into it, checksum included): one pass over the restored bytes, and the
prefill then appends in place. The snapshot store handed out views of a frozen snapshot instead,
but mlx-lm's KVCache copied the whole cache at its first append because the view had no room, so
a warm turn made that pass anyway; MLX's own concatenate copies at about half NumPy's speed here.
A block restored from disk comes back into memory from the live cache after the answer (a
"generation" save), not during the restore, so the first token does not wait for that copy.

Why not paged attention: mlx-lm's attention wants one contiguous K/V array per layer, so blocks
are the unit of storage and sharing, and the live cache stays contiguous.

Eviction is LRU over blocks. A restore or save touches its whole chain, so an ancestor is never
older than its descendants and ties go to the deeper block: leaves go first. Blocks of the
system + tools prefix go last. A block evicted from memory stays in the index while the disk
tier (kv_block_files.py) has it, or is about to write it; otherwise it and its descendants go.

Only plain `KVCache` layers can be cut into blocks (`blockable`); rotating (sliding-window),
quantized and SSM caches keep whole snapshots at boundaries (kv_snapshots.py).
"""

from __future__ import annotations

import itertools
import logging
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import mlx.core as mx
import numpy as np
from mlx_lm.models.cache import KVCache

from cache_backend.kv_arrays import (
    BlockArrays,
    Layout,
    Views,
    allocate,
    arrays_nbytes,
    capacity,
    copy_into,
    copy_span,
    finish,
    layout_of,
)
from cache_backend.kv_block_keys import DEFAULT_BLOCK_TOKENS, Block, Match, block_key, chain_keys
from cache_backend.kv_snapshots import tokens_held
from cache_backend.token_prefix import common_prefix_len, unique_in_trie

if TYPE_CHECKING:
    from cache_backend.kv_block_files import BlockFiles

log = logging.getLogger("ccwarm.kv_blocks")


@dataclass
class BlockStore:
    """Blocks in memory under a byte budget, indexed by key; a disk tier, when given, backs them."""

    seed: bytes
    memory_budget: int
    size: int = DEFAULT_BLOCK_TOKENS
    disk: BlockFiles | None = None
    disk_budget: int = 0
    blocks: dict[bytes, Block] = field(default_factory=dict)
    children: dict[bytes, set[bytes]] = field(default_factory=dict)
    memory_bytes: int = 0
    evictions: int = 0
    superseded: int = 0
    created: int = 0
    request: int = 0  # the request being served: new blocks are stamped with it
    # The last save's (deepest block, deepest whole block): what a warm start looks for.
    last_put: tuple[bytes, bytes] | None = None
    _clock: itertools.count = field(default_factory=itertools.count)
    # The HTTP thread reads stats while the engine's worker changes the index.
    _lock: threading.Lock = field(default_factory=threading.Lock)
    # Restores copy blocks into the cache on two threads (NumPy copies and CRCs release the GIL).
    _pool: ThreadPoolExecutor = field(default_factory=lambda: ThreadPoolExecutor(2, thread_name_prefix="kv-restore"))

    def __post_init__(self) -> None:
        if self.disk is not None:
            self._load_index()

    # -- lookup ---------------------------------------------------------------------------------

    def lookup(self, prompt: Sequence[int]) -> Match:
        """The longest stored prefix of `prompt`, leaving at least one token to feed."""
        tokens = np.asarray(prompt, dtype=np.int32)
        limit = len(tokens) - 1
        path: list[Block] = []
        parent = self.seed
        for key in chain_keys(self.seed, tokens, self.size):
            block = self.blocks.get(key)
            if block is None:
                break
            path.append(block)
            parent = key
        pos = len(path) * self.size
        partial, partial_len = None, 0
        rest = tokens[pos : pos + self.size]
        for key in self.children.get(parent, ()):
            child = self.blocks[key]
            n = common_prefix_len(child.tokens, rest)
            if n > partial_len:
                partial, partial_len = child, n
        found = [(b, len(b.tokens)) for b in path] + ([(partial, partial_len)] if partial is not None else [])
        parts: list[tuple[Block, int]] = []
        total = 0
        for block, n in found:
            n = min(n, limit - total)  # an exact repeat: the last position is fed again for logits
            if n <= 0:
                break
            parts.append((block, n))
            total += n
        return Match(tuple(parts))

    # -- restore --------------------------------------------------------------------------------

    def restore(
        self, match: Match, room: int, reuse: Sequence[KVCache] | None = None
    ) -> tuple[list[KVCache], int, bool]:
        """One contiguous cache per layer for the match, with `room` free positions after it.

        Returns (caches, tokens restored, resumed). Blocks on disk are read straight into the
        cache and checked; the restore stops before the first that cannot be read, which is
        removed with what hangs off it. `reuse`: a cache nobody holds any more whose arrays may
        be overwritten, if they are large enough.
        """
        parts = list(match.parts)
        if not parts:
            return [], 0, False
        try:
            layout = self._layout(parts[0][0])
        except OSError as e:  # a read error that may pass: a miss this time, the block stays
            log.warning(f"kv cache: cannot read a block header now ({e}); prefilling instead")
            return [], 0, False
        if layout is None:
            self._remove_subtree(parts[0][0])
            return [], 0, False
        caches, views = allocate(layout, capacity(match.length, match.length + room), reuse)
        starts = list(itertools.accumulate((n for _, n in parts), initial=0))
        jobs = [
            self._pool.submit(self._fill, block, n, views, at) for (block, n), at in zip(parts, starts, strict=False)
        ]
        ok = [job.result() for job in jobs]
        used = next((i for i, good in enumerate(ok) if good is not True), len(parts))
        if used < len(parts) and ok[used] is False:  # damaged: it and what continues it go
            self._remove_subtree(parts[used][0])
        self.touch([block for block, _ in parts[:used]])
        length = starts[used]
        if length == 0:
            return [], 0, False
        for c in caches:
            c.offset = length
        last, n = parts[used - 1]
        resumed = used == len(parts) and last.kind == "partial" and n == len(last.tokens)
        return finish(caches), length, resumed

    def _layout(self, block: Block) -> Layout | None:
        if block.arrays is not None:
            return layout_of(block.arrays)
        return self.disk.layout(block) if self.disk is not None else None

    def _fill(self, block: Block, n: int, views: Views, at: int) -> bool | None:
        """Copy `n` positions of `block` into the cache views at `at` (a worker thread: NumPy only);
        False when its file is damaged, None when it cannot be read now."""
        arrays = block.arrays
        if arrays is None:
            return self.disk.read_into(block, n, views, at) if self.disk is not None else False
        copy_into(arrays, n, views, at)
        return True

    # -- storing --------------------------------------------------------------------------------

    def put(self, tokens: Sequence[int], live: Sequence[Any], kind: str, protected: int = 0) -> list[Block]:
        """Store what `live` (holding exactly `tokens`) adds; returns the blocks it created."""
        toks = np.asarray(tokens, dtype=np.int32)
        held = tokens_held(live)
        if held != {len(toks)}:
            # A block whose K/V disagrees with its tokens would give wrong answers later.
            raise ValueError(f"a save of {len(toks)} tokens offered a cache holding {sorted(held)} positions")
        now = next(self._clock)
        created: list[Block] = []
        parent = self.seed
        last: Block | None = None
        for i, key in enumerate(chain_keys(self.seed, toks, self.size)):
            start = i * self.size
            block = self.blocks.get(key)
            if block is None:
                end = start + self.size
                block = Block(key, parent, start, toks[start:end].copy(), copy_span(live, start, end))
                self._add(block)
                created.append(block)
            elif block.arrays is None and kind == "generation":
                # Restored from disk: back in memory from the live cache, after the answer (a copy
                # here would delay the first token).
                self._make_resident(block, copy_span(live, start, block.end))
            block.last_used = now
            block.protected |= start < protected
            parent, last = key, block
        tail_start = len(toks) - len(toks) % self.size
        if tail_start < len(toks):
            last = self._put_tail(parent, tail_start, toks[tail_start:], live, now, created, kind)
            last.protected |= tail_start < protected
        if last is not None and last.end == len(toks):
            last.kind = kind
        self.last_put = (last.key if last is not None else self.seed, parent)
        mx.eval([a for b in created if b.arrays for pair in b.arrays for a in pair])
        for block in created:
            block.origin = self.request
            block.nbytes = arrays_nbytes(block.arrays or [])
            with self._lock:
                self.memory_bytes += block.nbytes
            if self.disk is not None:
                self.disk.write(block)
        self._evict()
        self._enforce_disk_budget()
        return created

    def _put_tail(
        self,
        parent: bytes,
        start: int,
        tail: np.ndarray,
        live: Sequence[Any],
        now: int,
        created: list[Block],
        kind: str,
    ) -> Block:
        for key in self.children.get(parent, set()):
            child = self.blocks[key]
            if len(child.tokens) >= len(tail) and common_prefix_len(child.tokens, tail) == len(tail):
                if child.arrays is None and len(child.tokens) == len(tail) and kind == "generation":
                    self._make_resident(child, copy_span(live, start, child.end))
                child.last_used = now
                return child  # a stored block or tail already covers it
        block = Block(block_key(parent, tail), parent, start, tail.copy(), copy_span(live, start, start + len(tail)))
        self._add(block)
        created.append(block)
        return block

    def _add(self, block: Block) -> None:
        """Index a new block; tails under the same parent that it covers are superseded."""
        with self._lock:
            self.blocks[block.key] = block
            siblings = self.children.setdefault(block.parent, set())
            covered = [
                self.blocks[k]
                for k in siblings
                if len(self.blocks[k].tokens) < len(block.tokens)
                and common_prefix_len(self.blocks[k].tokens, block.tokens) == len(self.blocks[k].tokens)
            ]
            siblings.add(block.key)
        self.created += 1
        for old in covered:
            block.protected |= old.protected
            self._remove(old)
            self.superseded += 1

    def _make_resident(self, block: Block, arrays: BlockArrays) -> None:
        mx.eval([a for pair in arrays for a in pair])
        block.arrays = arrays
        block.nbytes = arrays_nbytes(arrays)
        with self._lock:
            self.memory_bytes += block.nbytes

    # -- capacity -------------------------------------------------------------------------------

    def _evict(self) -> None:
        if self.memory_bytes <= self.memory_budget:
            return
        resident = [b for b in self.blocks.values() if b.arrays is not None]
        resident.sort(key=lambda b: (b.protected, b.last_used, -b.start))
        for victim in resident:
            if self.memory_bytes <= self.memory_budget:
                break
            if victim.key not in self.blocks:
                continue  # went with an evicted ancestor
            self.evictions += 1
            if self.disk is not None and not self.disk.has(victim.key):
                # Its file went to the disk budget while it was in memory: written again (the
                # queue holds it meanwhile), or it and all that continues it would be lost.
                self.disk.write(victim)
            with self._lock:
                self.memory_bytes -= victim.nbytes
            victim.arrays = None
            if self.disk is None:
                self._remove_subtree(victim)

    def _enforce_disk_budget(self) -> None:
        if self.disk is None or self.disk.disk_bytes <= self.disk_budget:
            return
        # Only written files count against the budget; a queued block holds the only copy of an
        # evicted block, so it is never a victim here.
        on_disk = [b for b in self.blocks.values() if self.disk.durable(b.key)]
        on_disk.sort(key=lambda b: (b.protected, b.last_used, -b.start))
        for victim in on_disk:
            if self.disk.disk_bytes <= self.disk_budget:
                break
            if victim.key not in self.blocks:
                continue
            if victim.arrays is None:
                self._remove_subtree(victim)
            else:
                self.disk.delete(victim.key)  # stays in memory; written again when it is evicted

    def _remove(self, block: Block) -> None:
        with self._lock:
            if self.blocks.pop(block.key, None) is None:
                return
            siblings = self.children.get(block.parent)
            if siblings is not None:
                siblings.discard(block.key)
                if not siblings:
                    del self.children[block.parent]
            if block.arrays is not None:
                self.memory_bytes -= block.nbytes
                block.arrays = None
        if self.disk is not None:
            self.disk.delete(block.key)

    def _remove_subtree(self, block: Block) -> None:
        """Remove `block` and every block that continues it (unreachable without it)."""
        stack = [block]
        while stack:
            b = stack.pop()
            stack.extend(self.blocks[k] for k in self.children.get(b.key, ()) if k in self.blocks)
            self._remove(b)

    # -- restart --------------------------------------------------------------------------------

    def chain_to(self, key: bytes) -> list[Block]:
        """The blocks from the first to `key`'s, in order; empty when a link is not stored."""
        chain: list[Block] = []
        while key != self.seed:
            block = self.blocks.get(key)
            if block is None:
                return []
            chain.append(block)
            key = block.parent
        return chain[::-1]

    def touch(self, chain: Sequence[Block]) -> None:
        """Mark `chain` as just used (ancestors and descendants alike, as a restore does)."""
        now = next(self._clock)
        for block in chain:
            block.last_used = now

    def _load_index(self) -> None:
        """Index the blocks on disk; those whose chain is broken cannot be reached and go."""
        assert self.disk is not None
        found = {b.key: b for b in self.disk.scan()}
        reachable: set[bytes] = {self.seed}
        by_start = sorted(found.values(), key=lambda b: b.start)
        for b in by_start:
            if b.parent in reachable and b.start % self.size == 0 and len(b.tokens) <= self.size:
                reachable.add(b.key)
                self.blocks[b.key] = b
                self.children.setdefault(b.parent, set()).add(b.key)
            else:
                self.disk.delete(b.key)

    # -- accounting -----------------------------------------------------------------------------

    def unique_tokens(self, resident_only: bool = True) -> int:
        """Distinct token prefixes held: tokens of every block, less what sibling tails share."""
        with self._lock:
            groups = [
                [self.blocks[k].tokens for k in keys if not resident_only or self.blocks[k].arrays is not None]
                for keys in self.children.values()
            ]
        return sum(unique_in_trie(g) for g in groups)

    def logical_tokens(self) -> int:
        """What whole snapshots of every stored sequence (each leaf's chain) would hold."""
        with self._lock:
            return sum(b.end for b in self.blocks.values() if b.arrays is not None and not self.children.get(b.key))

    def resident_blocks(self) -> int:
        with self._lock:
            return sum(1 for b in self.blocks.values() if b.arrays is not None)
