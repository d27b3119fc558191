"""What a KV block is and what names it.

A block holds the K/V of up to `size` consecutive tokens for every layer. Its key hashes the key
of the block before it and its own token ids, starting from a seed that names the model and the
block size, so a key stands for the whole prefix up to the block's end (vLLM's and llama.cpp's
scheme). The index (kv_blocks.py) and the disk tier (kv_block_files.py) both work on these.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from mlx_lm.models.cache import KVCache

from cache_backend.kv_arrays import BlockArrays

DEFAULT_BLOCK_TOKENS = 256


def blockable(layers: Sequence[Any]) -> bool:
    """True when every layer is a plain `KVCache` (positions can be cut and concatenated)."""
    return len(layers) > 0 and all(type(c) is KVCache for c in layers)


def chain_seed(model_fingerprint: str, size: int) -> bytes:
    return hashlib.blake2b(f"ccwarm-kv-blocks/1|{model_fingerprint}|{size}".encode(), digest_size=16).digest()


def block_key(parent: bytes, tokens: np.ndarray) -> bytes:
    """The key of a block: its parent's key and its token ids (little-endian int32)."""
    return hashlib.blake2b(parent + np.ascontiguousarray(tokens, dtype="<i4").tobytes(), digest_size=16).digest()


def chain_keys(seed: bytes, tokens: np.ndarray, size: int) -> list[bytes]:
    """Keys of the whole blocks of `tokens`, in order."""
    keys = []
    parent = seed
    for start in range(0, len(tokens) - size + 1, size):
        parent = block_key(parent, tokens[start : start + size])
        keys.append(parent)
    return keys


@dataclass
class Block:
    """K/V of `tokens`, which start at position `start` after the chain ending at `parent`."""

    key: bytes
    parent: bytes
    start: int
    tokens: np.ndarray
    arrays: BlockArrays | None  # None: not in memory (on disk, or queued for writing)
    nbytes: int = 0  # of the arrays, also while they are on disk only
    last_used: int = 0
    protected: bool = False  # holds tokens of a system + tools prefix
    kind: str = ""  # the save kind of a save that ended at this block's end ("partial": a resume)
    origin: int = 0  # the request whose save created it (what its write is counted against)

    @property
    def end(self) -> int:
        return self.start + len(self.tokens)


@dataclass(frozen=True)
class Match:
    """The longest stored prefix of a prompt: (block, tokens of it used), in chain order; only
    the last part may use fewer tokens than its block holds."""

    parts: tuple[tuple[Block, int], ...] = ()

    @property
    def length(self) -> int:
        return sum(n for _, n in self.parts)
