#!/usr/bin/env python3
"""The KV block store in process: block size, restore speed per GB, lookup cost as entries grow.

No model: synthetic K/V arrays shaped like a real model's (default: 4 layers x 4 KV heads x 128
dims, fp16, 8 KB per token) go through the real BlockStore and its disk tier. Three parts:
1. block size: for 64-1024-token blocks, a 32k-token save, a warm turn's save (1k new tokens),
   a restore from memory, the disk tier's writes, a restart's index load and a restore from
   disk (checksums included); bytes written for the warm turn / its new KV (tails cost extra);
2. restore speed (GB/s) from memory and from disk at the chosen size;
3. lookup time with 1, 100 and 1,000 stored conversations (8k-token prefix shared, 4k each of
   their own), for the block store and the whole-snapshot store.
Writes JSON to artifacts/bench_kv_blocks/.

    .venv/bin/python scripts/bench_kv_blocks.py [--tokens 32768] [--out artifacts/bench_kv_blocks]
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np
from mlx_lm.models.cache import KVCache
from tqdm import tqdm

from cache_backend.kv_block_files import BlockFiles
from cache_backend.kv_block_keys import chain_seed
from cache_backend.kv_blocks import BlockStore
from cache_backend.kv_snapshots import SnapshotStore
from ccwarm.harness import REPO


def live_cache(tokens: int, layers: int, heads: int, dim: int, dtype: mx.Dtype, seed: int = 0) -> list[KVCache]:
    """A cache as the engine holds it after a prefill of `tokens` (room after them, as mlx-lm allocates)."""
    mx.random.seed(seed)
    out = []
    for _ in range(layers):
        c = KVCache()
        room = -(-tokens // 256) * 256 + 256
        c.keys = mx.random.normal((1, heads, room, dim)).astype(dtype)
        c.values = mx.random.normal((1, heads, room, dim)).astype(dtype)
        c.offset = tokens
        out.append(c)
    mx.eval([x for c in out for x in (c.keys, c.values)])
    return out


def timed(fn, *args: Any, repeat: int = 3, **kwargs: Any) -> tuple[float, Any]:
    """Median seconds of `fn(*args, **kwargs)` over `repeat` calls, and its last result."""
    times, result = [], None
    for _ in range(repeat):
        t = time.perf_counter()
        result = fn(*args, **kwargs)
        times.append(time.perf_counter() - t)
    return statistics.median(times), result


def block_size_sweep(args: argparse.Namespace, work: Path) -> list[dict[str, Any]]:
    dtype = mx.float16
    bpt = 2 * args.layers * args.heads * args.dim * 2
    n = args.tokens
    rng = np.random.default_rng(0)
    tokens = rng.integers(100, 40000, n + 1024).astype(np.int32)
    live = live_cache(n + 1024, args.layers, args.heads, args.dim, dtype)
    rows = []
    for size in tqdm(args.sizes, desc="block sizes", unit="size"):
        root = work / f"b{size}"
        disk = BlockFiles(root, "bench", size, write_delay=0.0, tail_delay=0.0)
        store = BlockStore(chain_seed("bench", size), memory_budget=2**40, size=size, disk=disk, disk_budget=2**40)
        for c in live:
            c.offset = n
        t0 = time.perf_counter()
        store.put(tokens[:n], live, "prompt")
        put_cold = time.perf_counter() - t0
        t0 = time.perf_counter()
        disk.flush()
        write_s = time.perf_counter() - t0
        written0 = disk.bytes_written
        for c in live:
            c.offset = n + 1024
        t0 = time.perf_counter()
        store.put(tokens[: n + 1024], live, "prompt")
        put_warm = time.perf_counter() - t0
        disk.flush()
        warm_written = disk.bytes_written - written0
        prompt = tokens[: n + 1024]
        match = store.lookup(prompt)
        restore_mem, (caches, got, _) = timed(store.restore, match, room=1)
        assert got == n + 1023, got
        del caches
        disk.close()
        t0 = time.perf_counter()
        again = BlockStore(chain_seed("bench", size), memory_budget=2**40, size=size,
                           disk=BlockFiles(root, "bench", size), disk_budget=2**40)  # fmt: skip
        index_s = time.perf_counter() - t0
        match = again.lookup(prompt)
        t0 = time.perf_counter()
        caches, got, _ = again.restore(match, room=1)
        restore_disk = time.perf_counter() - t0
        assert got == n + 1023
        del caches
        again.disk.close()
        gb = (n + 1023) * bpt / 1e9
        files = sum(1 for _ in (root).rglob("*.safetensors"))
        rows.append({
            "block_tokens": size,
            "save_32k_s": put_cold,
            "save_warm_1k_s": put_warm,
            "write_32k_s": write_s,
            "warm_turn_written_over_new_kv": warm_written / (1024 * bpt),
            "restore_memory_s": restore_mem,
            "restore_memory_gb_per_s": gb / restore_mem,
            "restart_index_s": index_s,
            "restore_disk_s": restore_disk,
            "restore_disk_gb_per_s": gb / restore_disk,
            "files": files,
            "restored_gb": gb,
        })  # fmt: skip
        shutil.rmtree(root, ignore_errors=True)
    return rows


def lookup_scaling(counts: list[int], repeats: int = 20) -> list[dict[str, Any]]:
    """Lookup time for a prompt that continues one conversation, as stored conversations grow."""
    rng = np.random.default_rng(1)
    shared = rng.integers(100, 40000, 8192).astype(np.int32)
    rows = []
    for count in tqdm(counts, desc="lookup", unit="size"):
        convs = [np.concatenate([shared, rng.integers(100, 40000, 4096).astype(np.int32)]) for _ in range(count)]
        live = live_cache(len(convs[0]), 1, 1, 8, mx.float16, seed=2)
        blocks = BlockStore(chain_seed("bench", 256), memory_budget=2**40)
        snaps = SnapshotStore(memory_budget=2**40)
        for conv in convs:
            blocks.put(conv, live, "generation")
            snaps.put(conv, live, "generation")
        prompt = np.concatenate([convs[count // 2], rng.integers(100, 40000, 200).astype(np.int32)])
        t_blocks, match = timed(blocks.lookup, prompt, repeat=repeats)
        t_snaps, hit = timed(snaps.lookup, prompt, repeat=repeats)
        assert match.length == hit.length == len(convs[0]), (match.length, hit.length)
        rows.append({"conversations": count, "blocks_lookup_ms": t_blocks * 1e3, "snapshots_lookup_ms": t_snaps * 1e3})
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=32768)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--sizes", type=int, nargs="+", default=[64, 128, 256, 512, 1024])
    ap.add_argument("--lookup-counts", type=int, nargs="+", default=[1, 100, 1000])
    ap.add_argument("--out", type=Path, default=REPO / "artifacts" / "bench_kv_blocks")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="ccwarm-kvblocks-"))
    try:
        sweep = block_size_sweep(args, work)
        lookup = lookup_scaling(args.lookup_counts)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    results = {
        "machine": {"platform": platform.platform(), "python": platform.python_version()},
        "kv_bytes_per_token": 2 * args.layers * args.heads * args.dim * 2,
        "tokens": args.tokens,
        "block_size": sweep,
        "lookup": lookup,
    }
    (args.out / "bench_kv_blocks.json").write_text(json.dumps(results, indent=2))
    print(f"\nblock size sweep ({args.tokens} tokens, {results['kv_bytes_per_token']} KV bytes per token)")
    keys = list(sweep[0])
    print("  " + " ".join(f"{k[:14]:>15}" for k in keys))
    for row in sweep:
        print("  " + " ".join(f"{v:>15.3f}" if isinstance(v, float) else f"{v:>15}" for v in row.values()))
    print("\nlookup time per request")
    for row in lookup:
        print(f"  {row['conversations']:>5} conversations: blocks {row['blocks_lookup_ms']:.3f} ms, "
              f"snapshots {row['snapshots_lookup_ms']:.3f} ms")  # fmt: skip
    print(f"\nwrote {args.out / 'bench_kv_blocks.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
