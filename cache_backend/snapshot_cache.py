"""The engine's prefix cache: the snapshot store (memory + disk) behind the PrefixCache seam.

Decides where snapshots are taken (end of system + tools, end of prompt, after generation) and
which one a new prompt restores from; the store decides what is kept.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mlx_lm.models.cache import make_prompt_cache

from cache_backend.kv_disk import DiskTier
from cache_backend.kv_files import model_fingerprint, weight_hashes_path
from cache_backend.kv_snapshots import SnapshotStore
from cache_backend.prefix_cache import (
    Restored,
    SaveKind,
    StoredCache,
    protected_length,
    system_prefix_checkpoint,
)
from cache_backend.prompt import RenderedPrompt
from cache_backend.token_prefix import unique_in_trie

log = logging.getLogger("ccwarm.snapshot_cache")


class SnapshotCache(StoredCache):
    def __init__(
        self, memory_budget: int, disk_dir: Path | None = None, disk_budget: int = 0, model_dir: Path | None = None
    ) -> None:
        disk = None
        if disk_dir is not None and disk_budget > 0 and model_dir is not None:
            disk = DiskTier(disk_dir, model_fingerprint(model_dir, weight_hashes_path(disk_dir)), disk_budget)
        self.store = SnapshotStore(memory_budget=memory_budget, disk=disk)
        self._prefix_end = 0

    def _request_started(self) -> None:
        # New snapshots are stamped with the request that made them: writes (which land later)
        # are counted against it in disk_bytes_written_by_request.
        self.store.request += 1

    def restore(self, model: Any, prompt: RenderedPrompt) -> Restored:
        self._prefix_end = prompt.prefix_end
        self._request_started()
        # A snapshot file may turn out unreadable (it is then removed): look again.
        for _ in range(4):
            hit = self.store.lookup(prompt.tokens)
            if hit is None:
                break
            layers = self.store.restore(hit)
            if layers is not None:
                return Restored(cache=layers, n_restored=hit.length, resumed=hit.snapshot.kind == "partial")
        return Restored(cache=make_prompt_cache(model), n_restored=0)

    def checkpoints(self, prompt: RenderedPrompt, n_restored: int) -> Sequence[int]:
        return system_prefix_checkpoint(prompt, n_restored)

    def save(self, tokens: Sequence[int], cache: list[Any], kind: SaveKind) -> None:
        self.store.put(tokens, cache, kind=kind, protected=protected_length(self._prefix_end, len(tokens)))

    @property
    def disk_dir(self) -> Path | None:
        return self.store.disk.dir if self.store.disk is not None else None

    def stats(self) -> dict[str, Any]:
        s = self.store.stats()
        disk = self.store.disk
        snaps = list(self.store.snapshots.values())
        unique = unique_in_trie([x.tokens for x in snaps])
        return {
            "store": "snapshots",
            "snapshots": s.snapshots,
            "disk_snapshots": len(disk.entries()) if disk else 0,
            **self.storage_stats(s.memory_bytes, unique, sum(len(x) for x in snaps)),
            "disk_budget_bytes": disk.budget if disk else 0,
            "evictions": s.evictions,
            "superseded": s.superseded,
            "truncations": s.truncations,
        }

    def describe(self) -> str:
        where = f", disk {self.store.disk.dir}" if self.store.disk else ""
        return f"SnapshotCache(memory {self.store.memory_budget / 2**20:.0f} MiB{where})"
