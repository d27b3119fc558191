"""Attention for float32 models on MLX's CPU backend, computed with NumPy.

Why this exists: on the CPU, MLX's softmax runs a scalar, single-threaded ``exp`` (16.7 ns per
element measured on this project's 2-core x86-64 machine, against 1.8 ns for NumPy's SIMD
``exp``). Attention scores grow with the context, so at 4k tokens of context that one ``exp``
was 93% of the bundled model's forward time, and at 12k context decoding spent 465 ms per token
in attention against ~50 ms in the weights. Measured per layer of SmolLM2-135M (9 query heads,
3 KV heads, head size 64), float32, OpenBLAS preloaded:

    queries x context      MLX fast SDPA    this module
    256 x 4,352                 202 ms         57-74 ms
    256 x 12,288                546 ms        157-260 ms
    1 x 12,288 (decode)          15.5 ms        2.7 ms

Results agree with MLX's to 4e-7 (float32 rounding).

What it does: :func:`attention` has the signature of ``mlx_lm.models.base.
scaled_dot_product_attention``. It evaluates queries, keys and values, views them as NumPy
arrays without copying, and computes ``softmax(q k^T) v`` in tiles of query rows sized so that
a tile's scores stay within :data:`TILE_ELEMENTS`; tiles run on a small thread pool (NumPy
releases the GIL, and its element-wise loops are single-threaded). Anything it does not cover
goes to mlx-lm's own function unchanged: other dtypes, batches over 1, an explicit mask array
(sliding windows), quantized KV caches, attention sinks.

How it is hooked in: mlx-lm's model files call ``scaled_dot_product_attention`` by its name in
their own module, so :func:`install` rebinds that one name in the loaded model's module, and
only when MLX computes on the CPU. The server does it at start-up (``--attention``); nothing
else in the process is touched. The cost is one evaluation per layer (MLX can no longer fuse a
whole forward pass lazily), which on the CPU is noise next to the work, and the last layer's
attention during prefill, which MLX skips because only the KV cache is kept: 1/30 of the work
for the bundled model, all of it for a one-layer model (``auto`` leaves those to MLX).

Measured with ``scripts/bench_backend.py`` (bundled SmolLM2-135M, float32, 2-core x86-64, numpy
vs MLX attention): prefill 314 vs 200 tokens/s at 1k, 118 vs 47 at 8k; decode 17.1 vs 15.7
tokens/s at 1k, 9.2 vs 5.7 at 8k.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import logging
import os
import sys
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, NamedTuple

import mlx.core as mx
import numpy as np
from mlx_lm.models import base

log = logging.getLogger(__name__)

# Scores of one tile (query rows x context x heads), in float32 elements: 16M = 64 MB. Measured
# on 256 x 12,288: 1M-element tiles 261 ms, 4M 194 ms, 16M 157 ms (bigger BLAS calls win).
TILE_ELEMENTS = 1 << 24
MODES = ("auto", "numpy", "mlx")

_mlx_attention = base.scaled_dot_product_attention
_NEG_INF = np.float32(-np.inf)
_pool: ThreadPoolExecutor | None = None
_hooks = threading.local()  # .before_layer: the check of the forward pass running on this thread
_pool_lock = threading.Lock()


def _threads() -> int:
    return max(1, min(4, os.cpu_count() or 1))


def _executor() -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(_threads(), thread_name_prefix="ccwarm-attention")
        return _pool


class _ThreadCount(NamedTuple):
    set: Callable[[int], None]
    get: Callable[[], int]


@functools.cache
def _numpy_blas() -> _ThreadCount | None:
    """Setter and getter of the thread count of NumPy's own OpenBLAS; None where it cannot be found."""
    libs = Path(np.__file__).resolve().parent.parent / "numpy.libs"
    for lib in sorted(libs.glob("libscipy_openblas*.so*")):
        try:
            handle = ctypes.CDLL(str(lib))
        except OSError:
            continue
        for suffix in ("64_", ""):
            setter = getattr(handle, f"scipy_openblas_set_num_threads{suffix}", None)
            getter = getattr(handle, f"scipy_openblas_get_num_threads{suffix}", None)
            if setter is not None and getter is not None:
                return _ThreadCount(lambda n, set_=setter: set_(ctypes.c_int(n)), lambda get=getter: int(get()))
    return None


def _numpy_blas_single_threaded() -> bool:
    """Make NumPy's own OpenBLAS run each call on one thread; False where it cannot be found.

    Why: the matmuls here run in NumPy's OpenBLAS while the model's run in the one MLX uses
    (preloaded by ``fast_blas``): two thread pools that spin-wait for work on the same cores.
    Measured on 2 cores, 2k-token prefill of the default model: 89 tokens/s with both at 2
    threads, 163 with NumPy's at 1 (the tiles above bring the parallelism back).
    """
    blas = _numpy_blas()
    if blas is not None:
        blas.set(1)
    return blas is not None


@contextlib.contextmanager
def numpy_blas_threads(n: int) -> Iterator[None]:
    """Run NumPy's OpenBLAS on ``n`` threads inside the block (for work where MLX's BLAS is idle,
    such as cpu_decode's steps), then restore the count it had."""
    blas = _numpy_blas()
    if blas is None:
        yield
        return
    previous = blas.get()
    blas.set(n)
    try:
        yield
    finally:
        blas.set(previous)


def _as_numpy(a: mx.array) -> np.ndarray:
    """A NumPy view of an evaluated MLX array (strided views included), with no copy."""
    return np.asarray(memoryview(a))


