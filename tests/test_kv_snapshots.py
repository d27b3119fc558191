"""The snapshot store with a real (tiny) model: restored greedy output equals a cold run, token
for token; budgets, eviction order, disk restarts and bad files."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm import load
from mlx_lm.models.cache import RotatingKVCache, make_prompt_cache

from cache_backend.kv_disk import DiskTier
from cache_backend.kv_files import model_fingerprint
from cache_backend.kv_snapshots import SnapshotStore


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    m, _ = load(str(tiny_model_dir))
    return m


def feed(model, cache, tokens: list[int]) -> None:
    """Prefill `tokens` into `cache` (no logits kept)."""
    model(mx.array(tokens)[None], cache=cache)
    mx.eval([c.state for c in cache])


LAST_LOGITS: list[mx.array] = []


def greedy(model, cache, tokens: list[int], n: int = 10) -> list[int]:
    """Feed `tokens`, then decode n tokens greedily; the cache ends holding tokens + out[:-1].

    The first step's logits are kept in LAST_LOGITS so callers can compare them numerically too.
    """
    if len(tokens) > 1:
        feed(model, cache, tokens[:-1])  # no logits for these: only the last position's are used
    logits = model(mx.array(tokens[-1:])[None], cache=cache)
    LAST_LOGITS.append(logits[0, -1])
    out = []
    for i in range(n):
        t = int(mx.argmax(logits[0, -1]).item())
        out.append(t)
        if i + 1 < n:
            logits = model(mx.array([[t]]), cache=cache)
    return out


def cold(model, tokens: list[int], n: int = 10) -> list[int]:
    return greedy(model, make_prompt_cache(model), tokens, n)


def warm(model, store: SnapshotStore, tokens: list[int], n: int = 10) -> tuple[list[int], int]:
    """Greedy output from the best snapshot; also checks its first logits match a cold run's."""
    hit = store.lookup(tokens)
    assert hit is not None
    cache = store.restore(hit)
    out = greedy(model, cache, tokens[hit.length :], n)
    restored_logits = LAST_LOGITS[-1]
    greedy(model, make_prompt_cache(model), tokens, 1)
    assert mx.allclose(restored_logits, LAST_LOGITS[-1], atol=1e-4).item(), "restored logits differ from a cold run"
    return out, hit.length


@pytest.fixture
def tokens():
    rng = np.random.default_rng(1)
    return lambda n: rng.integers(100, 40000, n).tolist()


def conversation_turn(model, store, prompt, protected, n=10):
    cache = make_prompt_cache(model)
    out = greedy(model, cache, prompt, n)
    store.put(prompt + out[:-1], cache, "main", protected=protected)
    return out


def test_append_only_turn_restores_everything_but_the_tail(model, tokens) -> None:
    store = SnapshotStore(memory_budget=2**30)
    system, first = tokens(1500), tokens(300)
    out = conversation_turn(model, store, system + first, protected=1500)
    turn2 = system + first + out + tokens(100)
    got, restored = warm(model, store, turn2)
    assert restored == len(system + first + out) - 1  # the last output token was never fed
    assert got == cold(model, turn2)


def test_exact_repeat_and_shorter_prompt(model, tokens) -> None:
    store = SnapshotStore(memory_budget=2**30)
    prompt = tokens(800)
    cache = make_prompt_cache(model)
    feed(model, cache, prompt)
    store.put(prompt, cache, "main")
    got, restored = warm(model, store, prompt)
    assert restored == len(prompt) - 1  # one token is fed again to get logits
    assert got == cold(model, prompt)
    shorter = prompt[:500]
    got, restored = warm(model, store, shorter)
    assert restored == 499 and got == cold(model, shorter)


def test_stored_arrays_survive_restores_and_live_appends(model, tokens) -> None:
    store = SnapshotStore(memory_budget=2**30)
    prompt = tokens(600)
    cache = make_prompt_cache(model)
    feed(model, cache, prompt)
    store.put(prompt, cache, "main")
    feed(model, cache, tokens(50))  # the live cache goes on after the snapshot
    branch_a = prompt[:400] + tokens(30)
    branch_b = prompt + tokens(30)
    expected = cold(model, branch_b)
    warm(model, store, branch_a)  # a trimmed restore appends at position 400
    assert warm(model, store, branch_b)[0] == expected


def test_longer_snapshot_supersedes_its_prefix(model, tokens) -> None:
    store = SnapshotStore(memory_budget=2**30)
    prompt = tokens(500)
    cache = make_prompt_cache(model)
    feed(model, cache, prompt[:200])
    store.put(prompt[:200], cache, "checkpoint", protected=200)
    feed(model, cache, prompt[200:])
    store.put(prompt, cache, "prompt", protected=200)
    stats = store.stats()
    assert stats.snapshots == 1 and stats.superseded == 1
    only = next(iter(store.snapshots.values()))
    assert len(only) == 500 and only.protected == 200


