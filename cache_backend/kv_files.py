"""What the two disk tiers (kv_disk.py: whole snapshots; kv_block_files.py: blocks) share: the
model fingerprint that keeps one model's KV from another's, safetensors headers read without
loading tensors, tensor bytes for checksums, and bytes written counted per request.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
import threading
from pathlib import Path
from typing import Any, BinaryIO

import mlx.core as mx
import numpy as np

log = logging.getLogger("ccwarm.kv_files")


def model_fingerprint(model_dir: Path, hashes: Path | None = None) -> str:
    """Identity of a model's weights and config: changes when any byte of any weight changes.

    Each weight file contributes its name, size and a SHA-256 of its whole content. That hash
    costs ~1 s per GB, so it is computed once per file and kept in `hashes` (a JSON file keyed by
    the file's resolved path, size, mtime and inode); later starts only stat the files.
    """
    known = _read_hashes(hashes)
    h = hashlib.sha256()
    config = model_dir / "config.json"
    h.update(config.read_bytes() if config.is_file() else b"")
    changed = False
    for path in sorted(p for p in model_dir.glob("*.safetensors") if p.is_file()):
        st = path.stat()
        key = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{st.st_ino}"
        digest = known.get(key)
        if not isinstance(digest, str):
            digest = known[key] = _file_sha256(path, st.st_size)
            changed = True
        h.update(f"{path.name}:{st.st_size}:{digest}\n".encode())
    if changed and hashes is not None:
        _write_hashes(hashes, known)
    return h.hexdigest()


def _file_sha256(path: Path, size: int) -> str:
    h = hashlib.sha256()
    if size > 2**30:
        log.info(
            f"kv cache: hashing {path.name} ({size / 2**30:.1f} GB) once, to tell its snapshots from other models'"
        )
    with path.open("rb") as f:
        while chunk := f.read(2**24):
            h.update(chunk)
    return h.hexdigest()


def _read_hashes(path: Path | None) -> dict[str, Any]:
    if path is None:
        return {}
    try:
        known = json.loads(path.read_text(encoding="utf-8"))
        return known if isinstance(known, dict) else {}
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, RecursionError) as e:
        log.warning(f"kv cache: ignoring unreadable {path.name} ({e}); weight hashes are computed again")
        return {}


def _write_hashes(path: Path, known: dict[str, Any]) -> None:
    # Keep the newest entries only: a model updated in place leaves its old keys behind.
    items = list(known.items())[-256:]
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(dict(items)), encoding="utf-8")
        os.replace(tmp, path)
    except OSError as e:
        log.warning(f"kv cache: cannot save weight hashes to {path} ({e}); they are computed again next start")


def array_bytes(a: mx.array) -> np.ndarray:
    """An array's bytes as NumPy sees them (for checksums)."""
    if a.dtype == mx.bfloat16:  # NumPy has no bfloat16: the same bytes as 16-bit integers
        a = a.view(mx.uint16)
    return np.ascontiguousarray(np.asarray(memoryview(a)))


def weight_hashes_path(cache_dir: Path | None) -> Path | None:
    """Where model_fingerprint keeps its per-file hashes under a cache folder (both disk tiers)."""
    return cache_dir / "kv" / "weight-hashes.json" if cache_dir is not None else None


def safetensors_header(path: Path, f: BinaryIO | None = None) -> dict[str, Any]:
    """A safetensors file's JSON header, after checking the file is as long as it says.

    `f`: the file already open at its start, to read it through one handle; it is left at the
    first tensor byte (where the header's data offsets count from)."""
    if f is None:
        with path.open("rb") as opened:
            return safetensors_header(path, opened)
    size = os.fstat(f.fileno()).st_size
    raw = f.read(8)
    if len(raw) < 8:
        raise ValueError("shorter than a safetensors header")
    (n,) = struct.unpack("<Q", raw)
    if n > size - 8 or n > 64 * 2**20:
        raise ValueError(f"header length {n} exceeds the file")
    header = json.loads(f.read(n))
    if not isinstance(header, dict):
        raise ValueError("header is not a JSON object")
    end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end != size:
        raise ValueError(f"truncated: {size} bytes, header describes {8 + n + end}")
    return header


class BytesByRequest:
    """Bytes written for the saves of each recent request (writes land after the request ended)."""

    def __init__(self, keep: int = 256) -> None:
        self.keep = keep
        self._bytes: dict[int, int] = {}
        self._lock = threading.Lock()

    def add(self, request: int, n: int) -> None:
        with self._lock:
            self._bytes[request] = self._bytes.get(request, 0) + n
            while len(self._bytes) > self.keep:
                del self._bytes[min(self._bytes)]

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return {str(k): v for k, v in sorted(self._bytes.items())}
