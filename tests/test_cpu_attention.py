"""cache_backend.cpu_attention: NumPy attention agrees with mlx-lm's on every shape the models
send (prefill from 0, a chunk at an offset, decode, grouped-query heads, many tiles), hands what
it does not cover back to mlx-lm, and ``install`` routes a real model both ways. No timing is
asserted here: ``scripts/bench_backend.py --attention numpy mlx`` measures the speed."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.models.cache import KVCache, QuantizedKVCache

from cache_backend import cpu_attention

# Float32 rounding: the two sum in a different order.
TOLERANCE = 2e-5


def _qkv(
    rows: int,
    context: int,
    heads: int = 9,
    kv_heads: int = 3,
    dim: int = 64,
    seed: int = 0,
    dtype: mx.Dtype = mx.float32,
) -> tuple[mx.array, mx.array, mx.array]:
    key = mx.random.key(seed)
    k1, k2, k3 = mx.random.split(key, 3)
    q = mx.random.normal((1, heads, rows, dim), key=k1).astype(dtype)
    k = mx.random.normal((1, kv_heads, context, dim), key=k2).astype(dtype)
    v = mx.random.normal((1, kv_heads, context, dim), key=k3).astype(dtype)
    return q, k, v


def _both(q, k, v, mask, cache=None) -> tuple[np.ndarray, np.ndarray]:
    scale = q.shape[-1] ** -0.5
    ours = cpu_attention.attention(q, k, v, cache=cache, scale=scale, mask=mask)
    theirs = cpu_attention._mlx_attention(q, k, v, cache=cache, scale=scale, mask=mask)
    return np.array(ours.astype(mx.float32)), np.array(theirs.astype(mx.float32))


@pytest.mark.parametrize(
    ("rows", "context", "mask"),
    [
        (64, 64, "causal"),  # prefill of a prompt's first chunk
        (37, 300, "causal"),  # a later chunk: queries start at position 263
        (1, 500, None),  # decode
        (5, 5, None),  # no mask at all: every row sees every key
    ],
)
def test_matches_mlx(rows: int, context: int, mask) -> None:
    q, k, v = _qkv(rows, context)
    assert cpu_attention.covers(q, None, mask, None)
    ours, theirs = _both(q, k, v, mask)
    assert ours.shape == theirs.shape == (1, 9, rows, 64)
    assert np.abs(ours - theirs).max() < TOLERANCE


def test_causal_mask_really_hides_later_keys() -> None:
    """Changing a key after every query position must not change any output row."""
    q, k, v = _qkv(8, 40, heads=4, kv_heads=4, dim=16, seed=3)
    base = np.array(cpu_attention.attention(q, k, v, cache=None, scale=0.25, mask="causal"))
    k2 = np.array(k)
    v2 = np.array(v)
    k2[:, :, 39] += 5.0  # position 39 is the last query's own position: only row 7 sees it
    v2[:, :, 39] -= 5.0
    moved = np.array(cpu_attention.attention(q, mx.array(k2), mx.array(v2), cache=None, scale=0.25, mask="causal"))
    assert np.array_equal(base[:, :, :7], moved[:, :, :7])
    assert not np.allclose(base[:, :, 7], moved[:, :, 7])


def test_many_tiles_match_one(monkeypatch: pytest.MonkeyPatch) -> None:
    q, k, v = _qkv(50, 120, seed=1)
    whole = np.array(cpu_attention.attention(q, k, v, cache=None, scale=0.125, mask="causal"))
    # 9 heads x 120 keys per row: a limit of 3 rows per tile gives 17 tiles on the thread pool.
    monkeypatch.setattr(cpu_attention, "TILE_ELEMENTS", 9 * 120 * 3)
    tiled = np.array(cpu_attention.attention(q, k, v, cache=None, scale=0.125, mask="causal"))
    assert np.abs(whole - tiled).max() < TOLERANCE


def test_strided_cache_views() -> None:
    """The KV cache hands attention a slice of a bigger buffer (its step-sized allocation)."""
    cache = KVCache()
    _, k, v = _qkv(1, 300, seed=2)
    keys, values = cache.update_and_fetch(k, v)  # buffer of 512 positions, 300 used
    q, _, _ = _qkv(1, 300, seed=5)
    ours, theirs = _both(q, keys, values, None, cache=cache)
    assert np.abs(ours - theirs).max() < TOLERANCE


def test_hands_uncovered_calls_to_mlx() -> None:
    q, k, v = _qkv(6, 6)
    window = mx.array(np.tril(np.ones((6, 6), bool)) & np.triu(np.ones((6, 6), bool), -2))
    half = tuple(a.astype(mx.float16) for a in (q, k, v))
    assert not cpu_attention.covers(q, None, window, None)  # sliding-window mask array
    assert not cpu_attention.covers(half[0], None, "causal", None)  # not float32
    assert not cpu_attention.covers(q, QuantizedKVCache(), "causal", None)
    assert not cpu_attention.covers(q, None, "causal", mx.zeros((9,)))  # attention sinks
    assert not cpu_attention.covers(mx.concatenate([q, q]), None, "causal", None)  # batch of 2
    ours, theirs = _both(q, k, v, window)
    assert np.array_equal(ours, theirs)
    ours, theirs = _both(*half, "causal")
    assert np.array_equal(ours, theirs)


def test_install_routes_a_real_model_both_ways(tiny_model_dir) -> None:
    import sys

    from mlx_lm import load

    model, _ = load(str(tiny_model_dir))
    module = sys.modules[type(model).__module__]
    tokens = mx.array([[1, 5, 9, 14, 2, 7, 30, 11]])
    try:
        assert cpu_attention.install(model, "numpy").startswith("numpy")
        assert module.scaled_dot_product_attention is cpu_attention.attention
        with_numpy = np.array(model(tokens))
        assert cpu_attention.install(model, "mlx") == "mlx"
        assert module.scaled_dot_product_attention is cpu_attention._mlx_attention
        with_mlx = np.array(model(tokens))
    finally:
        cpu_attention.install(model, "mlx")
    assert np.abs(with_numpy - with_mlx).max() < 1e-4
    assert (with_numpy.argmax(-1) == with_mlx.argmax(-1)).all()
    with pytest.raises(ValueError, match="--attention must be one of auto, numpy, mlx, not 'fast'"):
        cpu_attention.install(model, "fast")


def test_auto_leaves_one_layer_models_to_mlx(tiny_model_dir, tmp_path) -> None:
    """MLX never computes a lone layer's attention in a prefill (only its KV cache is kept)."""
    import sys

    from mlx_lm import load

    from cache_backend.testing.tiny_model import make_tiny_model

    two, _ = load(str(tiny_model_dir))
    one, _ = load(str(make_tiny_model(tmp_path / "one-layer", seed=0, num_layers=1)))
    module = sys.modules[type(two).__module__]
    try:
        expected = "numpy" if mx.default_device() == mx.cpu else "mlx"
        assert cpu_attention.install(two, "auto").split()[0] == expected
        assert cpu_attention.install(one, "auto") == "mlx"
        assert module.scaled_dot_product_attention is cpu_attention._mlx_attention
    finally:
        cpu_attention.install(two, "mlx")
