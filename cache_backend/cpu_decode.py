"""One decode step of a float32 Llama model on the CPU, computed with NumPy.

Why this exists: decoding one token is ~20 small operations per layer. On MLX's CPU backend each
one is a graph node that MLX schedules and dispatches, and cpu_attention adds an evaluation per
layer; NumPy runs the same matrix-vector products straight in its OpenBLAS with a few
microseconds of overhead each. Measured on this project's 2-core x86-64 machine, bundled
SmolLM2-135M (float32, 30 layers), one decode step:

    context     MLX + cpu_attention     this module
    1k               82 ms                 42-46 ms
    12k             196-199 ms             93-100 ms

Decode reads every weight and, at long context, the whole KV cache once per token, so it is
memory-bound: what matters is reading at the speed memory delivers and doing little else. Here
the weights' matrix-vector products stream at ~20 GB/s (27 ms of the 1k step); the attention
reads the cache at ~9 GB/s (~65 ms at 12k), against 28 GB/s that two threads can read. Splitting
its context across two threads, matrix-vector products per query head in cache-sized chunks,
``einsum`` and MLX's own matmul all measured slower than the batched ``matmul`` below.

What it covers (``_why_not`` for the model, ``NumpyDecoder.covers`` for the cache): mlx-lm's
``llama`` model class with float32 weights, no biases, plain ``nn.RoPE`` (no RoPE scaling), full
attention in every layer, and a cache of plain ``KVCache`` layers that already hold at least one
token. Anything else decodes through the model's own forward pass, unchanged.

How: the weights are NumPy views of the model's MLX arrays (no copy). A step reads the cached
keys and values through NumPy views, attends over them and the new token's own key and value,
and at the end appends the new keys and values to each layer through ``KVCache.update_and_fetch``,
evaluated once, so mlx-lm's cache keeps its own rules (growth, offsets, buffers shared with a
stored snapshot are never written in place). Results agree with MLX's forward pass to float32
rounding; the tests compare greedy outputs token for token.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models.cache import KVCache

from cache_backend.cpu_attention import numpy_blas_threads

log = logging.getLogger(__name__)

MODES = ("auto", "numpy", "mlx")
_LINEARS = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)


def _view(a: mx.array) -> np.ndarray:
    mx.eval(a)
    return np.asarray(memoryview(a))


def _why_not(model: Any) -> str | None:
    """None when :class:`NumpyDecoder` computes this model's steps, else the reason it does not."""
    if type(model).__module__ != "mlx_lm.models.llama":
        return f"{type(model).__module__} is not mlx-lm's llama"
    inner = getattr(model, "model", None)
    layers = list(getattr(inner, "layers", None) or [])
    if not layers:
        return "the model has no layers"
    if getattr(model.args, "layer_types", None) and set(model.args.layer_types) != {"full_attention"}:
        return "some layers use sliding-window attention"
    for layer in layers:
        if type(layer.self_attn.rope) is not nn.RoPE or layer.self_attn.rope.scale != 1.0:
            return "the model scales RoPE"
        for name in _LINEARS:
            linear = layer
            for part in name.split("."):
                linear = getattr(linear, part)
            if type(linear) is not nn.Linear or "bias" in linear:
                return f"{name} is quantized or has a bias"
            if linear.weight.dtype != mx.float32:
                return f"{name} is {linear.weight.dtype}, not float32"
    if not model.args.tie_word_embeddings and type(getattr(model, "lm_head", None)) is not nn.Linear:
        return "lm_head is quantized"
    if type(inner.embed_tokens) is not nn.Embedding or inner.embed_tokens.weight.dtype != mx.float32:
        return "the embedding is quantized or not float32"
    return None


def _rms_norm(x: np.ndarray, weight: np.ndarray, eps: np.float32) -> np.ndarray:
    return x * (np.float32(1.0) / np.sqrt(np.dot(x, x) / np.float32(x.size) + eps)) * weight


class _Layer:
    """One transformer block's weights as NumPy views."""

    def __init__(self, block: Any) -> None:
        attn, mlp = block.self_attn, block.mlp
        self.norm1 = _view(block.input_layernorm.weight)
        self.norm2 = _view(block.post_attention_layernorm.weight)
        self.eps = np.float32(block.input_layernorm.eps)
        self.q, self.k, self.v, self.o = (_view(p.weight) for p in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj))
        self.gate, self.up, self.down = (_view(p.weight) for p in (mlp.gate_proj, mlp.up_proj, mlp.down_proj))


