"""The block store with a real (tiny) model: restores from blocks give a cold run's greedy output,
token for token (same conversation, a sibling branch, after a restart, after part of a chain
was evicted or damaged); shared prefixes are stored once; a save writes only its new blocks."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.models.cache import make_prompt_cache
from test_kv_snapshots import LAST_LOGITS, cold, greedy, model, tokens  # noqa: F401

from cache_backend.kv_arrays import as_numpy
from cache_backend.kv_block_files import BlockFiles
from cache_backend.kv_block_keys import chain_keys, chain_seed
from cache_backend.kv_blocks import BlockStore
from cache_backend.kv_files import model_fingerprint
from cache_backend.token_prefix import unique_in_trie

SIZE = 64


def store_for(tmp_path: Path | None, fingerprint: str = "test-model", budget: int = 2**30, **kw) -> BlockStore:
    disk = BlockFiles(tmp_path, fingerprint, SIZE, write_delay=0.0, tail_delay=0.0) if tmp_path else None
    return BlockStore(seed=chain_seed(fingerprint, SIZE), memory_budget=budget, size=SIZE, disk=disk,
                      disk_budget=2**34, **kw)  # fmt: skip


def turn(model, store: BlockStore, prompt: list[int], protected: int = 0, n: int = 8) -> list[int]:
    """A cold request whose prompt and generation are saved, as the engine does."""
    cache = make_prompt_cache(model)
    out = greedy(model, cache, prompt, n)
    store.put(prompt + out[:-1], cache, "generation", protected=protected)
    return out


def warm(model, store: BlockStore, prompt: list[int], n: int = 8) -> tuple[list[int], int]:
    """Greedy output after a restore from blocks; its first logits must match a cold run's."""
    match = store.lookup(prompt)
    caches, restored, _ = store.restore(match, room=len(prompt) - match.length)
    assert restored <= match.length  # less when a block on disk turns out damaged
    cache = caches if restored else make_prompt_cache(model)
    out = greedy(model, cache, prompt[restored:], n)
    first = LAST_LOGITS[-1]
    greedy(model, make_prompt_cache(model), prompt, 1)
    assert mx.allclose(first, LAST_LOGITS[-1], atol=1e-4).item(), "restored logits differ from a cold run"
    return out, restored


def test_keys_name_the_whole_prefix() -> None:
    seed = chain_seed("m", 4)
    a = np.arange(12, dtype=np.int32)
    b = a.copy()
    b[1] = 99  # differs in the first block only
    ka, kb = chain_keys(seed, a, 4), chain_keys(seed, b, 4)
    assert len(ka) == 3 and all(x != y for x, y in zip(ka, kb))
    assert chain_keys(seed, a[:11], 4) == ka[:2]  # whole blocks only
    assert chain_keys(chain_seed("other model", 4), a, 4) != ka
    assert unique_in_trie([np.array([1, 2, 3]), np.array([1, 2, 4]), np.array([5])]) == 5


def test_same_conversation_and_sibling_branch_equal_cold(model, tokens) -> None:
    store = store_for(None)
    system = tokens(300)
    first = system + tokens(100)
    out = turn(model, store, first, protected=len(system))
    # The next turn: everything before, the answer, a new tail.
    second = first + out + tokens(90)
    got, restored = warm(model, store, second)
    assert restored == len(first) + len(out) - 1 and got == cold(model, second, 8)
    # A sibling: same system prefix, diverges mid-block (300 is not a multiple of 64).
    sibling = system + tokens(50)
    got, restored = warm(model, store, sibling)
    assert restored == len(system) and got == cold(model, sibling, 8)
    # An exact repeat keeps one token to feed.
    got, restored = warm(model, store, first)
    assert restored == len(first) - 1 and got == cold(model, first, 8)


