"""What the disk tier reads back is what it wrote, or nothing: checksummed snapshot files, a
model fingerprint over every weight byte, a start that survives any damaged entry, and eviction
that never loses a snapshot whose file is not yet durable (findings 3, 4 and 7 of the hardening
issue). Real tiny model, real files."""

from __future__ import annotations

import base64
import json
import shutil
import struct
import time
from pathlib import Path

import numpy as np
import pytest
from mlx_lm.models.cache import make_prompt_cache
from test_kv_snapshots import cold, conversation_turn, feed, model, tokens, warm  # noqa: F401

from cache_backend.kv_disk import FORMAT, DiskTier
from cache_backend.kv_files import model_fingerprint
from cache_backend.kv_snapshots import SnapshotStore

GB = 2**30


def _header(path: Path) -> tuple[int, dict]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return n, json.loads(raw[8 : 8 + n])


def _one_snapshot(model, tokens, root: Path, fingerprint: str, n: int = 400) -> tuple[list[int], Path]:
    store = SnapshotStore(memory_budget=GB, disk=DiskTier(root, fingerprint, budget=GB))
    prompt = tokens(n)
    cache = make_prompt_cache(model)
    feed(model, cache, prompt)
    store.put(prompt, cache, "prompt")
    store.disk.close()
    (path,) = store.disk.dir.glob("*.safetensors")
    return prompt, path


def _restarted(root: Path, fingerprint: str) -> SnapshotStore:
    return SnapshotStore(memory_budget=GB, disk=DiskTier(root, fingerprint, budget=GB))


def test_flipped_tensor_bytes_are_detected(model, tokens, tiny_model_dir: Path, tmp_path: Path, caplog) -> None:
    fingerprint = model_fingerprint(tiny_model_dir)
    prompt, path = _one_snapshot(model, tokens, tmp_path, fingerprint)
    n, header = _header(path)
    raw = bytearray(path.read_bytes())
    # Inside the largest tensor (a layer's keys or values): header and size stay intact.
    start, end = max((t["data_offsets"] for k, t in header.items() if k != "__metadata__"), key=lambda o: o[1] - o[0])
    middle = 8 + n + (start + end) // 2
    raw[middle : middle + 16] = bytes(x ^ 0x5A for x in raw[middle : middle + 16])
    path.write_bytes(bytes(raw))
    store = _restarted(tmp_path, fingerprint)
    turn = prompt + tokens(20)
    hit = store.lookup(turn)
    assert hit is not None and hit.length == len(prompt)  # the header alone looks fine
    with caplog.at_level("WARNING", logger="ccwarm.kv_disk"):
        assert store.restore(hit) is None
    assert "checksum mismatch" in caplog.text and not path.exists()
    assert store.lookup(turn) is None  # a miss: the caller prefills, and answers as a cold run


def test_a_changed_token_id_in_the_header_is_detected(model, tokens, tiny_model_dir: Path, tmp_path: Path) -> None:
    fingerprint = model_fingerprint(tiny_model_dir)
    prompt, path = _one_snapshot(model, tokens, tmp_path, fingerprint)
    n, header = _header(path)
    encoded = header["__metadata__"]["0.tokens"]
    ids = np.frombuffer(base64.b64decode(encoded), dtype="<i4").copy()
    ids[100] += 1
    changed = base64.b64encode(ids.tobytes()).decode()
    assert len(changed) == len(encoded)
    raw = path.read_bytes()
    path.write_bytes(raw[: 8 + n].replace(encoded.encode(), changed.encode()) + raw[8 + n :])
    store = _restarted(tmp_path, fingerprint)
    forged = prompt[:100] + [prompt[100] + 1] + prompt[101:] + tokens(5)
    hit = store.lookup(forged)
    assert hit is not None and hit.length == len(prompt)
    assert store.restore(hit) is None


def test_an_intact_file_still_restores_exactly(model, tokens, tiny_model_dir: Path, tmp_path: Path) -> None:
    fingerprint = model_fingerprint(tiny_model_dir)
    prompt, _ = _one_snapshot(model, tokens, tmp_path, fingerprint)
    turn = prompt + tokens(30)
    expected = cold(model, turn)
    assert warm(model, _restarted(tmp_path, fingerprint), turn) == (expected, len(prompt))


