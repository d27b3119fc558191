"""The disk tier of the snapshot store: snapshots survive restarts.

Files are mlx-lm `save_prompt_cache` safetensors with our metadata (format version, model
fingerprint, the snapshot's tokens). They are written by a background thread after the response
(never on the request path), to a temporary name and renamed, so a crash leaves either the old
state or the whole new file. At start only the headers are read; arrays load when a lookup picks
a snapshot, and are checked against the checksum written with them (tokens, metadata, every
tensor byte). Anything unreadable, truncated, damaged, made for another model or not a regular
file is removed, with one warning at start: a bad file costs a prefill, never a wrong answer or
a failed start.
"""

from __future__ import annotations

import base64
import logging
import os
import queue
import stat
import threading
import time
import zlib
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten
from mlx_lm.models.cache import load_prompt_cache, save_prompt_cache

from cache_backend import files
from cache_backend.kv_files import BytesByRequest, array_bytes, safetensors_header
from cache_backend.kv_snapshots import Layers, Snapshot, tokens_held

# 2: a checksum of tokens, metadata and tensors (snapshot_checksum); files of format 1 are removed.
FORMAT = "ccwarm-kv/2"
# The metadata fields covered by the checksum, besides the tokens.
# "conversation" is the on-disk name of a snapshot's save kind (Snapshot.kind): kept, so that
# caches written before the rename stay valid.
_CHECKED = ("format", "model", "conversation", "protected", "trimmable")
log = logging.getLogger("ccwarm.kv_disk")


def snapshot_checksum(tokens: np.ndarray, fields: dict[str, str], layers: Layers) -> str:
    """CRC-32 over a snapshot's tokens, metadata and every tensor byte, as written and as loaded.

    CRC-32 because it runs at ~2.4 GB/s here (SHA-256 ~1.1 GB/s) and the threat is damage, not
    an attacker; it is checked on every load from disk, so its cost is part of a restore.
    """
    crc = zlib.crc32(np.ascontiguousarray(tokens, dtype="<i4").tobytes())
    for k in sorted(fields):
        crc = zlib.crc32(f"{k}={fields[k]}\n".encode(), crc)
    for name, value in tree_flatten([[type(c).__name__, c.state] for c in layers]):
        crc = zlib.crc32(f"{name}:".encode(), crc)
        if isinstance(value, mx.array):
            crc = zlib.crc32(f"{value.dtype}{value.shape}".encode(), crc)
            crc = zlib.crc32(array_bytes(value), crc)
        else:
            crc = zlib.crc32(str(value).encode(), crc)
    return f"{crc:08x}"


def _read_header(path: Path) -> dict[str, str]:
    """Our metadata fields of a snapshot file."""
    header = safetensors_header(path)
    # save_prompt_cache flattens [metadata, classes, scalars]: our own fields are "0.<key>".
    return {k[2:]: v for k, v in header.get("__metadata__", {}).items() if k.startswith("0.")}