def test_shared_prefix_is_stored_once(model, tokens) -> None:
    store = store_for(None)
    shared = tokens(1200)
    for k in range(4):
        turn(model, store, shared + tokens(40 + k), n=2)
    per_token = store.memory_bytes / store.unique_tokens()
    held = store.unique_tokens()
    assert held <= 1200 + 4 * 45 and store.memory_bytes == held * per_token
    assert store.logical_tokens() / held > 3  # four whole snapshots would hold ~4x
    # Blocks are copies: they never share memory with the live cache that was offered.
    cache = make_prompt_cache(model)
    greedy(model, cache, tokens(200), 1)
    live = np.asarray(cache[0].keys)
    store.put(list(range(1, 200)) + [7], cache, "prompt")
    for b in store.blocks.values():
        arr = np.asarray(b.arrays[0][0])
        assert not np.shares_memory(arr, live)


def test_a_save_writes_only_its_new_blocks(model, tokens, tmp_path: Path) -> None:
    store = store_for(tmp_path)
    prompt = tokens(640)
    out = turn(model, store, prompt)
    store.disk.flush()
    first_written = store.disk.blocks_written
    assert first_written == len(store.blocks)
    nxt = prompt + out + tokens(200)
    warm(model, store, nxt)
    cache = make_prompt_cache(model)
    greedy(model, cache, nxt, 1)
    created = store.put(nxt, cache, "prompt")
    store.disk.flush()
    new_tokens = sum(len(b.tokens) for b in created)
    assert new_tokens <= 200 + len(out) + SIZE  # the new tail and the blocks it completes
    assert store.disk.blocks_written - first_written == len(created)


def test_restart_and_partial_eviction_equal_cold(model, tokens, tmp_path: Path, tiny_model_dir: Path) -> None:
    fp = model_fingerprint(tiny_model_dir)
    store = store_for(tmp_path, fp)
    prompt = tokens(700)
    out = turn(model, store, prompt, protected=100)
    store.disk.close()
    # A restart: the index comes from the headers; arrays load when a restore needs them.
    again = store_for(tmp_path, fp)
    assert all(b.arrays is None for b in again.blocks.values()) and len(again.blocks) == len(store.blocks)
    nxt = prompt + out + tokens(60)
    got, restored = warm(model, again, nxt)
    assert restored == len(prompt) + len(out) - 1 and got == cold(model, nxt, 8)
    # Damage the 5th block on disk and evict the memory copies: the restore stops before it.
    again.disk.close()
    third = store_for(tmp_path, fp)
    chain = chain_keys(third.seed, np.asarray(nxt, dtype=np.int32), SIZE)
    path = third.disk.path(chain[4])
    raw = bytearray(path.read_bytes())
    raw[-10] ^= 0xFF
    path.write_bytes(bytes(raw))
    got, restored = warm(model, third, nxt)
    assert restored == 4 * SIZE and got == cold(model, nxt, 8)
    assert third.disk.removed_bad == 1 and not path.exists()
    third.disk.close()


def test_memory_budget_evicts_leaves_first(model, tokens) -> None:
    store = store_for(None)
    system = tokens(256)
    turn(model, store, system + tokens(300), protected=256, n=2)
    per_token = store.memory_bytes / store.unique_tokens()
    store.memory_budget = int(per_token * 700)
    turn(model, store, system + tokens(300), protected=256, n=2)  # a second conversation
    assert store.memory_bytes <= store.memory_budget and store.evictions > 0
    # The shared system blocks survive; the oldest conversation's deepest blocks went first.
    probe = system + tokens(10)
    got, restored = warm(model, store, probe)
    assert restored == 256 and got == cold(model, probe, 8)


@pytest.mark.parametrize("size", [0, 3])
def test_block_size_is_checked(size: int) -> None:
    from cache_backend.block_cache import BlockCache

    with pytest.raises(ValueError, match="block size"):
        BlockCache(2**20, block_size=size)


