"""Faults the server recovers from: no stuck worker, never a wrong answer.

- Disconnects: a client that leaves while its request is queued, prefilling or decoding, streamed
  or not, frees the worker at once (the next request waits for no leftover work).
- Damaged cache files and kill -9 during writes: a warning, then answers equal to a cold run's.

Fuzzed bodies against the server and the addons are in test_faults_fuzz.py.
"""

from __future__ import annotations

import json
import os
import re
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from test_prefix_cache_server import ask, same_as_cold, start, stats, user

from ccwarm.server_proc import ServerProcess

# -- disconnects --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def slow_server(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """Every forward pass costs 10 ms per token: a 400-token prefill takes ~4 s, decoding ~100 tokens/s."""
    d = tmp_path_factory.mktemp("disconnects")
    srv = ServerProcess(
        "--model",
        str(tiny_model_dir),
        "--cache-dir",
        str(d / "cache"),
        "--test-slow-prefill",
        "0.01",
        "--ping-interval",
        "0.2",
        "--progress-after",
        "100",
        log_path=d / "server.log",
        timeout=120,
    )
    yield srv
    srv.stop()


LONG_PROMPT = " ".join(f"record {i} reads fine" for i in range(150))


def body_for(phase: str, stream: bool, salt: str) -> dict[str, Any]:
    if phase == "decoding":  # short prompt, an answer that would take a minute
        return {
            "model": "claude-test",
            "max_tokens": 6000,
            "stream": stream,
            "messages": [user(f"talk at length {salt}")],
        }
    return {"model": "claude-test", "max_tokens": 4, "stream": stream, "messages": [user(f"{salt} {LONG_PROMPT}")]}


def leave_after(url: str, body: dict[str, Any], seconds: float) -> None:
    """Send `body` and hang up after `seconds`, whatever has arrived by then."""
    if body["stream"]:
        t0 = time.monotonic()
        with httpx.stream("POST", url + "/v1/messages", json=body, timeout=60) as r:
            for _ in r.iter_lines():
                if time.monotonic() - t0 >= seconds:
                    return
        raise AssertionError("the stream ended before the client left")
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(url + "/v1/messages", json=body, timeout=seconds)


@pytest.mark.parametrize("stream", [True, False], ids=["streamed", "not-streamed"])
@pytest.mark.parametrize("phase", ["queued", "prefilling", "decoding"])
def test_a_client_that_leaves_frees_the_worker(slow_server: ServerProcess, phase: str, stream: bool) -> None:
    salt = f"{phase}-{stream}"
    queued_before = slow_server.log().count("cancelled while queued")
    blocker = None
    if phase == "queued":  # a long request holds the worker while ours waits behind it
        blocker = threading.Thread(target=leave_after, args=(slow_server.url, body_for("decoding", True, salt), 2.5))
        blocker.start()
        time.sleep(0.5)
        leave_after(slow_server.url, body_for("prefilling", stream, salt), 1.0)
        blocker.join()
    else:
        leave_after(slow_server.url, body_for(phase, stream, salt), 1.5)
    t0 = time.monotonic()
    r = httpx.post(
        slow_server.url + "/v1/messages",
        json={"model": "claude-test", "max_tokens": 1, "messages": [user("next")]},
        timeout=60,
    )
    waited = time.monotonic() - t0
    assert r.status_code == 200
    # Unfreed, the worker would still owe seconds of prefill or a minute of decoding.
    assert waited < 3.0, (phase, stream, waited)
    recent = httpx.get(slow_server.url + "/v1/cache/requests", timeout=10).json()["data"]
    if phase == "queued":
        assert slow_server.log().count("cancelled while queued") == queued_before + 1
        assert recent[-2]["outcome"] == "cancelled" and recent[-2]["output"] < 6000  # the blocker
    else:
        dropped = recent[-2]
        assert dropped["outcome"] == "cancelled", dropped
        if phase == "prefilling":
            assert dropped["output"] == 0 and dropped["prefilled"] < dropped["prompt"], dropped
        else:
            assert 0 < dropped["output"] < 1000, dropped


# -- damaged files and kill -9 ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tmp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from test_prefix_cache_server import SCRIPT

    d = tmp_path_factory.mktemp("damage")
    (d / "script.json").write_text(json.dumps(SCRIPT))
    return d


@pytest.fixture(scope="module")
def reference(tiny_model_dir: Path, tmp: Path) -> Iterator[ServerProcess]:
    srv = start(tiny_model_dir, tmp, "reference", "--cache-memory", "0")
    yield srv
    srv.stop()


