"""Prefix KV snapshots kept across requests: longest-common-prefix lookup, LRU within a budget.

A snapshot is the model's KV state for one token sequence. With the billing block gone, turn N+1
of a conversation starts with all of turn N (prompt and output), so the longest stored prefix of
the new prompt is usually everything but the new tail.

Memory rules:
- a snapshot never changes after it is taken; restores get fresh cache objects that share its
  arrays, and the live cache is "sealed" (cut to its exact length) when a snapshot is taken so
  its next append reallocates instead of writing into arrays a snapshot holds;
- for trimmable caches, a snapshot whose tokens are a prefix of a newer one is superseded by it
  (the newer one serves the same lookups), so a conversation costs one snapshot, not one a turn;
- eviction is LRU, but first cuts evicted snapshots back to their protected system + tools
  prefix, and drops protected prefixes only when nothing else is left to drop.

Why not mlx-lm's `LRUPromptCache` (mlx_lm.models.cache, with its `PromptTrie`): it deep-copies
the whole cache on every hit (a 600 MB copy per warm turn at 12k tokens of the bundled model,
where sharing arrays costs nothing), evicts whole entries with no protected prefix (a sub-agent
burst would push out the system + tools prefix every conversation shares), and has no disk tier
behind it. Its trie finds the longest prefix in one walk; the linear scan here is the part the
KV-blocks redesign replaces with block-hash lookups.
"""

from __future__ import annotations

import copy
import itertools
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import mlx.core as mx
import numpy as np
from mlx_lm.models.cache import KVCache

from cache_backend.token_prefix import common_prefix_len

if TYPE_CHECKING:
    from cache_backend.kv_disk import DiskTier

Layers = list[Any]  # one mlx-lm cache object per model layer


def is_trimmable(layers: Layers) -> bool:
    return all(c.is_trimmable() for c in layers)


def tokens_held(layers: Layers) -> set[int]:
    """How many tokens each layer has seen (`offset`; rotating caches keep fewer but count all).
    Layers without positions (SSM state) say nothing and are left out."""
    return {int(c.offset) for c in layers if isinstance(getattr(c, "offset", None), int)}


def layers_nbytes(layers: Layers) -> int:
    return sum(c.nbytes for c in layers)


def _exact_kv(c: KVCache, length: int) -> KVCache:
    """A KVCache whose arrays hold exactly `length` positions (new array objects)."""
    out = KVCache()
    out.keys = c.keys[..., :length, :]
    out.values = c.values[..., :length, :]
    out.offset = length
    return out


def freeze(layers: Layers) -> Layers:
    """An immutable copy of a live cache, and seal the live one so it never writes into it."""
    frozen: Layers = []
    for c in layers:
        if type(c) is KVCache and c.keys is not None:
            snap = _exact_kv(c, c.offset)
            # The live cache continues from its own exact-length view: its next append reallocates.
            c.keys, c.values = snap.keys[..., :, :], snap.values[..., :, :]
            frozen.append(snap)
        else:
            # Other cache types (quantized, rotating, SSM state) update arrays in place: copy them.
            frozen.append(copy.deepcopy(c))
    mx.eval([x for c in frozen for x in _arrays(c)])
    return frozen


def thaw(layers: Layers, length: int) -> Layers:
    """Fresh cache objects for the first `length` tokens of a snapshot, sharing its arrays."""
    out: Layers = []
    for c in layers:
        if type(c) is KVCache and c.keys is not None:
            out.append(_exact_kv(c, length))
        else:
            fresh = copy.deepcopy(c)
            if fresh.is_trimmable() and fresh.size() > length:
                fresh.trim(fresh.size() - length)
            out.append(fresh)
    return out


def shrink(layers: Layers, length: int) -> Layers:
    """A copy of the first `length` tokens that owns its memory (the rest can be freed)."""
    out: Layers = []
    for c in layers:
        if type(c) is KVCache and c.keys is not None:
            kept = KVCache()
            kept.keys = mx.contiguous(c.keys[..., :length, :])
            kept.values = mx.contiguous(c.values[..., :length, :])
            kept.offset = length
            out.append(kept)
        else:
            fresh = copy.deepcopy(c)
            fresh.trim(fresh.size() - length)
            out.append(fresh)
    mx.eval([x for c in out for x in _arrays(c)])
    return out