def test_the_last_conversation_continues_without_a_copy_and_others_reuse_its_memory(model, tokens) -> None:
    from cache_backend.block_cache import BlockCache
    from cache_backend.prompt import RenderedPrompt

    cache = BlockCache(2**30, block_size=SIZE)

    def serve(prompt: list[int], n: int = 8) -> tuple[list[int], int, list]:
        restored = cache.restore(
            model, RenderedPrompt(tokens=prompt, prefix_end=0, message_ends=(), generation_start=len(prompt))
        )
        out = greedy(model, restored.cache, prompt[restored.n_restored :], n)
        cache.save(prompt + out[:-1], restored.cache, "generation")
        return out, restored.n_restored, restored.cache

    first = tokens(300)
    out, _, live = serve(first)
    keys_before = live[0].keys
    # The next turn diverges inside the answer (a replay): the live cache is rewound, not copied.
    second = first + out[:3] + tokens(40)
    got, restored, cont = serve(second)
    assert restored == len(first) + 3 and cont is live and cont[0].keys is not None
    assert got == cold(model, second, 8) and cache.continued == 1
    # A prompt that shares a rewound prefix of the last conversation still continues it.
    branch = first[:200] + tokens(30)
    got, restored, cont = serve(branch)
    assert restored == 200 and cont is live and got == cold(model, branch, 8)
    # Another, longer conversation, then back: assembled from blocks into the memory it left.
    _, _, other = serve(tokens(900), n=2)
    address = as_numpy(other[0].keys).__array_interface__["data"][0]
    back = first + out[:3] + tokens(60)
    got, restored, caches = serve(back)
    assert restored == len(first) + 3 and got == cold(model, back, 8)
    assert caches is not other and as_numpy(caches[0].keys).__array_interface__["data"][0] == address
    del keys_before


def test_reserve_grows_a_cache_once_and_keeps_what_it_holds(model, tokens) -> None:
    from cache_backend.kv_arrays import reserve

    prompt = tokens(700)
    cache = make_prompt_cache(model)
    greedy(model, cache, prompt[:100], 1)
    held = [np.array(c.keys[..., : c.offset, :]) for c in cache]
    reserve(cache, 700)
    capacity = [c.keys.shape[2] for c in cache]
    assert all(n >= 700 for n in capacity)
    assert all(np.array_equal(np.array(c.keys[..., : len(h[0, 0]), :]), h) for c, h in zip(cache, held))
    for start in range(101, 700, 150):  # chunks append in place: no reallocation
        greedy(model, cache, prompt[start : start + 150], 1)
    assert [c.keys.shape[2] for c in cache] == capacity


def test_a_queued_block_survives_memory_and_disk_budgets(model, tokens, tmp_path: Path) -> None:
    """Evicted from memory while its write is still queued, a block exists only in the queue: the
    disk budget must not take it (the soak lost main turns that way)."""
    disk = BlockFiles(tmp_path, "test-model", SIZE, write_delay=0.0, tail_delay=0.0)
    store = BlockStore(seed=chain_seed("test-model", SIZE), memory_budget=2**30, size=SIZE, disk=disk,
                       disk_budget=2**30)  # fmt: skip
    system = tokens(256)
    turn(model, store, system, protected=256, n=2)  # durable, protected: the budget's last resort
    disk.flush()
    disk.write_delay = disk.tail_delay = 30.0
    store.memory_budget, store.disk_budget = 1, 0
    prompt = tokens(300)
    out = turn(model, store, prompt)  # evicted from memory at once, its writes still queued
    assert store.memory_bytes <= 1 and disk.pending_bytes > 0
    nxt = prompt + out + tokens(20)
    got, restored = warm(model, store, nxt)
    assert restored == len(prompt) + len(out) - 1 and got == cold(model, nxt, 8)
    disk.close()


