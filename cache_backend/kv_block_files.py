"""The disk tier of the block store: one file per block, written once, loaded only when needed.

Layout: `<root>/kv/<model fingerprint[:16]>/blocks-<size>/<key[:2]>/<key>.safetensors`, holding
the block's K/V per layer (`k.<layer>`, `v.<layer>`) and metadata: format, model fingerprint,
parent key, start position, token ids, flags, and an xxh3-64 checksum over tokens, metadata
and every tensor byte. A block is written at most once: a turn writes only the blocks it created.

Writes happen on a background thread, a moment after the save (a tail, the partial last block
of a save, waits longer: the next turn usually turns it into whole blocks, and a crash then
costs at most one tail of prefill per conversation), to a temporary name that is renamed, so a
crash leaves either no file or a whole one. While the engine serves a request, due writes wait
for it to finish (the writer would take a core from the prefill: a user's next turn often comes
just when the last one's blocks fall due), unless they have waited `max_defer` seconds or the
blocks only the queue holds pass `defer_bytes`. Until it is written, a block's arrays stay here and
it can be loaded from memory, even after the memory tier evicted it.

At start only headers are read. Arrays load when a restore needs them and are checked: the
checksum, and the key, which must equal the hash of the parent key and the tokens. Anything
unreadable, damaged, made for another model or not a regular file is removed (one warning at
start): a bad block costs a prefill of its span, never a wrong answer or a failed start.

Beside the blocks, `recent.json` names the ends of the conversations served last (a few hundred
bytes, rewritten after each answer), so a restart knows which blocks to load back first. The
files' format is in kv_block_format.py.
"""

from __future__ import annotations

import base64
import heapq
import itertools
import logging
import os
import stat
import threading
import time
from pathlib import Path

import mlx.core as mx
import numpy as np

from cache_backend import files
from cache_backend.kv_arrays import BlockArrays, Layout, Views, copy_into, layout_of
from cache_backend.kv_block_format import (
    CHECKED_FIELDS,
    FORMAT,
    block_checksum,
    checksum_start,
    header_tensors,
    read_recent,
    write_recent,
)
from cache_backend.kv_block_keys import Block, block_key
from cache_backend.kv_files import BytesByRequest, safetensors_header

log = logging.getLogger("ccwarm.kv_block_files")