def test_fingerprint_covers_every_weight_byte_and_is_cached(tiny_model_dir: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(tiny_model_dir, copy)
    hashes = tmp_path / "weight-hashes.json"
    original = model_fingerprint(copy, hashes)
    assert json.loads(hashes.read_text())  # the full hash is kept for the next start
    assert model_fingerprint(copy, hashes) == original == model_fingerprint(tiny_model_dir)
    weights = sorted(copy.glob("*.safetensors"))[0]
    raw = bytearray(weights.read_bytes())
    # One byte a quarter of the way in: outside the three 1 MiB samples the old fingerprint read.
    at = len(raw) // 4
    raw[at] ^= 0x01
    weights.write_bytes(bytes(raw))
    assert model_fingerprint(copy, hashes) != original


def test_start_survives_damaged_and_unexpected_entries(
    model, tokens, tiny_model_dir: Path, tmp_path: Path, caplog
) -> None:
    fingerprint = model_fingerprint(tiny_model_dir)
    prompt, good = _one_snapshot(model, tokens, tmp_path, fingerprint)
    folder = good.parent
    (folder / "a-directory.safetensors").mkdir()
    (folder / "a-directory.safetensors" / "inside").write_text("x")
    (folder / "dangling.safetensors").symlink_to(tmp_path / "nowhere")
    (folder / "link.safetensors").symlink_to(good)
    (folder / "garbage.safetensors").write_bytes(b"\xff" * 40)
    (folder / "empty.safetensors").write_bytes(b"")
    n, header = _header(good)
    header["__metadata__"]["0.format"] = "ccwarm-kv/1"
    old = json.dumps(header).encode()
    (folder / "old-format.safetensors").write_bytes(struct.pack("<Q", len(old)) + old + good.read_bytes()[8 + n :])
    (folder / "notes.txt").write_text("not ours to delete")
    with caplog.at_level("WARNING", logger="ccwarm.kv_disk"):
        store = _restarted(tmp_path, fingerprint)
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "removed 6 unusable entries" in warnings[0], warnings
    assert sorted(p.name for p in folder.iterdir()) == sorted([good.name, "notes.txt"])
    assert good.resolve() == good  # the link was removed, not its target
    assert [len(s) for s in store.disk.entries()] == [len(prompt)]
    assert store.restore(store.lookup(prompt + tokens(3))) is not None


def test_format_is_current() -> None:
    assert FORMAT == "ccwarm-kv/2"


def test_an_evicted_snapshot_stays_findable_until_its_file_is_written(
    model, tokens, tiny_model_dir: Path, tmp_path: Path
) -> None:
    """Finding 7: a main-thread snapshot evicted from memory while its disk copy still waited
    out the write delay was invisible, so the next main turn restored only the system prefix."""
    fingerprint = model_fingerprint(tiny_model_dir)
    disk = DiskTier(tmp_path, fingerprint, budget=GB, write_delay=3.0)
    probe = SnapshotStore(memory_budget=GB)
    conversation_turn(model, probe, tokens(300), protected=0)
    one = probe.memory_bytes
    store = SnapshotStore(memory_budget=int(one * 1.5), disk=disk)  # room for one 300-token snapshot
    main = tokens(300)
    main_out = conversation_turn(model, store, main, protected=0)
    conversation_turn(model, store, tokens(300), protected=0)  # a side request evicts main
    assert all(list(s.tokens[:300]) != main for s in store.snapshots.values())
    assert not list(disk.dir.glob("*.safetensors"))  # nothing written yet
    turn2 = main + main_out[:-1] + tokens(20)
    hit = store.lookup(turn2)
    assert hit is not None and hit.length == len(main) + len(main_out) - 1
    assert disk.pending_bytes > 0
    assert warm(model, store, turn2)[1] == hit.length
    disk.close()
    assert disk.pending_bytes == 0 and len(list(disk.dir.glob("*.safetensors"))) == 2


def test_a_superseded_file_goes_only_after_its_replacement_is_durable(
    model, tokens, tiny_model_dir: Path, tmp_path: Path
) -> None:
    fingerprint = model_fingerprint(tiny_model_dir)
    disk = DiskTier(tmp_path, fingerprint, budget=GB, write_delay=0.0)
    store = SnapshotStore(memory_budget=GB, disk=disk)
    prompt = tokens(300)
    out = conversation_turn(model, store, prompt, protected=0)
    disk.flush()
    (first,) = disk.dir.glob("*.safetensors")
    disk.write_delay = 3.0
    turn2 = prompt + out[:-1] + tokens(30)
    started = time.monotonic()
    conversation_turn(model, store, turn2, protected=0)  # supersedes the first snapshot
    assert first.exists() and time.monotonic() - started < 3.0  # a kill -9 now keeps the old file
    disk.flush()
    assert not first.exists() and len(list(disk.dir.glob("*.safetensors"))) == 1
    assert [len(s) for s in disk.entries()] == [len(turn2) + 9]


@pytest.mark.parametrize("size", [0, 7, 8, 100])
def test_short_files_are_removed(model, tokens, tiny_model_dir: Path, tmp_path: Path, size: int) -> None:
    fingerprint = model_fingerprint(tiny_model_dir)
    _, path = _one_snapshot(model, tokens, tmp_path, fingerprint, n=50)
    path.write_bytes(path.read_bytes()[:size])
    assert _restarted(tmp_path, fingerprint).disk.entries() == []
    assert not path.exists()