def _synthetic_live(n: int, dtype, seed: int = 0) -> list:
    """A 2-layer cache of `n` positions with random K/V in `dtype`, as the engine holds one."""
    from mlx_lm.models.cache import KVCache

    mx.random.seed(seed)
    layers = []
    for _ in range(2):
        c = KVCache()
        c.keys = mx.random.normal((1, 2, n + 64, 8)).astype(dtype)
        c.values = mx.random.normal((1, 2, n + 64, 8)).astype(dtype)
        c.offset = n
        layers.append(c)
    mx.eval([x for c in layers for x in (c.keys, c.values)])
    return layers


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_restores_are_exact_also_into_reused_memory(dtype: str, tmp_path: Path) -> None:
    dt = getattr(mx, dtype)
    disk = BlockFiles(tmp_path, "m", 16, write_delay=0.0, tail_delay=0.0)
    store = BlockStore(seed=chain_seed("m", 16), memory_budget=2**30, size=16, disk=disk, disk_budget=2**30)
    toks = np.arange(100, 300, dtype=np.int32)
    live = _synthetic_live(200, dt)
    store.put(toks, live, "generation")
    old = _synthetic_live(600, dt, seed=1)  # a finished request's cache, free to be overwritten
    for source in ("memory", "disk"):
        if source == "disk":
            disk.flush()
            for b in store.blocks.values():
                store.memory_bytes -= b.nbytes
                b.arrays = None
        match = store.lookup(np.concatenate([toks, [7]]))
        caches, n, _ = store.restore(match, room=10, reuse=old)
        assert n == 200
        for c, ref in zip(caches, live):
            assert mx.array_equal(c.keys[..., :200, :], ref.keys[..., :200, :]).item()
            assert mx.array_equal(c.values[..., :200, :], ref.values[..., :200, :]).item()
        old = caches
    disk.close()


def test_a_block_whose_file_the_disk_budget_took_is_written_again_when_evicted(tmp_path: Path) -> None:
    disk = BlockFiles(tmp_path, "m", 16, write_delay=0.0, tail_delay=0.0)
    store = BlockStore(seed=chain_seed("m", 16), memory_budget=2**30, size=16, disk=disk, disk_budget=2**30)
    first = np.arange(1000, 1160, dtype=np.int32)
    store.put(first, _synthetic_live(160, mx.float16), "generation")
    disk.flush()
    store.disk_budget = disk.disk_bytes  # room for one conversation's files
    second = np.arange(5000, 5160, dtype=np.int32)
    store.put(second, _synthetic_live(160, mx.float16, seed=2), "generation")
    disk.flush()
    store.put(second[:16], _synthetic_live(16, mx.float16, seed=2), "prompt")  # enforce the budget
    assert any(not disk.has(k) for k in chain_keys(store.seed, first, 16))  # the oldest files went
    store.memory_budget = 1
    store.put(second[:16], _synthetic_live(16, mx.float16, seed=2), "prompt")  # evicts everything
    assert store.lookup(np.concatenate([first, [7]])).length == 160  # still whole, from the queue
    disk.close()


def test_a_read_error_that_may_pass_keeps_the_block(tmp_path: Path, monkeypatch) -> None:
    import errno

    from cache_backend import kv_block_files

    disk = BlockFiles(tmp_path, "m", 16, write_delay=0.0, tail_delay=0.0)
    store = BlockStore(seed=chain_seed("m", 16), memory_budget=1, size=16, disk=disk, disk_budget=2**30)
    toks = np.arange(100, 164, dtype=np.int32)
    store.put(toks, _synthetic_live(64, mx.float16), "generation")
    disk.flush()
    prompt = np.concatenate([toks, [7]])
    real = kv_block_files.safetensors_header

    def flaky(path):
        raise OSError(errno.EMFILE, "Too many open files")

    monkeypatch.setattr(kv_block_files, "safetensors_header", flaky)
    caches, n, _ = store.restore(store.lookup(prompt), room=1)
    assert n == 0 and disk.removed_bad == 0 and len(store.blocks) == 4
    monkeypatch.setattr(kv_block_files, "safetensors_header", real)
    caches, n, _ = store.restore(store.lookup(prompt), room=1)
    assert n == 64
    disk.close()