class BlockFiles:
    """Blocks as files under `root`; the block store decides what is kept (it owns the index)."""

    def __init__(
        self,
        root: Path,
        fingerprint: str,
        size: int,
        write_delay: float = 1.0,
        tail_delay: float = 10.0,
        max_defer: float = 30.0,
        defer_bytes: int = 512 * 2**20,
    ) -> None:
        self.dir = root / "kv" / fingerprint[:16] / f"blocks-{size}"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.fingerprint = fingerprint
        self.size = size
        self.write_delay = write_delay
        self.tail_delay = tail_delay
        self.max_defer = max_defer
        self.defer_bytes = defer_bytes
        self._busy = False  # a request is being served: due writes wait (see the module docstring)
        # Guarded by _cond: file sizes of durable blocks; blocks queued for writing, with their
        # arrays (the memory tier may let go of them meanwhile); the queue ordered by due time.
        self._cond = threading.Condition()
        self._sizes: dict[bytes, int] = {}
        self._pending: dict[bytes, tuple[Block, BlockArrays]] = {}
        self._due: list[tuple[float, int, bytes]] = []
        self._seq = itertools.count()
        self._urgent = 0  # flushes waiting: write what is queued without the delay
        self._closing = False
        self.removed_bad = 0
        self.bytes_written = 0
        self.blocks_written = 0
        self.written_by_request = BytesByRequest()
        self._writer = threading.Thread(target=self._write_loop, name="kv-block-writer", daemon=True)
        self._writer.start()

    def path(self, key: bytes) -> Path:
        h = key.hex()
        return self.dir / h[:2] / f"{h}.safetensors"

    # -- state ----------------------------------------------------------------------------------

    def has(self, key: bytes) -> bool:
        """Durable, or queued (its arrays held here until written)."""
        with self._cond:
            return key in self._sizes or key in self._pending

    def durable(self, key: bytes) -> bool:
        with self._cond:
            return key in self._sizes

    @property
    def disk_bytes(self) -> int:
        with self._cond:
            return sum(self._sizes.values())

    @property
    def blocks_on_disk(self) -> int:
        with self._cond:
            return len(self._sizes)

    @property
    def pending_bytes(self) -> int:
        """Queued arrays that only the queue holds (the memory tier let go of them): RAM on top
        of the memory budget."""
        with self._cond:
            return self._held_bytes()

    def _held_bytes(self) -> int:
        return sum(b.nbytes for b, arrays in self._pending.values() if b.arrays is not arrays)

    def set_busy(self, busy: bool) -> None:
        """The engine starts (True) or ends (False) a request."""
        with self._cond:
            self._busy = busy
            self._cond.notify_all()

    # -- start ----------------------------------------------------------------------------------

    def scan(self) -> list[Block]:
        """Every readable block's header (arrays not loaded); unusable files are removed."""
        found: list[Block] = []
        bad: list[str] = []
        for sub in sorted(self.dir.iterdir()) if self.dir.is_dir() else []:
            if not sub.is_dir() or sub.is_symlink():
                continue
            for entry in os.scandir(sub):
                path = Path(entry.path)
                if entry.name.startswith("."):
                    files.remove(path, log)  # a write a crash interrupted: expected
                    continue
                try:
                    st = entry.stat(follow_symlinks=False)
                    if not stat.S_ISREG(st.st_mode):
                        raise ValueError("not a regular file")
                    block = self._block_from_header(path)
                except Exception as e:  # noqa: BLE001 - any unreadable entry is skipped, never a failed start
                    bad.append(f"{entry.name} ({type(e).__name__}: {e})"[:200])
                    self.removed_bad += 1
                    files.remove(path, log)
                    continue
                found.append(block)
                self._sizes[block.key] = st.st_size
        if bad:
            log.warning(
                f"kv cache: removed {len(bad)} unusable entr{'y' if len(bad) == 1 else 'ies'} from {self.dir}: "
                + "; ".join(bad[:5])
                + ("; ..." if len(bad) > 5 else "")
            )
        return found

    def _block_from_header(self, path: Path) -> Block:
        header = safetensors_header(path)
        meta = header.get("__metadata__", {})
        if meta.get("format") != FORMAT:
            raise ValueError(f"format {meta.get('format')!r}, expected {FORMAT!r}")
        if meta.get("model") != self.fingerprint:
            raise ValueError("made for another model")
        if meta.get("key") != path.stem or not meta.get("checksum"):
            raise ValueError("key or checksum missing")
        tokens = np.frombuffer(base64.b64decode(meta["tokens"], validate=True), dtype="<i4").astype(np.int32)
        nbytes = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
        return Block(
            key=bytes.fromhex(meta["key"]),
            parent=bytes.fromhex(meta["parent"]),
            start=int(meta["start"]),
            tokens=tokens,
            arrays=None,
            nbytes=nbytes,
            protected=meta.get("protected") == "1",
            kind=meta.get("kind", ""),
        )

    # -- the conversations served last ----------------------------------------------------------

    def save_recent(self, ends: list[tuple[bytes, bytes]], request: int) -> None:
        """Record the conversations served last (see kv_block_format.write_recent)."""
        n = write_recent(self.dir, ends)
        with self._cond:
            self.bytes_written += n
        self.written_by_request.add(request, n)

    def load_recent(self) -> list[tuple[bytes, bytes]]:
        return read_recent(self.dir)

    # -- reads ----------------------------------------------------------------------------------

    def layout(self, block: Block) -> Layout | None:
        """Per layer (KV heads, key dim, value dim, dtype), from the block's queued arrays or its
        file's header; None (and the file removed) if it is unusable. A read error that may pass
        (out of file handles, an I/O error) is raised as OSError and removes nothing."""
        with self._cond:
            queued = self._pending.get(block.key)
        if queued is not None:
            return layout_of(queued[1])
        try:
            tensors = header_tensors(safetensors_header(self.path(block.key)))
            return [(k[2][1], k[2][3], v[2][3], k[1]) for k, v in tensors]
        except OSError as e:
            if not isinstance(e, FileNotFoundError):
                raise
            self._bad(block.key, str(e))
            return None
        except Exception as e:  # noqa: BLE001 - an unreadable header is a miss
            self._bad(block.key, str(e))
            return None

    def read_into(self, block: Block, n: int, views: Views, at: int) -> bool | None:
        """Copy the block's first `n` positions into `views` at position `at`, straight from its
        file, checking its key and checksum; False (and the file removed) if it is unusable, None
        (nothing removed) on a read error that may pass (out of file handles, an I/O error).

        Called on restore threads: NumPy and file reads only, no MLX.
        """
        with self._cond:
            queued = self._pending.get(block.key)
        if queued is not None:
            copy_into(queued[1], n, views, at)
            return True
        path = self.path(block.key)
        try:
            with path.open("rb") as f:
                header = safetensors_header(path, f)
                data = f.tell()  # tensor offsets count from here
                meta = header.get("__metadata__", {})
                if meta.get("model") != self.fingerprint or meta.get("format") != FORMAT:
                    raise ValueError("metadata does not match")
                tokens = np.frombuffer(base64.b64decode(meta["tokens"], validate=True), dtype="<i4")
                parent = bytes.fromhex(meta["parent"])
                if not np.array_equal(tokens, block.tokens) or block_key(parent, tokens) != block.key:
                    raise ValueError("tokens do not hash to the block's key")
                fields = {k: meta.get(k, "") for k in CHECKED_FIELDS}
                digest = checksum_start(tokens, fields)
                tensors = header_tensors(header)
                if len(tensors) != len(views):
                    raise ValueError(f"{len(tensors)} layers, the model has {len(views)}")
                for layer, (pair, dest) in enumerate(zip(tensors, views, strict=True)):
                    for (name, dtype, shape, offset), d in zip(pair, dest, strict=True):
                        if shape[0] != 1 or shape[2] != len(tokens) or (shape[1], shape[3]) != (d.shape[1], d.shape[3]):
                            raise ValueError(f"{name}.{layer} has shape {shape}")
                        digest.update(f"{name}.{layer}:{dtype}{tuple(shape)}".encode())
                        f.seek(data + offset)
                        target = d if n == len(tokens) else np.empty((1, shape[1], shape[2], shape[3]), d.dtype)
                        start = at if n == len(tokens) else 0
                        for head in range(shape[1]):
                            chunk = target[0, head, start : start + shape[2], :]
                            if f.readinto(memoryview(chunk).cast("B")) != chunk.nbytes:
                                raise ValueError("the file ends early")
                            digest.update(chunk)
                        if target is not d:
                            d[:, :, at : at + n, :] = target[:, :, :n, :]
            if digest.hexdigest() != meta.get("checksum"):
                raise ValueError("checksum mismatch: the file was damaged after it was written")
        except OSError as e:
            if isinstance(e, FileNotFoundError):
                self._bad(block.key, str(e))
                return False
            log.warning(f"kv cache: cannot read block file {path.name} now ({e}); its span is prefilled")
            return None
        except Exception as e:  # noqa: BLE001 - any unreadable file is a miss, never a crash
            self._bad(block.key, str(e))
            return False
        return True

    def _bad(self, key: bytes, why: str) -> None:
        log.warning(f"kv cache: removing unusable block file {self.path(key).name}: {why}")
        self.removed_bad += 1
        self.delete(key)

    # -- writes ---------------------------------------------------------------------------------

    def write(self, block: Block) -> None:
        """Queue a new block (its arrays must be set); it is written once, after a delay."""
        assert block.arrays is not None
        tail = len(block.tokens) < self.size
        due = time.monotonic() + (self.tail_delay if tail else self.write_delay)
        with self._cond:
            if block.key in self._sizes or block.key in self._pending:
                return
            self._pending[block.key] = (block, block.arrays)
            heapq.heappush(self._due, (due, next(self._seq), block.key))
            self._cond.notify_all()

    def delete(self, key: bytes) -> None:
        with self._cond:
            self._pending.pop(key, None)
            known = self._sizes.pop(key, None) is not None
            self._cond.notify_all()
        if known:
            self.path(key).unlink(missing_ok=True)

    def flush(self) -> None:
        """Write everything queued now, tails included, and wait for it (tests, shutdown)."""
        with self._cond:
            self._urgent += 1
            self._cond.notify_all()
            try:
                while self._pending and self._writer.is_alive():
                    self._cond.wait(0.1)
            finally:
                self._urgent -= 1

    def close(self) -> None:
        self.flush()
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        self._writer.join(timeout=10)

    def _next(self) -> tuple[Block, BlockArrays] | None:
        """The next block due (waiting for it); None when closing."""
        with self._cond:
            while True:
                if self._closing:
                    return None
                while self._due and self._due[0][2] not in self._pending:
                    heapq.heappop(self._due)  # deleted or superseded before its turn
                if self._due:
                    due, now = self._due[0][0], time.monotonic()
                    late = now - due
                    if self._urgent or (late >= 0 and (not self._busy or self._must_write(late))):
                        return self._pending[heapq.heappop(self._due)[2]]
                    self._cond.wait(-late if late < 0 else self.max_defer - late)
                else:
                    self._cond.wait()

    def _must_write(self, late: float) -> bool:
        """Write now although a request runs: waited long enough, or holding too much RAM."""
        return late >= self.max_defer or self._held_bytes() > self.defer_bytes

    def _write_loop(self) -> None:
        # MLX streams are per thread; the arrays are already evaluated, saving only reads them.
        with mx.stream(mx.new_stream(mx.default_device())):
            while (item := self._next()) is not None:
                block, arrays = item
                try:
                    size = self._write_one(block, arrays)
                except Exception:
                    log.exception("kv cache: could not write block %s", block.key.hex())
                    size = None
                with self._cond:
                    if self._pending.get(block.key, (None,))[0] is block:
                        del self._pending[block.key]
                        if size is not None:
                            self._sizes[block.key] = size
                    elif size is not None:  # deleted while it was being written
                        self.path(block.key).unlink(missing_ok=True)
                    self._cond.notify_all()

    def _write_one(self, block: Block, arrays: BlockArrays) -> int:
        fields = {
            "format": FORMAT,
            "model": self.fingerprint,
            "key": block.key.hex(),
            "parent": block.parent.hex(),
            "start": str(block.start),
            "protected": "1" if block.protected else "0",
            "kind": block.kind,
        }
        meta = dict(
            fields,
            tokens=base64.b64encode(block.tokens.astype("<i4").tobytes()).decode(),
            checksum=block_checksum(block.tokens, fields, arrays),
        )
        tensors = {}
        for layer, (k, v) in enumerate(arrays):
            tensors[f"k.{layer}"], tensors[f"v.{layer}"] = k, v
        path = self.path(block.key)
        path.parent.mkdir(exist_ok=True)
        tmp = path.with_name(f".{path.stem}.tmp.safetensors")
        mx.save_safetensors(str(tmp), tensors, metadata=meta)
        os.replace(tmp, path)
        size = path.stat().st_size
        with self._cond:  # save_recent counts from the engine's thread
            self.bytes_written += size
            self.blocks_written += 1
        self.written_by_request.add(block.origin, size)
        return size
