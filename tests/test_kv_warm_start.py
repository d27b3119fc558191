"""The block cache across a restart and around requests, with a real (tiny) model: the warm start
loads the conversations served last back (the next turn continues without a disk read and
answers as a cold run), gives way to a request, survives a bad record; disk writes wait while a
request runs."""

from __future__ import annotations

import time
from pathlib import Path

from test_kv_blocks import SIZE, store_for, turn
from test_kv_snapshots import cold, greedy, model, tokens  # noqa: F401

from cache_backend.block_cache import BlockCache
from cache_backend.kv_blocks import BlockStore
from cache_backend.prompt import RenderedPrompt


def test_a_restart_loads_the_recent_conversations_back(model, tokens, tmp_path: Path, tiny_model_dir: Path) -> None:
    """After a restart the worker loads the conversations served last back into memory: the next
    turn of the newest continues its cache (no disk read on the request path) and answers as a
    cold run; an older one assembles from memory blocks; a bad record costs only the warm start."""

    def cache_for() -> BlockCache:
        return BlockCache(2**30, disk_dir=tmp_path, disk_budget=2**34, model_dir=tiny_model_dir, block_size=SIZE)

    def serve(cache: BlockCache, prompt: list[int]) -> list[int]:
        got = cache.restore(model, RenderedPrompt(prompt, 0, (), len(prompt)))
        out = greedy(model, got.cache, prompt[got.n_restored :], 8)
        cache.save(prompt + out[:-1], got.cache, "generation")
        return out

    shared = tokens(400)
    side, main = shared + tokens(90), shared + tokens(300)
    first = cache_for()
    side_out, main_out = serve(first, side), serve(first, main)  # main is the newest
    first.close()

    second = cache_for()
    assert second.stats()["warm_start_state"] == "waiting"
    second.warm_start(model, should_stop=lambda: False)
    s = second.stats()
    assert (s["warm_start_state"], s["warm_start_conversations"]) == ("done", 2)
    assert s["warm_start_tokens"] == len(main) + 7 + len(side) + 7 and s["blocks"] == s["disk_blocks"]

    def no_reads(*a, **k):
        raise AssertionError("a restore read the disk after the warm start")

    second.store.disk.read_into = no_reads
    nxt = main + main_out + tokens(50)
    got = second.restore(model, RenderedPrompt(nxt, 0, (), len(nxt)))
    assert second.continued == 1 and got.n_restored == len(main) + 7
    assert greedy(model, got.cache, nxt[got.n_restored :], 8) == cold(model, nxt, 8)
    nxt_side = side + side_out + tokens(20)
    got = second.restore(model, RenderedPrompt(nxt_side, 0, (), len(nxt_side)))
    assert got.n_restored == len(side) + 7
    assert greedy(model, got.cache, nxt_side[got.n_restored :], 8) == cold(model, nxt_side, 8)
    second.close()

    (second.store.disk.dir / "recent.json").write_text("{not json")
    third = cache_for()
    third.warm_start(model, should_stop=lambda: False)
    assert third.stats()["warm_start_state"] == "off" and third.stats()["blocks"] == 0
    got = third.restore(model, RenderedPrompt(nxt, 0, (), len(nxt)))  # still restores, from disk
    assert got.n_restored == len(main) + 7
    third.close()


def test_a_request_that_comes_first_stops_the_warm_start(model, tokens, tmp_path: Path, tiny_model_dir: Path) -> None:
    cache = BlockCache(2**30, disk_dir=tmp_path, disk_budget=2**34, model_dir=tiny_model_dir, block_size=SIZE)
    for _ in range(3):
        prompt = tokens(200)
        got = cache.restore(model, RenderedPrompt(prompt, 0, (), len(prompt)))
        out = greedy(model, got.cache, prompt, 4)
        cache.save(prompt + out[:-1], got.cache, "generation")
    cache.close()
    again = BlockCache(2**30, disk_dir=tmp_path, disk_budget=2**34, model_dir=tiny_model_dir, block_size=SIZE)
    calls = iter([False, True])  # a request arrives after the newest conversation is loaded
    again.warm_start(model, should_stop=lambda: next(calls))
    s = again.stats()
    assert (s["warm_start_state"], s["warm_start_conversations"], s["warm_start_tokens"]) == ("stopped", 1, 203)
    again.close()


def test_disk_writes_wait_while_a_request_runs(model, tokens, tmp_path: Path) -> None:
    """Due writes wait for the running request (they would take a core from its prefill), unless
    they waited max_defer seconds; a flush (shutdown) writes at once."""

    def written(store: BlockStore) -> int:
        return store.disk.blocks_on_disk

    store = store_for(tmp_path / "a")
    store.disk.set_busy(True)
    turn(model, store, tokens(3 * SIZE))
    time.sleep(0.3)
    assert written(store) == 0 and store.disk.has(next(iter(store.blocks)))
    store.disk.set_busy(False)
    deadline = time.monotonic() + 10
    while written(store) < len(store.blocks) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert written(store) == len(store.blocks)

    late = store_for(tmp_path / "b")
    late.disk.max_defer = 0.2
    late.disk.set_busy(True)
    turn(model, late, tokens(2 * SIZE))
    deadline = time.monotonic() + 10
    while written(late) < len(late.blocks) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert written(late) == len(late.blocks)  # written although the request never ended

    flushed = store_for(tmp_path / "c")
    flushed.disk.set_busy(True)
    turn(model, flushed, tokens(2 * SIZE))
    flushed.disk.flush()
    assert written(flushed) == len(flushed.blocks)
    for s in (store, late, flushed):
        s.disk.close()