def _arrays(c: Any) -> Iterator[mx.array]:
    stack = [c.state]
    while stack:
        item = stack.pop()
        if isinstance(item, mx.array):
            yield item
        elif isinstance(item, (list, tuple)):
            stack.extend(item)


@dataclass
class Snapshot:
    """KV state for `tokens`; `protected` leading tokens are the system + tools prefix."""

    id: str
    tokens: np.ndarray
    layers: Layers | None  # None: only on disk
    kind: str  # the save kind that made it: checkpoint, partial, prompt or generation
    protected: int = 0
    trimmable: bool = True
    nbytes: int = 0
    last_used: int = 0
    on_disk: bool = False
    origin: int = 0  # the request whose save made it (what its write is counted against)

    def __len__(self) -> int:
        return len(self.tokens)


@dataclass(frozen=True)
class Hit:
    snapshot: Snapshot
    length: int  # tokens of the prompt this snapshot restores


@dataclass
class StoreStats:
    snapshots: int = 0
    memory_bytes: int = 0
    evictions: int = 0
    superseded: int = 0
    truncations: int = 0


@dataclass
class SnapshotStore:
    """In-memory snapshots under a byte budget. A disk tier, when given, backs every snapshot."""

    memory_budget: int
    disk: DiskTier | None = None
    snapshots: dict[str, Snapshot] = field(default_factory=dict)
    evictions: int = 0
    superseded: int = 0
    truncations: int = 0
    request: int = 0  # the request being served: new snapshots are stamped with it
    _clock: Iterator[int] = field(default_factory=itertools.count)

    @staticmethod
    def _new_id() -> str:
        return uuid.uuid4().hex

    # -- lookup ---------------------------------------------------------------------------------

    def candidates(self) -> Iterator[Snapshot]:
        yield from self.snapshots.values()
        if self.disk is not None:
            yield from (s for s in self.disk.entries() if s.id not in self.snapshots)

    def lookup(self, prompt: Sequence[int]) -> Hit | None:
        """The snapshot restoring the most tokens of `prompt`, leaving at least one to feed."""
        tokens = np.asarray(prompt, dtype=np.int32)
        best: Hit | None = None
        for snap in self.candidates():
            common = common_prefix_len(snap.tokens, tokens)
            usable = min(common, len(tokens) - 1)
            if not snap.trimmable and usable < len(snap):
                continue  # only whole snapshots of untrimmable caches are reusable
            if usable <= 0:
                continue
            if (
                best is None
                or usable > best.length
                or (usable == best.length and snap.layers is not None and best.snapshot.layers is None)
            ):
                best = Hit(snap, usable)
        return best

    def restore(self, hit: Hit) -> Layers | None:
        """Cache objects for the hit's tokens, loading from disk if needed; None if unreadable."""
        snap = hit.snapshot
        if snap.layers is None:
            layers = self.disk.load(snap) if self.disk is not None else None
            if layers is None:
                return None
            snap.layers = layers
            snap.nbytes = layers_nbytes(layers)
        layers = snap.layers  # eviction below may let go of the snapshot's own reference
        snap.last_used = next(self._clock)
        if snap.id not in self.snapshots:  # from disk, or evicted while its file was still queued
            self.snapshots[snap.id] = snap
            self._evict()
        if self.disk is not None:
            self.disk.touch(snap)
        return thaw(layers, hit.length)

    # -- storing --------------------------------------------------------------------------------

    def put(self, tokens: Sequence[int], live: Layers, kind: str, protected: int = 0) -> Snapshot | None:
        """Snapshot a live cache that holds exactly `tokens` (and seal it, see `freeze`)."""
        toks = np.asarray(tokens, dtype=np.int32)
        held = tokens_held(live)
        if held and held != {len(toks)}:
            # A snapshot whose KV length disagrees with its tokens would give wrong answers later.
            raise ValueError(f"snapshot of {len(toks)} tokens offered a cache holding {sorted(held)} positions")
        trimmable = is_trimmable(live)
        for snap in list(self.snapshots.values()):
            if (
                trimmable
                and snap.trimmable
                and len(snap) >= len(toks)
                and common_prefix_len(snap.tokens, toks) == len(toks)
            ):
                snap.last_used = next(self._clock)  # already covered by a longer snapshot
                snap.protected = max(snap.protected, protected)
                return None
        layers = freeze(live)
        snap = Snapshot(
            id=self._new_id(),
            tokens=toks,
            layers=layers,
            kind=kind,
            protected=protected,
            trimmable=trimmable,
            nbytes=layers_nbytes(layers),
            last_used=next(self._clock),
            origin=self.request,
        )
        covered = [
            old
            for old in self.snapshots.values()
            if trimmable and old.trimmable and len(old) < len(toks) and common_prefix_len(old.tokens, toks) == len(old)
        ]
        for old in covered:
            snap.protected = max(snap.protected, old.protected)
        if snap.nbytes > self.memory_budget:
            if not (snap.protected and snap.trimmable):
                return None
            snap.layers = shrink(layers, snap.protected)
            snap.tokens = toks[: snap.protected]
            snap.nbytes = layers_nbytes(snap.layers)
            if snap.nbytes > self.memory_budget:
                return None
        # Only what the kept snapshot still covers is superseded (a shrunk one covers less).
        for old in covered:
            if len(old) <= len(snap):
                self._drop(old, replaced_by=snap)
                self.superseded += 1
        self.snapshots[snap.id] = snap
        if self.disk is not None:
            self.disk.write(snap)
        self._evict()
        return snap

    # -- capacity -------------------------------------------------------------------------------

    @property
    def memory_bytes(self) -> int:
        # list(): the HTTP thread reads stats while the worker thread changes the dict
        return sum(s.nbytes for s in list(self.snapshots.values()))

    def _drop(self, snap: Snapshot, replaced_by: Snapshot) -> None:
        self.snapshots.pop(snap.id, None)
        if self.disk is not None:
            self.disk.forget(snap, replaced_by=replaced_by)

    def _evict(self) -> None:
        while self.memory_bytes > self.memory_budget and self.snapshots:
            by_age = sorted(self.snapshots.values(), key=lambda s: s.last_used)
            # First choice: cut the oldest snapshot with an unprotected tail back to its prefix.
            victim = next((s for s in by_age if s.trimmable and 0 < s.protected < len(s)), None)
            if victim is not None:
                self._truncate(victim)
                continue
            # Then: drop the oldest snapshot that is not a protected prefix, and last those.
            victim = next((s for s in by_age if not s.protected), by_age[0])
            self.snapshots.pop(victim.id)
            self.evictions += 1
            if victim.on_disk:
                victim.layers = None  # still restorable from disk

    def _truncate(self, snap: Snapshot) -> None:
        n = snap.protected
        prefix = snap.tokens[:n]
        self.truncations += 1
        covered = any(
            o is not snap and o.trimmable and len(o) >= n and common_prefix_len(o.tokens, prefix) == n
            for o in self.snapshots.values()
        )
        self.snapshots.pop(snap.id)
        if covered:
            return  # another snapshot already serves this prefix
        kept = Snapshot(
            id=self._new_id(),
            tokens=prefix.copy(),
            layers=shrink(snap.layers, n),
            kind=snap.kind,
            protected=n,
            trimmable=True,
            last_used=snap.last_used,
        )
        kept.nbytes = layers_nbytes(kept.layers)
        self.snapshots[kept.id] = kept
        if self.disk is not None:
            self.disk.write(kept)

    def stats(self) -> StoreStats:
        return StoreStats(
            snapshots=len(self.snapshots),
            memory_bytes=self.memory_bytes,
            evictions=self.evictions,
            superseded=self.superseded,
            truncations=self.truncations,
        )
