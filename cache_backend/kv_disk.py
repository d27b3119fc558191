"""The disk tier of the snapshot store: snapshots survive restarts.

Files are mlx-lm `save_prompt_cache` safetensors with our metadata (format version, model
fingerprint, the snapshot's tokens). They are written by a background thread after the response
(never on the request path), to a temporary name and renamed, so a crash leaves either the old
state or the whole new file. At start only the headers are read; arrays load when a lookup picks
a snapshot. Anything unreadable, truncated or made for another model is removed with a warning:
a bad file costs a prefill, never a wrong answer or a crash.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import queue
import struct
import threading
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx_lm.models.cache import load_prompt_cache, save_prompt_cache

from cache_backend.kv_snapshots import Layers, Snapshot, tokens_held

FORMAT = "ccwarm-kv/1"
log = logging.getLogger("ccwarm.kv_disk")


def model_fingerprint(model_dir: Path) -> str:
    """Identity of a model's weights and config, cheap enough to compute at every start.

    Hashes config.json and, per weight file, its size and three 1 MiB samples: two seeds of the
    same architecture differ there, and hashing whole multi-GB files would slow every start.
    """
    h = hashlib.sha256()
    config = model_dir / "config.json"
    h.update(config.read_bytes() if config.exists() else b"")
    for path in sorted(model_dir.glob("*.safetensors")):
        size = path.stat().st_size
        h.update(f"{path.name}:{size}".encode())
        with path.open("rb") as f:
            for offset in (0, max(0, size // 2 - 2**19), max(0, size - 2**20)):
                f.seek(offset)
                h.update(f.read(2**20))
    return h.hexdigest()


def _read_header(path: Path) -> dict[str, str]:
    """The safetensors `__metadata__`, after checking the file is as long as its header says."""
    size = path.stat().st_size
    with path.open("rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise ValueError("shorter than a safetensors header")
        (n,) = struct.unpack("<Q", raw)
        if n > size - 8 or n > 64 * 2**20:
            raise ValueError(f"header length {n} exceeds the file")
        header = json.loads(f.read(n))
    end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end != size:
        raise ValueError(f"truncated: {size} bytes, header describes {8 + n + end}")
    # save_prompt_cache flattens [metadata, classes, scalars]: our own fields are "0.<key>".
    return {k[2:]: v for k, v in header.get("__metadata__", {}).items() if k.startswith("0.")}


class DiskTier:
    """Snapshots as files under `root`, one folder per model, LRU within `budget` bytes."""

    def __init__(self, root: Path, fingerprint: str, budget: int, write_delay: float = 1.0) -> None:
        self.dir = root / "kv" / fingerprint[:16]
        self.dir.mkdir(parents=True, exist_ok=True)
        self.fingerprint = fingerprint
        self.budget = budget
        # A prompt snapshot is usually superseded by its prompt + output snapshot a moment later:
        # waiting a little before writing skips those files instead of writing and deleting them.
        self.write_delay = write_delay
        self.index: dict[str, Snapshot] = {}  # guarded by _lock: the writer thread adds to it
        self._lock = threading.Lock()
        self.removed_bad = 0
        self._forgotten: set[str] = set()
        self._closing = False
        self._queue: queue.Queue[tuple[float, Snapshot] | None] = queue.Queue()
        self._scan()
        self._writer = threading.Thread(target=self._write_loop, name="kv-disk-writer", daemon=True)
        self._writer.start()

    def path(self, snap_id: str) -> Path:
        return self.dir / f"{snap_id}.safetensors"

    @property
    def disk_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.dir.glob("*.safetensors") if not p.name.startswith("."))

    # -- index ----------------------------------------------------------------------------------

    def entries(self) -> list[Snapshot]:
        with self._lock:
            return list(self.index.values())

    def _unindex(self, snap_id: str) -> None:
        with self._lock:
            self.index.pop(snap_id, None)

    def _scan(self) -> None:
        for tmp in self.dir.glob(".*.tmp.safetensors"):
            tmp.unlink(missing_ok=True)  # a write that a crash interrupted
        for path in sorted(self.dir.glob("*.safetensors"), key=lambda p: p.stat().st_mtime):
            try:
                meta = _read_header(path)
                snap = self._snapshot_from_meta(path.stem, meta)
            except (OSError, ValueError, KeyError) as e:
                self._remove_bad(path, str(e))
                continue
            self.index[snap.id] = snap

    def _snapshot_from_meta(self, snap_id: str, meta: dict[str, str]) -> Snapshot:
        if meta.get("format") != FORMAT:
            raise ValueError(f"format {meta.get('format')!r}, expected {FORMAT!r}")
        if meta.get("model") != self.fingerprint:
            raise ValueError("made for another model")
        tokens = np.frombuffer(base64.b64decode(meta["tokens"]), dtype="<i4").astype(np.int32)
        return Snapshot(id=snap_id, tokens=tokens, layers=None, conversation=meta.get("conversation", ""),
                        protected=int(meta.get("protected", 0)), trimmable=meta.get("trimmable") == "1",
                        nbytes=0, on_disk=True)

    def _remove_bad(self, path: Path, why: str) -> None:
        log.warning(f"kv cache: removing unusable snapshot file {path.name}: {why}")
        self.removed_bad += 1
        path.unlink(missing_ok=True)

    # -- reads ----------------------------------------------------------------------------------

    def load(self, snap: Snapshot) -> Layers | None:
        """The snapshot's cache from its file; None (and the file removed) if it is unusable."""
        path = self.path(snap.id)
        try:
            layers, meta = load_prompt_cache(str(path), return_metadata=True)
            if meta.get("model") != self.fingerprint or meta.get("format") != FORMAT:
                raise ValueError("metadata does not match")
            held = tokens_held(layers)
            if held and held != {len(snap)}:
                raise ValueError(f"cache holds {sorted(held)} positions, tokens say {len(snap)}")
            mx.eval([c.state for c in layers])
        except Exception as e:  # any unreadable file is a miss, never a crash
            self._remove_bad(path, str(e))
            self._unindex(snap.id)
            return None
        return layers

    def touch(self, snap: Snapshot) -> None:
        try:
            os.utime(self.path(snap.id))
        except OSError:
            pass

    # -- writes ---------------------------------------------------------------------------------

    def write(self, snap: Snapshot) -> None:
        self._queue.put((time.monotonic(), snap))

    def forget(self, snap: Snapshot) -> None:
        self._forgotten.add(snap.id)
        self._unindex(snap.id)
        self.path(snap.id).unlink(missing_ok=True)

    def flush(self) -> None:
        """Wait until every queued snapshot is on disk (tests, shutdown)."""
        self._queue.join()

    def close(self) -> None:
        self._closing = True  # write what is queued now, without the delay
        self.flush()
        self._queue.put(None)
        self._writer.join(timeout=10)

    def _write_loop(self) -> None:
        # MLX streams are per thread; the arrays are already evaluated, saving only reads them.
        with mx.stream(mx.new_stream(mx.default_device())):
            while True:
                item = self._queue.get()
                try:
                    if item is None:
                        return
                    queued_at, snap = item
                    wait = queued_at + self.write_delay - time.monotonic()
                    if wait > 0 and not self._closing:
                        time.sleep(wait)
                    if snap.id not in self._forgotten and snap.layers is not None:
                        self._write_one(snap)
                except Exception:
                    log.exception("kv cache: could not write a snapshot")
                finally:
                    self._queue.task_done()

    def _write_one(self, snap: Snapshot) -> None:
        meta = {
            "format": FORMAT,
            "model": self.fingerprint,
            "conversation": snap.conversation,
            "protected": str(snap.protected),
            "trimmable": "1" if snap.trimmable else "0",
            "tokens": base64.b64encode(snap.tokens.astype("<i4").tobytes()).decode(),
        }
        tmp = self.dir / f".{snap.id}.tmp.safetensors"
        save_prompt_cache(str(tmp), snap.layers, meta)
        os.replace(tmp, self.path(snap.id))
        if snap.id in self._forgotten:  # superseded while we wrote it
            self.path(snap.id).unlink(missing_ok=True)
            return
        snap.on_disk = True
        with self._lock:
            self.index[snap.id] = Snapshot(id=snap.id, tokens=snap.tokens, layers=None, conversation=snap.conversation,
                                           protected=snap.protected, trimmable=snap.trimmable, on_disk=True)
        self._enforce_budget()

    def _enforce_budget(self) -> None:
        files = sorted((p for p in self.dir.glob("*.safetensors") if not p.name.startswith(".")),
                       key=lambda p: p.stat().st_mtime)
        total = sum(p.stat().st_size for p in files)
        for p in files:
            if total <= self.budget:
                break
            total -= p.stat().st_size
            self._unindex(p.stem)
            p.unlink(missing_ok=True)
