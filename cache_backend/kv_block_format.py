"""The files of the block store's disk tier: what a block file holds, and the record of the
conversations served last.

A block file is safetensors: `k.<layer>` and `v.<layer>` per layer, and metadata (format, model
fingerprint, key, parent key, start, flags, token ids, checksum). The checksum is xxh3-64 over
the token ids, the checked fields and every tensor byte, in the order a restore reads them.
`recent.json` names, newest first, the ends of the conversations served last: (deepest block,
deepest whole block) as hex keys.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np
import xxhash

from cache_backend.kv_arrays import BlockArrays
from cache_backend.kv_files import array_bytes

log = logging.getLogger("ccwarm.kv_block_files")

FORMAT = "ccwarm-kv-block/1"
RECENT_NAME = "recent.json"
RECENT_FORMAT = "ccwarm-kv-recent/1"

CHECKED_FIELDS = ("format", "model", "key", "parent", "start", "protected", "kind")


def checksum_start(tokens: np.ndarray, fields: dict[str, str]) -> xxhash.xxh3_64:
    h = xxhash.xxh3_64(np.ascontiguousarray(tokens, dtype="<i4").tobytes())
    for k in sorted(fields):
        h.update(f"{k}={fields[k]}\n".encode())
    return h


def block_checksum(tokens: np.ndarray, fields: dict[str, str], arrays: BlockArrays) -> str:
    """xxh3-64 over tokens, metadata and tensor bytes, in the order a restore reads them back:
    per layer keys then values, each head's rows in turn. The threat is damage, not an attacker;
    xxh3 runs at ~10 GB/s here (CRC-32 at ~2), and it is part of every restore from disk."""
    h = checksum_start(tokens, fields)
    for layer, (k, v) in enumerate(arrays):
        for name, a in (("k", k), ("v", v)):
            h.update(f"{name}.{layer}:{a.dtype}{tuple(a.shape)}".encode())
            h.update(array_bytes(a))
    return h.hexdigest()


# safetensors dtype names <-> MLX (what save_safetensors writes for a KV cache's dtypes).
_MX_DTYPE = {"F16": mx.float16, "BF16": mx.bfloat16, "F32": mx.float32}


def header_tensors(header: dict) -> list[tuple[tuple[str, Any, list[int], int], tuple[str, Any, list[int], int]]]:
    """Per layer, ((name, MLX dtype, shape, data offset) of the keys, the same of the values)."""
    layers = []
    for layer in range(sum(1 for name in header if name.startswith("k."))):
        pair = []
        for name in ("k", "v"):
            t = header[f"{name}.{layer}"]
            if t["dtype"] not in _MX_DTYPE or len(t["shape"]) != 4:
                raise ValueError(f"{name}.{layer}: dtype {t['dtype']}, shape {t['shape']}")
            pair.append((name, _MX_DTYPE[t["dtype"]], t["shape"], t["data_offsets"][0]))
        layers.append(tuple(pair))
    if not layers:
        raise ValueError("no tensors")
    return layers


def write_recent(folder: Path, ends: list[tuple[bytes, bytes]]) -> int:
    """Replace the record of recent conversations (atomically); returns the bytes written."""
    data = json.dumps({"format": RECENT_FORMAT, "ends": [[a.hex(), b.hex()] for a, b in ends]}).encode()
    tmp = folder / f".{RECENT_NAME}.tmp"
    tmp.write_bytes(data)
    os.replace(tmp, folder / RECENT_NAME)
    return len(data)


def read_recent(folder: Path) -> list[tuple[bytes, bytes]]:
    """The recorded conversations; nothing (and one warning) if the record is unusable."""
    path = folder / RECENT_NAME
    try:
        data = json.loads(path.read_bytes())
        if data.get("format") != RECENT_FORMAT:
            raise ValueError(f"format {data.get('format')!r}, expected {RECENT_FORMAT!r}")
        return [(bytes.fromhex(a), bytes.fromhex(b)) for a, b in data["ends"]]
    except FileNotFoundError:
        return []
    except Exception as e:  # noqa: BLE001 - a bad record costs the warm start, never a failed start
        log.warning(f"kv cache: ignoring {path} ({type(e).__name__}: {e})"[:300])
        return []
