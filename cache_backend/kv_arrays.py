"""Moving K/V between mlx-lm caches and blocks: copies out of a live cache, and one contiguous
cache filled in place from blocks (in memory or straight from their files).

Why NumPy: MLX documents NumPy views of its arrays as shared memory, so a cache allocated once
can be filled through views, from two threads (NumPy copies release the GIL), at about twice the
speed of MLX's own concatenate on this CPU, and a file can be read straight into it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import mlx.core as mx
import numpy as np
from mlx_lm.models.cache import KVCache

BlockArrays = list[tuple[mx.array, mx.array]]  # (keys, values) per layer, [1, heads, tokens, dim]
Layout = list[tuple[int, int, int, Any]]  # per layer: KV heads, key dim, value dim, MLX dtype
Views = list[tuple[np.ndarray, np.ndarray]]  # writable NumPy views of a cache's keys and values
STEP = 256  # mlx-lm KVCache's allocation step: room is handed out in these


DECODE_ROOM = 512  # positions reserved past the prompt: a short answer decodes without a reallocation


def capacity(held: int, needed: int) -> int:
    """Positions to allocate for a cache that holds `held` and must take `needed`: 1/8 more, so
    the next few turns of a conversation usually fit without a copy.

    The headroom is counted on what is needed, not on what is held: counted on `held`, a turn
    that adds 4k tokens to 80k used most of it up, and every other turn copied the whole cache
    (+0.12-0.15 s at 80k+ tokens on the bench model)."""
    size = max(needed, held)
    return -(-(size + size // 8) // STEP) * STEP


def reserve(cache: list[Any], total: int) -> None:
    """Give each plain KVCache layer room for `total` positions, in one reallocation.

    mlx-lm's KVCache grows by the size of each append (rounded up to 256 positions) and copies
    the whole cache every time it grows: a prefill in chunks copied it once per chunk, which cost
    more than the prefill itself on a warm 60k-token turn. Other cache types keep their own rules.
    """
    grow = [c for c in cache if type(c) is KVCache and c.keys is not None and c.keys.shape[2] < total]
    for c in grow:
        room = capacity(c.offset, total) - c.offset
        k, v = c.keys[..., : c.offset, :], c.values[..., : c.offset, :]
        c.keys = mx.concatenate([k, mx.zeros((*k.shape[:2], room, k.shape[3]), k.dtype)], axis=2)
        c.values = mx.concatenate([v, mx.zeros((*v.shape[:2], room, v.shape[3]), v.dtype)], axis=2)
    if grow:
        mx.eval([x for c in grow for x in (c.keys, c.values)])


def copy_span(layers: Sequence[KVCache], start: int, end: int) -> BlockArrays:
    """Copies (never views: the live cache may be rewound and overwritten) of positions [start, end)."""
    return [(mx.array(c.keys[..., start:end, :]), mx.array(c.values[..., start:end, :])) for c in layers]


def layout_of(arrays: BlockArrays) -> Layout:
    return [(k.shape[1], k.shape[3], v.shape[3], k.dtype) for k, v in arrays]


def copy_into(arrays: BlockArrays, n: int, views: Views, at: int) -> None:
    """Copy the first `n` positions of a block's arrays into cache views at position `at`."""
    for (k, v), (dk, dv) in zip(arrays, views, strict=True):
        dk[:, :, at : at + n, :] = as_numpy(k)[:, :, :n, :]
        dv[:, :, at : at + n, :] = as_numpy(v)[:, :, :n, :]


def arrays_nbytes(arrays: BlockArrays) -> int:
    return sum(k.nbytes + v.nbytes for k, v in arrays)


def as_numpy(a: mx.array) -> np.ndarray:
    """A NumPy view of an evaluated MLX array (bfloat16 as its 16-bit pattern: NumPy has none)."""
    if a.dtype == mx.bfloat16:
        a = a.view(mx.uint16)
        mx.eval(a)
    return np.asarray(memoryview(a))


def allocate(
    layout: Layout, positions: int, reuse: Sequence[KVCache] | None = None
) -> tuple[list[KVCache], list[tuple[np.ndarray, np.ndarray]]]:
    """Caches with room for `positions` (a multiple of STEP), and writable NumPy views of them.

    Writing through the views fills the MLX arrays in place (MLX documents NumPy views of its
    arrays as shared memory): one pass over the restored bytes, from memory or straight from disk.
    The arrays of `reuse` are taken when they fit (what lies past the restored positions is never
    read), else new ones are allocated.
    """
    if reuse is not None and fits(reuse, layout, positions):
        caches = [KVCache() for _ in layout]
        for c, old in zip(caches, reuse, strict=True):
            c.keys, c.values = old.keys, old.values
    else:
        caches = []
        for heads, k_dim, v_dim, dtype in layout:
            store = mx.uint16 if dtype == mx.bfloat16 else dtype
            c = KVCache()
            c.keys = mx.zeros((1, heads, positions, k_dim), store)
            c.values = mx.zeros((1, heads, positions, v_dim), store)
            caches.append(c)
        mx.eval([x for c in caches for x in (c.keys, c.values)])
    views = []
    for c, (*_, dtype) in zip(caches, layout, strict=True):
        if dtype == mx.bfloat16 and c.keys.dtype == mx.bfloat16:
            c.keys, c.values = c.keys.view(mx.uint16), c.values.view(mx.uint16)
            mx.eval(c.keys, c.values)
        views.append((np.asarray(memoryview(c.keys)), np.asarray(memoryview(c.values))))
        if dtype == mx.bfloat16:
            c.keys, c.values = c.keys.view(mx.bfloat16), c.values.view(mx.bfloat16)
    return caches, views


def fits(reuse: Sequence[KVCache], layout: Layout, positions: int) -> bool:
    if len(reuse) != len(layout):
        return False
    for c, (heads, k_dim, v_dim, dtype) in zip(reuse, layout, strict=True):
        if type(c) is not KVCache or c.keys is None or c.keys.dtype != dtype or c.values.dtype != dtype:
            return False
        if c.keys.shape[:2] != (1, heads) or c.keys.shape[2] < positions or c.keys.shape[3] != k_dim:
            return False
        if c.values.shape != (*c.keys.shape[:3], v_dim):
            return False
        if not (as_numpy(c.keys).flags.c_contiguous and as_numpy(c.values).flags.c_contiguous):
            return False
    return True


def finish(caches: list[KVCache]) -> list[KVCache]:
    mx.eval([x for c in caches for x in (c.keys, c.values)])
    return caches