class DiskTier:
    """Snapshots as files under `root`, one folder per model, LRU within `budget` bytes.

    A snapshot handed to :meth:`write` stays findable (``entries``, with its arrays) until its
    file is durable, even if the memory tier evicts it meanwhile; and a file it supersedes
    (:meth:`forget` with ``replaced_by``) is deleted only once the replacement is on disk.
    """

    def __init__(self, root: Path, fingerprint: str, budget: int, write_delay: float = 1.0) -> None:
        self.dir = root / "kv" / fingerprint[:16]
        self.dir.mkdir(parents=True, exist_ok=True)
        self.fingerprint = fingerprint
        self.budget = budget
        # A prompt snapshot is usually superseded by its prompt + output snapshot a moment later:
        # waiting a little before writing skips those files instead of writing and deleting them.
        self.write_delay = write_delay
        # Guarded by _lock (the writer thread changes them): snapshots with a file, snapshots
        # queued for writing (their arrays held until written), and files to delete once the
        # snapshot named by the key is durable.
        self.index: dict[str, Snapshot] = {}
        self.pending: dict[str, Snapshot] = {}
        self._after_write: dict[str, list[str]] = {}
        self._lock = threading.Lock()
        self.removed_bad = 0
        self.bytes_written = 0
        self.written_by_request = BytesByRequest()
        self._forgotten: set[str] = set()
        self._closing = False
        self._queue: queue.Queue[tuple[float, Snapshot] | None] = queue.Queue()
        self._scan()
        self._writer = threading.Thread(target=self._write_loop, name="kv-disk-writer", daemon=True)
        self._writer.start()

    def path(self, snap_id: str) -> Path:
        return self.dir / f"{snap_id}.safetensors"

    def _files(self) -> list[tuple[Path, os.stat_result]]:
        """Committed snapshot files (regular files, not temporaries), oldest first."""
        out = []
        for entry in os.scandir(self.dir):
            if entry.name.startswith(".") or not entry.name.endswith(".safetensors"):
                continue
            try:
                st = entry.stat(follow_symlinks=False)
            except OSError:
                continue  # removed meanwhile
            if stat.S_ISREG(st.st_mode):
                out.append((Path(entry.path), st))
        return sorted(out, key=lambda f: f[1].st_mtime)

    @property
    def disk_bytes(self) -> int:
        return sum(st.st_size for _, st in self._files())

    @property
    def pending_bytes(self) -> int:
        """Bytes of snapshots waiting for their file: held in RAM on top of --cache-memory."""
        with self._lock:
            return sum(s.nbytes for s in self.pending.values())

    # -- index ----------------------------------------------------------------------------------

    def entries(self) -> list[Snapshot]:
        """Every snapshot this tier can restore: on disk (arrays not loaded) or still queued."""
        with self._lock:
            return list(self.index.values()) + [s for k, s in self.pending.items() if k not in self.index]

    def _unindex(self, snap_id: str) -> None:
        with self._lock:
            self.index.pop(snap_id, None)

    def _scan(self) -> None:
        bad: list[str] = []
        for entry in sorted(self.dir.iterdir(), key=_mtime):
            name = entry.name
            if name.startswith(".") and name.endswith(".tmp.safetensors"):
                files.remove(entry, log)  # a write that a crash interrupted: expected, not worth a warning
                continue
            if not name.endswith(".safetensors"):
                continue  # token logs and anything else the folder holds
            try:
                if entry.is_symlink() or not entry.is_file():
                    raise ValueError("not a regular file")
                snap = self._snapshot_from_meta(entry.stem, _read_header(entry))
            except Exception as e:  # noqa: BLE001 - any unreadable entry is skipped, never a failed start
                bad.append(f"{name} ({type(e).__name__}: {e})"[:200])
                self.removed_bad += 1
                files.remove(entry, log)
                continue
            self.index[snap.id] = snap
        if bad:
            log.warning(
                f"kv cache: removed {len(bad)} unusable entr{'y' if len(bad) == 1 else 'ies'} from {self.dir}: "
                + "; ".join(bad[:5])
                + ("; ..." if len(bad) > 5 else "")
            )

    def _snapshot_from_meta(self, snap_id: str, meta: dict[str, str]) -> Snapshot:
        if meta.get("format") != FORMAT:
            raise ValueError(f"format {meta.get('format')!r}, expected {FORMAT!r}")
        if meta.get("model") != self.fingerprint:
            raise ValueError("made for another model")
        if not meta.get("checksum"):
            raise ValueError("no checksum")
        tokens = np.frombuffer(base64.b64decode(meta["tokens"], validate=True), dtype="<i4").astype(np.int32)
        return Snapshot(
            id=snap_id,
            tokens=tokens,
            layers=None,
            kind=meta.get("conversation", ""),
            protected=int(meta.get("protected", 0)),
            trimmable=meta.get("trimmable") == "1",
            nbytes=0,
            on_disk=True,
        )

    def _remove_bad(self, path: Path, why: str) -> None:
        log.warning(f"kv cache: removing unusable snapshot file {path.name}: {why}")
        self.removed_bad += 1
        files.remove(path, log)

    # -- reads ----------------------------------------------------------------------------------

    def load(self, snap: Snapshot) -> Layers | None:
        """The snapshot's cache, from memory if its write is still queued, else from its file
        (checked against its checksum); None (and the file removed) if it is unusable."""
        with self._lock:
            queued = self.pending.get(snap.id)
        if queued is not None and queued.layers is not None:
            return queued.layers
        path = self.path(snap.id)
        try:
            layers, meta = load_prompt_cache(str(path), return_metadata=True)
            if meta.get("model") != self.fingerprint or meta.get("format") != FORMAT:
                raise ValueError("metadata does not match")
            held = tokens_held(layers)
            if held and held != {len(snap)}:
                raise ValueError(f"cache holds {sorted(held)} positions, tokens say {len(snap)}")
            mx.eval([c.state for c in layers])
            fields = {k: meta.get(k, "") for k in _CHECKED}
            if snapshot_checksum(snap.tokens, fields, layers) != meta.get("checksum"):
                raise ValueError("checksum mismatch: the file was damaged after it was written")
        except Exception as e:  # noqa: BLE001 - any unreadable file is a miss, never a crash
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
        with self._lock:
            self.pending[snap.id] = snap
        self._queue.put((time.monotonic(), snap))

    def forget(self, snap: Snapshot, replaced_by: Snapshot | None = None) -> None:
        """Drop `snap`; with `replaced_by`, its file goes only when the replacement's is durable."""
        with self._lock:
            self._forgotten.add(snap.id)
            self.index.pop(snap.id, None)
            self.pending.pop(snap.id, None)
            later = self._after_write.pop(snap.id, []) + [snap.id]
            durable = replaced_by is None or (replaced_by.on_disk and replaced_by.id not in self.pending)
            if not durable:
                self._after_write.setdefault(replaced_by.id, []).extend(later)
                return
        for snap_id in later:
            self.path(snap_id).unlink(missing_ok=True)

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
                    with self._lock:
                        if item is not None and self.pending.get(item[1].id) is item[1]:
                            del self.pending[item[1].id]
                    self._queue.task_done()

    def _write_one(self, snap: Snapshot) -> None:
        fields = {
            "format": FORMAT,
            "model": self.fingerprint,
            "conversation": snap.kind,
            "protected": str(snap.protected),
            "trimmable": "1" if snap.trimmable else "0",
        }
        meta = dict(
            fields,
            tokens=base64.b64encode(snap.tokens.astype("<i4").tobytes()).decode(),
            checksum=snapshot_checksum(snap.tokens, fields, snap.layers),
        )
        tmp = self.dir / f".{snap.id}.tmp.safetensors"
        save_prompt_cache(str(tmp), snap.layers, meta)
        os.replace(tmp, self.path(snap.id))
        with self._lock:
            superseded = snap.id in self._forgotten
            if not superseded:
                snap.on_disk = True
                self.index[snap.id] = Snapshot(
                    id=snap.id,
                    tokens=snap.tokens,
                    layers=None,
                    kind=snap.kind,
                    protected=snap.protected,
                    trimmable=snap.trimmable,
                    on_disk=True,
                )
                self.pending.pop(snap.id, None)
            replaced = self._after_write.pop(snap.id, [])
        try:
            size = self.path(snap.id).stat().st_size
            self.bytes_written += size
            self.written_by_request.add(snap.origin, size)
        except OSError:
            pass
        if superseded:  # superseded while we wrote it (its replacement took over `replaced`)
            self.path(snap.id).unlink(missing_ok=True)
            return
        for old in replaced:
            self.path(old).unlink(missing_ok=True)
        self._enforce_budget()

    def _enforce_budget(self) -> None:
        files = self._files()
        total = sum(st.st_size for _, st in files)
        for p, st in files:
            if total <= self.budget:
                break
            total -= st.st_size
            self._unindex(p.stem)
            p.unlink(missing_ok=True)


def _mtime(path: Path) -> float:
    try:
        return path.lstat().st_mtime
    except OSError:
        return 0.0