def test_budget_evicts_tails_before_system_prefixes(model, tokens) -> None:
    system = tokens(600)
    probe = SnapshotStore(memory_budget=2**40)
    cache = make_prompt_cache(model)
    feed(model, cache, system)
    per_token = probe.put(system, cache, "x").nbytes / len(system)
    budget = int(per_token * 2000)
    store = SnapshotStore(memory_budget=budget)
    conversation_turn(model, store, system + tokens(900), protected=len(system))  # main: 1509 tokens
    for _ in range(4):  # side requests and sub-agents with other prefixes
        conversation_turn(model, store, tokens(700), protected=0)
        assert store.memory_bytes <= budget
    # The main conversation's tail went first, but its system + tools prefix is still there.
    assert any(len(s) >= len(system) and list(s.tokens[: len(system)]) == system for s in store.snapshots.values())
    assert store.stats().evictions >= 1 and store.stats().truncations >= 1
    got, restored = warm(model, store, system + tokens(50))
    assert restored == len(system)


def test_disk_restart_and_bad_files(model, tokens, tiny_model_dir: Path, tmp_path: Path) -> None:
    fingerprint = model_fingerprint(tiny_model_dir)
    disk = DiskTier(tmp_path, fingerprint, budget=2**30)
    store = SnapshotStore(memory_budget=2**30, disk=disk)
    prompt = tokens(700)
    out = conversation_turn(model, store, prompt, protected=300)
    disk.close()
    turn2 = prompt + out + tokens(40)
    expected = cold(model, turn2)

    restarted = SnapshotStore(memory_budget=2**30, disk=DiskTier(tmp_path, fingerprint, budget=2**30))
    hit = restarted.lookup(turn2)
    assert hit is not None and hit.snapshot.layers is None  # found on disk, loaded on demand
    assert warm(model, restarted, turn2) == (expected, len(prompt + out) - 1)

    files = list(disk.dir.glob("*.safetensors"))
    assert len(files) == 1
    data = files[0].read_bytes()
    files[0].write_bytes(data[: len(data) // 2])  # truncated
    (disk.dir / "garbage.safetensors").write_bytes(b"\x00\x01not a file")
    other = DiskTier(tmp_path, fingerprint, budget=2**30)
    assert other.entries() == [] and other.removed_bad == 2
    assert not any(disk.dir.glob("*.safetensors"))

    # A file for another model is never used.
    store = SnapshotStore(memory_budget=2**30, disk=DiskTier(tmp_path, fingerprint, budget=2**30))
    conversation_turn(model, store, prompt, protected=0)
    store.disk.close()
    foreign = DiskTier(tmp_path, "f" * 64, budget=2**30)
    assert foreign.entries() == []


def test_corrupted_payload_is_a_miss_not_a_wrong_answer(model, tokens, tiny_model_dir: Path, tmp_path: Path) -> None:
    fingerprint = model_fingerprint(tiny_model_dir)
    disk = DiskTier(tmp_path, fingerprint, budget=2**30)
    store = SnapshotStore(memory_budget=2**30, disk=disk)
    prompt = tokens(400)
    cache = make_prompt_cache(model)
    feed(model, cache, prompt)
    store.put(prompt, cache, "main")
    disk.close()
    path = next(disk.dir.glob("*.safetensors"))
    # Same length, header intact, but the metadata's token count no longer matches the arrays.
    raw = path.read_bytes()
    restarted = SnapshotStore(memory_budget=2**30, disk=DiskTier(tmp_path, fingerprint, budget=2**30))
    snap = restarted.disk.entries()[0]
    snap.tokens = snap.tokens[:-5]
    hit = restarted.lookup(prompt[:-5] + tokens(3))
    assert hit is not None
    assert restarted.restore(hit) is None  # detected: removed, and the caller prefills instead
    assert not path.exists() and len(raw) > 0


def test_disk_budget_keeps_newest(model, tokens, tiny_model_dir: Path, tmp_path: Path) -> None:
    fingerprint = model_fingerprint(tiny_model_dir)
    probe = DiskTier(tmp_path / "probe", fingerprint, budget=2**30)
    store = SnapshotStore(memory_budget=2**30, disk=probe)
    conversation_turn(model, store, tokens(300), protected=0)
    probe.flush()
    one_file = probe.disk_bytes
    disk = DiskTier(tmp_path / "real", fingerprint, budget=int(one_file * 2.5))
    store = SnapshotStore(memory_budget=2**30, disk=disk)
    for _ in range(4):
        conversation_turn(model, store, tokens(300), protected=0)
    disk.flush()
    assert len(disk.entries()) == 2 and disk.disk_bytes <= disk.budget


def rotating(model) -> list:
    return [RotatingKVCache(max_size=256, keep=4) for _ in model.layers]


def test_untrimmable_caches_reuse_whole_snapshots_only(model, tokens) -> None:
    """A sliding-window (rotating) cache past its window cannot be trimmed: only snapshots that
    are a whole prefix of the new prompt are usable, and they give the same output as a cold run
    fed in the same pieces."""
    store = SnapshotStore(memory_budget=2**30)
    prefix = tokens(400)
    cache = rotating(model)
    feed(model, cache, prefix)
    snap = store.put(prefix, cache, "main")
    assert snap is not None and not snap.trimmable

    longer = prefix + tokens(20)
    hit = store.lookup(longer)
    assert hit is not None and hit.length == len(prefix)
    warm_out = greedy(model, store.restore(hit), longer[len(prefix) :], 6)
    cold_cache = rotating(model)
    feed(model, cold_cache, prefix)
    assert warm_out == greedy(model, cold_cache, longer[len(prefix) :], 6)

    assert store.lookup(prefix[:300] + tokens(10)) is None  # diverges inside the window: unusable
    assert store.lookup(prefix) is None  # exact repeat would need a trim by one token