class NumpyDecoder:
    """Computes ``model(token, cache)``'s logits for one token, for the models ``_why_not`` accepts."""

    def __init__(self, model: Any, threads: int | None = None) -> None:
        reason = _why_not(model)
        if reason is not None:
            raise ValueError(f"NumPy decode does not cover this model: {reason}")
        inner = model.model
        attn = inner.layers[0].self_attn
        self.model = model
        # MLX's BLAS is idle during a step, so NumPy's may use every core (measured on 2).
        self.threads = threads or min(8, os.cpu_count() or 1)
        self.heads, self.kv_heads, self.head_dim = attn.n_heads, attn.n_kv_heads, attn.head_dim
        self.scale = np.float32(attn.scale)
        rope = attn.rope
        self.rope_dims, self.rope_traditional = rope.dims, rope.traditional
        # Angles in float64 then rounded: at 12k+ positions float32 products lose ~1e-3 rad.
        self.inv_freq = 1.0 / (rope.base ** (np.arange(0, rope.dims, 2, dtype=np.float64) / rope.dims))
        self.layers = [_Layer(b) for b in inner.layers]
        self.embed = _view(inner.embed_tokens.weight)
        self.norm = _view(inner.norm.weight)
        self.norm_eps = np.float32(inner.norm.eps)
        self.head = self.embed if model.args.tie_word_embeddings else _view(model.lm_head.weight)

    def covers(self, cache: list[Any]) -> bool:
        """Whether this cache's layers are all plain, non-empty KVCaches this decoder can extend."""
        return len(cache) == len(self.layers) and all(
            type(c) is KVCache and c.keys is not None and c.offset > 0 for c in cache
        )

    def _rotation(self, pos: int) -> tuple[np.ndarray, np.ndarray]:
        """RoPE's cos and sin at ``pos``: the same for every layer, so computed once a step."""
        angles = pos * self.inv_freq
        return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)

    def _rope(self, x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
        d = self.rope_dims
        out = x.copy()
        if self.rope_traditional:  # rotate interleaved pairs (0,1), (2,3), ...
            a, b = x[:, 0:d:2], x[:, 1:d:2]
            out[:, 0:d:2], out[:, 1:d:2] = a * cos - b * sin, b * cos + a * sin
        else:  # rotate the two halves of the rotated dims
            a, b = x[:, : d // 2], x[:, d // 2 : d]
            out[:, : d // 2], out[:, d // 2 : d] = a * cos - b * sin, b * cos + a * sin
        return out

    def _attend(self, q: np.ndarray, k: np.ndarray, v: np.ndarray, keys: np.ndarray, values: np.ndarray) -> np.ndarray:
        """softmax over [cached keys, the new key] for each query head; q is already scaled."""
        group = self.heads // self.kv_heads
        q = q.reshape(self.kv_heads, group, self.head_dim)
        scores = np.matmul(q, keys.transpose(0, 2, 1))  # kv heads, group, context
        own = np.einsum("hgd,hd->hg", q, k)[..., None]
        top = np.maximum(scores.max(axis=-1, keepdims=True), own)
        np.subtract(scores, top, out=scores)
        np.exp(scores, out=scores)
        own = np.exp(own - top)
        total = scores.sum(axis=-1, keepdims=True) + own
        out = (np.matmul(scores, values) + own * v[:, None, :]) / total
        return out.reshape(-1)

    def __call__(self, token: int, cache: list[Any]) -> mx.array:
        """Logits for ``token`` fed at the cache's end, shape (1, vocab); the cache then holds it."""
        pos = cache[0].offset
        new_kv: list[tuple[np.ndarray, np.ndarray]] = []
        cos, sin = self._rotation(pos)
        with numpy_blas_threads(self.threads):
            x = self.embed[token].copy()
            for layer, c in zip(self.layers, cache, strict=True):
                h = _rms_norm(x, layer.norm1, layer.eps)
                q = self._rope((layer.q @ h).reshape(self.heads, self.head_dim), cos, sin) * self.scale
                k = self._rope((layer.k @ h).reshape(self.kv_heads, self.head_dim), cos, sin)
                v = (layer.v @ h).reshape(self.kv_heads, self.head_dim)
                keys, values = _view(c.keys)[0, :, :pos], _view(c.values)[0, :, :pos]
                x = x + layer.o @ self._attend(q, k, v, keys, values)
                h = _rms_norm(x, layer.norm2, layer.eps)
                gate = layer.gate @ h
                x = x + layer.down @ (gate / (np.float32(1.0) + np.exp(-gate)) * (layer.up @ h))
                new_kv.append((k, v))
            logits = self.head @ _rms_norm(x, self.norm, self.norm_eps)
        for c, (k, v) in zip(cache, new_kv, strict=True):
            c.update_and_fetch(mx.array(k[None, :, None, :]), mx.array(v[None, :, None, :]))
        mx.eval([a for c in cache for a in (c.keys, c.values)])
        return mx.array(logits[None])


def decoder_for(model: Any, mode: str = "auto") -> NumpyDecoder | None:
    """The NumPy decoder for ``model``, or None to decode with MLX; logs the choice.

    ``mode``: ``auto`` (NumPy when MLX computes on the CPU and the model is covered), ``numpy``
    (also on a GPU, for measuring; an error when the model is not covered) or ``mlx``.
    """
    if mode not in MODES:
        raise ValueError(f"--decode must be one of {', '.join(MODES)}, not {mode!r}")
    if mode == "mlx" or (mode == "auto" and mx.default_device() != mx.cpu):
        log.info("decode: mlx")
        return None
    reason = _why_not(model)
    if reason is not None:
        if mode == "numpy":
            raise ValueError(f"--decode numpy does not cover this model: {reason}")
        log.info("decode: mlx (%s)", reason)
        return None
    log.info("decode: numpy")
    return NumpyDecoder(model)