@contextlib.contextmanager
def between_layers(check: Callable[[], None]) -> Iterator[None]:
    """Call ``check`` before each layer's attention while the block runs; it may raise to stop a
    forward pass between two layers.

    Why: on the CPU a 512-token prefill chunk at 12k tokens of context takes ~7 s, so checking for
    a cancelled request only between chunks forced ~30-token chunks (to free the worker within a
    second), and those run at 40-45 tokens/s where 512-token ones run at 73. This module already
    evaluates every layer in turn, so a check there costs nothing. A pass stopped this way leaves
    the layers before the stop one chunk ahead: the caller trims them back (see the engine). The
    check runs only where this module computes the attention (float32, see :func:`covers`): the
    caller counts the calls to learn how often a pass really checks. Per thread: a forward pass
    on another thread never runs this one's check.
    """
    previous = getattr(_hooks, "before_layer", None)
    _hooks.before_layer = check
    try:
        yield
    finally:
        _hooks.before_layer = previous


def covers(queries: mx.array, cache: Any, mask: Any, sinks: Any) -> bool:
    """Whether :func:`attention` computes this call itself rather than handing it to mlx-lm."""
    return (
        queries.dtype == mx.float32
        and queries.ndim == 4
        and queries.shape[0] == 1
        and not hasattr(cache, "bits")
        and sinks is None
        and (mask is None or (isinstance(mask, str) and mask == "causal"))
    )


def _tile(
    q: np.ndarray, kt: np.ndarray, v: np.ndarray, out: np.ndarray, start: int, stop: int, offset: int, causal: bool
) -> None:
    """Rows ``start:stop`` of the output; ``offset`` is the absolute position of query row 0."""
    scores = np.matmul(q[:, :, start:stop], kt)  # kv heads, group, rows, context
    if causal:
        # Query row r sits at position offset + r and sees keys up to it; only keys after
        # offset + start can be hidden from any row of this tile.
        first = offset + start
        hidden = np.arange(first, scores.shape[-1])[None, :] > (np.arange(start, stop)[:, None] + offset)
        scores[..., first:][..., hidden] = _NEG_INF
    np.subtract(scores, scores.max(axis=-1, keepdims=True), out=scores)
    np.exp(scores, out=scores)
    total = scores.sum(axis=-1, keepdims=True)
    np.divide(np.matmul(scores, v), total, out=out[:, :, start:stop])


def attention(
    queries: mx.array,
    keys: mx.array,
    values: mx.array,
    cache: Any,
    scale: float,
    mask: Any,
    sinks: mx.array | None = None,
) -> mx.array:
    """``softmax(scale * q k^T + mask) v`` like mlx-lm's, computed in NumPy where it covers the call."""
    if not covers(queries, cache, mask, sinks):
        return _mlx_attention(queries, keys, values, cache=cache, scale=scale, mask=mask, sinks=sinks)
    check = getattr(_hooks, "before_layer", None)
    if check is not None:
        check()
    queries = queries * scale
    mx.eval(queries, keys, values)
    q, k, v = _as_numpy(queries)[0], _as_numpy(keys)[0], _as_numpy(values)[0]
    heads, rows, dim = q.shape
    kv_heads, context, _ = k.shape
    group = heads // kv_heads
    q = q.reshape(kv_heads, group, rows, dim)  # grouped-query: each KV head serves `group` heads
    kt = k.transpose(0, 2, 1)[:, None]
    v = v[:, None]
    out = np.empty((kv_heads, group, rows, dim), np.float32)
    causal = mask == "causal" and rows > 1
    offset = context - rows
    per_tile = max(1, min(TILE_ELEMENTS // max(1, heads * context), -(-rows // _threads())))
    spans = [(i, min(rows, i + per_tile)) for i in range(0, rows, per_tile)]
    if len(spans) == 1:
        _tile(q, kt, v, out, *spans[0], offset, causal)
    else:
        list(_executor().map(lambda span: _tile(q, kt, v, out, *span, offset, causal), spans))
    return mx.array(out.reshape(1, heads, rows, dim))


def install(model: Any, mode: str = "auto") -> str:
    """Route ``model``'s attention through :func:`attention`; returns what was chosen, for the log.

    ``mode`` is ``auto`` (NumPy when MLX computes on the CPU and the model has more than one
    layer), ``numpy`` (also on a GPU, for
    measuring) or ``mlx`` (mlx-lm's own, also undoing an earlier install).
    """
    if mode not in MODES:
        raise ValueError(f"--attention must be one of {', '.join(MODES)}, not {mode!r}")
    module = sys.modules.get(type(model).__module__)
    current: Callable | None = getattr(module, "scaled_dot_product_attention", None)
    if current not in (attention, _mlx_attention):
        log.info("attention: %s does not call mlx-lm's shared attention; keeping its own", type(model).__module__)
        return "mlx"
    # MLX evaluates lazily: a prefill that only keeps the KV cache never computes the last
    # layer's attention, which this module computes eagerly. With one layer that is all of it
    # (the 1-layer test models prefill 25k tokens 35x slower here), so auto keeps MLX's there.
    layers = len(getattr(model, "layers", ()) or ())
    use_numpy = mode == "numpy" or (mode == "auto" and mx.default_device() == mx.cpu and layers != 1)
    module.scaled_dot_product_attention = attention if use_numpy else _mlx_attention
    if not use_numpy:
        return "mlx"
    if not _numpy_blas_single_threaded():
        log.info("attention: NumPy's OpenBLAS not found; its thread count is left as it is")
    return f"numpy ({_threads()} threads)"