def warm_one(tiny_model_dir: Path, tmp: Path, reference: ServerProcess, name: str, history: list[dict]) -> Path:
    cache_dir = tmp / f"cache-{name}"
    srv = start(tiny_model_dir, tmp, f"{name}-1", cache_dir=cache_dir)
    try:
        same_as_cold(srv, reference, history)
    finally:
        srv.stop()
    return cache_dir


def flip_tensor_bytes(path: Path) -> None:
    data = bytearray(path.read_bytes())
    header = 8 + int.from_bytes(data[:8], "little")
    for i in range(header + 64, len(data), max(1, (len(data) - header) // 16)):
        data[i] ^= 0x5A
    path.write_bytes(bytes(data))


def change_a_token_id(path: Path) -> None:
    lines = path.read_text().splitlines()
    entry = json.loads(lines[-1])
    key = next(k for k, v in entry.items() if isinstance(v, list) and v)
    entry[key][len(entry[key]) // 2] += 1
    lines[-1] = json.dumps(entry)
    path.write_text("\n".join(lines) + "\n")


@pytest.mark.parametrize("damage", ["tensor bytes", "truncated", "segment token id", "output token id"])
def test_damaged_cache_files_cost_a_warning_never_a_wrong_answer(tiny_model_dir, tmp, reference, damage: str) -> None:
    history = [user(f"Explain the cache folder ({damage}).")]
    cache_dir = warm_one(tiny_model_dir, tmp, reference, damage.replace(" ", "-"), history)
    if damage in ("tensor bytes", "truncated"):
        files = sorted(cache_dir.rglob("*.safetensors"))
        assert files
        for f in files:
            if damage == "truncated":  # a write cut short, header intact
                f.write_bytes(f.read_bytes()[: f.stat().st_size * 2 // 3])
            else:
                flip_tensor_bytes(f)
    else:
        name = "segments-*.jsonl" if damage.startswith("segment") else "outputs.jsonl"
        logs = sorted(cache_dir.rglob(name))
        assert logs
        change_a_token_id(logs[0])
    srv = start(tiny_model_dir, tmp, f"{damage.replace(' ', '-')}-2", cache_dir=cache_dir)
    try:
        warm = same_as_cold(srv, reference, history)
        log = srv.log()
        if damage in ("tensor bytes", "truncated"):
            assert warm.usage.cache_read_input_tokens == 0
            assert re.search(r"WARNING.*(checksum|unusable)", log), log[-2000:]
            assert stats(srv)["bad_files_removed"] >= 1, log[-2000:]
        else:
            assert re.search(r"WARNING.*(damaged|checksum)", log), log[-2000:]
    finally:
        srv.stop()


def test_a_model_whose_weights_differ_never_restores_the_others_snapshots(tiny_model_dir, tmp, reference) -> None:
    history = [user("Which model wrote this?")]
    cache_dir = warm_one(tiny_model_dir, tmp, reference, "other-model", history)
    other = tmp / "other-model"
    other.mkdir()
    for f in tiny_model_dir.iterdir():
        (other / f.name).write_bytes(f.read_bytes())
    weights = next(other.glob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[len(data) // 2 + 3] ^= 0x01  # one bit of one weight, far from the header
    weights.write_bytes(bytes(data))
    srv = start(other, tmp, "other-model-2", cache_dir=cache_dir)
    try:
        assert ask(srv, history).usage.cache_read_input_tokens == 0
    finally:
        srv.stop()


def test_kill_9_while_snapshots_are_written_then_a_restart_answers_as_cold(tiny_model_dir, tmp, reference) -> None:
    cache_dir = tmp / "cache-kill"
    histories = [[user(f"Conversation {i}: " + " ".join(f"w{i}{j}" for j in range(80)))] for i in range(4)]
    for round_ in range(3):
        srv = start(tiny_model_dir, tmp, f"kill-{round_}", "--checkpoint-seconds", "0.01", cache_dir=cache_dir)
        try:
            for h in histories:
                ask(srv, h, max_tokens=2)
            os.kill(srv.proc.pid, signal.SIGKILL)  # the answers are out, their writes may not be
            srv.proc.wait(10)
        finally:
            srv.stop()
    srv = start(tiny_model_dir, tmp, "kill-after", cache_dir=cache_dir)
    try:
        for h in histories:
            same_as_cold(srv, reference, h)
        assert "Traceback" not in srv.log()
    finally:
        srv.stop()
