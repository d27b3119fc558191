"""Hostile input against the real server and the real addons: no 5xx, no traceback, no stuck worker.

- Server fuzz: hypothesis sends raw bytes, arbitrary JSON and mutations of valid Claude Code
  bodies to a real tiny-model server (`/v1/messages` and `count_tokens`, streamed or not). Every
  answer is a success in Anthropic's shape or an Anthropic error JSON; the log holds no traceback.
- Proxy fuzz: the same bodies, plus Claude Code bodies with billing blocks, through normalize and
  stability in mitmproxy's test harness. No traceback is logged; the body is byte-identical unless
  a volatile block was dropped, and then it decodes to the original minus exactly those blocks.
- Disconnects: a client that leaves while its request is queued, prefilling or decoding, streamed
  or not, frees the worker at once (the next request waits for no leftover work).
- Damaged cache files and kill -9 during writes: a warning, then answers equal to a cold run's.

Fixed seeds (`derandomize=True`, no example database): the same examples every run.
"""

from __future__ import annotations

import asyncio
import copy
import json
import logging
import os
import re
import signal
import threading
import time
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from mitmproxy import contentviews
from mitmproxy.test import taddons
from server_helpers import check_event_order, parse_sse
from test_normalize_addon import make_flow
from test_prefix_cache_server import ask, same_as_cold, start, stats, user

from ccwarm import jsonsafe
from ccwarm.addons.normalize import METADATA_KEY as NORMALIZE_KEY
from ccwarm.addons.normalize import Normalize
from ccwarm.addons.stability import Stability
from ccwarm.server_proc import ServerProcess
from ccwarm.testing.synthetic import SessionGenerator, SessionSpec
from ccwarm.testing.synthetic_current import CurrentSession

REPO_ROOT = str(Path(__file__).resolve().parent.parent)

FUZZ = settings(
    max_examples=150,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture],
)

BILLING = "x-anthropic-billing-header: cc_version=2.1.332.a1b; cc_entrypoint=cli; cch=9f3c1;"
VALID_BODIES: list[dict[str, Any]] = [
    {
        "model": "claude-sonnet-4-5",
        "max_tokens": 4,
        "system": [
            {"type": "text", "text": BILLING},
            {"type": "text", "text": "You are Claude Code.", "cache_control": {"type": "ephemeral"}},
        ],
        "tools": [
            {
                "name": "Read",
                "description": "Read a file",
                "input_schema": {"type": "object", "properties": {"path": {"type": "string"}}, "required": ["path"]},
            }
        ],
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "read the readme"}]},
            {
                "role": "assistant",
                "content": [
                    {"type": "text", "text": "Reading."},
                    {"type": "tool_use", "id": "toolu_1", "name": "Read", "input": {"path": "README.md"}},
                ],
            },
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "# ccwarm"}]},
        ],
        "metadata": {"user_id": "user_abc"},
        "temperature": 0,
        "stream": True,
        "thinking": {"type": "disabled"},
        "stop_sequences": ["\n\nHuman:"],
    },
    {
        "model": "claude-haiku-4-5",
        "max_tokens": 3,
        "system": f"{BILLING}\nYou judge tool calls.",
        "messages": [{"role": "user", "content": "is `ls` safe?"}],
        "temperature": 1,
        "output_format": {
            "type": "json_schema",
            "schema": {"type": "object", "properties": {"ok": {"type": "boolean"}}},
        },
    },
]

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)


def _paths(value: Any, prefix: tuple = ()) -> Iterator[tuple]:
    yield prefix
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _paths(v, (*prefix, i))


def _at(value: Any, path: tuple) -> Any:
    for p in path:
        value = value[p]
    return value


@st.composite
def mutated_bodies(draw: st.DrawFn) -> bytes:
    """A valid body with one to three of its members replaced, removed, wrapped or added to."""
    body = copy.deepcopy(draw(st.sampled_from(VALID_BODIES)))
    for _ in range(draw(st.integers(1, 3))):
        paths = list(_paths(body))[1:]
        path = draw(st.sampled_from(paths))
        parent, key = _at(body, path[:-1]), path[-1]
        op = draw(st.sampled_from(["replace", "delete", "wrap", "add"]))
        if op == "replace":
            parent[key] = draw(JSON_VALUES)
        elif op == "delete":
            del parent[key]
        elif op == "wrap":
            parent[key] = [parent[key]]
        elif isinstance(parent, dict):
            parent[draw(st.text(max_size=8))] = draw(JSON_VALUES)
        else:
            parent.append(draw(JSON_VALUES))
    text = json.dumps(body, ensure_ascii=draw(st.booleans()))
    return text.encode("utf-8", "surrogatepass")  # a lone surrogate becomes bytes that are not UTF-8


BODIES = st.one_of(
    st.binary(max_size=200),
    JSON_VALUES.map(lambda v: json.dumps(v).encode("utf-8", "surrogatepass")),
    mutated_bodies(),
)
HOSTILE_EXAMPLES = [
    b"[" * 100_000,
    b'{"model": "claude-test", "max_tokens": ' + b"9" * 5000 + b', "messages": []}',
    b'{"model": "claude-test", "max_tokens": 4, "system": "\\ud800", "messages": [{"role": "user", "content": "hi"}]}',
    b'{"model": "claude-test", "max_tokens": 4, "messages": [{"role": "user", "content": "\xff\xfe"}]}',
    b'{"model": "claude-test", "max_tokens": 4, "temperature": NaN, "messages": [{"role": "user", "content": "hi"}]}',
    b'{"model": "claude-test", "max_tokens": 1e400, "messages": [{"role": "user", "content": "hi"}]}',
    b'{"model": "claude-test", "max_tokens": 4, "system": [' + b"[" * 5000 + b"]" * 5000 + b'], "messages": []}',
]


# -- the server -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fuzz_server(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    d = tmp_path_factory.mktemp("fuzz")
    srv = ServerProcess(
        "--model",
        str(tiny_model_dir),
        "--cache-dir",
        str(d / "cache"),
        "--max-output-tokens",
        "8",
        "--max-body",
        "1MB",
        "--structured-deadline",
        "2",
        log_path=d / "server.log",
        timeout=120,
    )
    yield srv
    srv.stop()


def check_answer(status: int, content_type: str, raw: bytes, path: str) -> None:
    assert status < 500, (status, raw[:500])
    if status != 200:
        err = json.loads(raw)
        assert err["type"] == "error", err
        assert isinstance(err["error"]["type"], str) and err["error"]["message"], err
        return
    if content_type.startswith("text/event-stream"):
        events = parse_sse(raw.decode())
        names = [n for n, _ in events if n != "ping"]
        if "error" in names:
            assert names[-1] == "error", names
            return
        check_event_order(events)
        return
    answer = json.loads(raw)
    if path.endswith("count_tokens"):
        assert isinstance(answer["input_tokens"], int), answer
    else:
        assert answer["type"] == "message" and answer["usage"]["output_tokens"] <= 8, answer


@FUZZ
@given(raw=BODIES, count=st.booleans())
@example(raw=HOSTILE_EXAMPLES[0], count=False)
@example(raw=HOSTILE_EXAMPLES[0], count=True)
@example(raw=HOSTILE_EXAMPLES[1], count=False)
@example(raw=HOSTILE_EXAMPLES[1], count=True)
@example(raw=HOSTILE_EXAMPLES[2], count=False)
@example(raw=HOSTILE_EXAMPLES[3], count=False)
@example(raw=HOSTILE_EXAMPLES[4], count=False)
@example(raw=HOSTILE_EXAMPLES[5], count=True)
@example(raw=HOSTILE_EXAMPLES[6], count=False)
def test_any_body_gets_an_answer_in_anthropic_shape(fuzz_server: ServerProcess, raw: bytes, count: bool) -> None:
    path = "/v1/messages/count_tokens" if count else "/v1/messages?beta=true"
    with httpx.stream(
        "POST",
        fuzz_server.url + path,
        content=raw,
        timeout=60,
        headers={"content-type": "application/json", "anthropic-version": "2023-06-01"},
    ) as r:
        check_answer(r.status_code, r.headers.get("content-type", ""), r.read(), path)


def test_the_fuzzed_server_still_answers_and_logged_no_traceback(fuzz_server: ServerProcess) -> None:
    r = httpx.post(
        fuzz_server.url + "/v1/messages",
        timeout=60,
        json={"model": "claude-test", "max_tokens": 3, "messages": [{"role": "user", "content": "still there?"}]},
    )
    assert r.status_code == 200 and r.json()["usage"]["output_tokens"] == 3
    assert "Traceback" not in fuzz_server.log(), fuzz_server.log()[-3000:]


# -- the proxy addons -------------------------------------------------------------------------------


def _claude_code_bodies() -> list[bytes]:
    """Whole Claude Code requests (both CLI shapes) with their billing block, some mutated."""
    current = [r for r in CurrentSession().session() if r.label in ("main 2", "classifier 1", "subagent 1", "compact")]
    return [r.raw() for r in SessionGenerator(SessionSpec(turns=2)).main_turns() + current]


CLAUDE_CODE_BODIES = _claude_code_bodies()


@st.composite
def claude_code_bodies(draw: st.DrawFn) -> bytes:
    body = json.loads(draw(st.sampled_from(CLAUDE_CODE_BODIES)))
    path = draw(st.sampled_from([p for p in _paths(body) if p and p[0] != "system" and len(p) < 4]))
    _at(body, path[:-1])[path[-1]] = draw(JSON_VALUES)
    return json.dumps(body, ensure_ascii=draw(st.booleans())).encode("utf-8", "surrogatepass")


@pytest.fixture(scope="module")
def addons_stack() -> Iterator[tuple[Normalize, Stability]]:
    n, s = Normalize(), Stability()
    with taddons.context(n, s):
        yield n, s


class _Tracebacks(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if (record.exc_info or record.levelno >= logging.ERROR) and self._ours(record):
            self.records.append(record)

    @staticmethod
    def _ours(record: logging.LogRecord) -> bool:
        """mitmproxy logs the errors of its own content views too (its GraphQL view cannot decode a
        100k-deep array): those are not the addons' to fix."""
        if not record.name.startswith("mitmproxy.") or not record.exc_info:
            return True
        frames = traceback.extract_tb(record.exc_info[2])
        return any(REPO_ROOT in f.filename and "/.venv/" not in f.filename for f in frames)


def expected_after_drop(original: dict[str, Any], dropped: list[dict[str, Any]]) -> dict[str, Any]:
    """The original request minus exactly the dropped system blocks (or lines of a string system)."""
    wheres = {d["where"] for d in dropped}
    out = dict(original)
    if isinstance(original["system"], list):
        out["system"] = [b for i, b in enumerate(original["system"]) if f"system[{i}]" not in wheres]
    else:
        lines = original["system"].split("\n")
        out["system"] = "\n".join(line for n, line in enumerate(lines) if f"system:line {n + 1}" not in wheres)
    return out


@settings(FUZZ, max_examples=300)
@given(raw=st.one_of(BODIES, claude_code_bodies()))
@example(raw=HOSTILE_EXAMPLES[0])
@example(raw=HOSTILE_EXAMPLES[1])
@example(raw=HOSTILE_EXAMPLES[6])
@example(raw=b'{"system": [' + b"[" * 3000 + b"]" * 3000 + b'], "messages": []}')
def test_any_body_passes_the_addons_untouched_or_minus_its_volatile_blocks(addons_stack, raw: bytes) -> None:
    n, s = addons_stack
    catcher = _Tracebacks()
    logging.getLogger().addHandler(catcher)
    try:
        f = make_flow(raw)
        n.request(f)
        s.request(f)
        s.drain()
        f.response = None
        contentviews.prettify_message(f.request, f)  # what mitmweb shows for it
    finally:
        logging.getLogger().removeHandler(catcher)
    assert not catcher.records, [r.getMessage() for r in catcher.records]
    dropped = (f.metadata.get(NORMALIZE_KEY) or {}).get("dropped")
    if not dropped:
        assert f.request.content == raw
        return
    assert jsonsafe.loads(f.request.content) == expected_after_drop(jsonsafe.loads(raw), dropped)
    assert all(BILLING_RE.search(d["text"]) for d in dropped)


BILLING_RE = re.compile(r"x-anthropic-billing-header:")


def test_a_hostile_body_through_a_live_response_hook(addons_stack) -> None:
    """The response hook (where stability settles its diff) on a body it could not parse."""
    n, s = addons_stack
    f = make_flow(HOSTILE_EXAMPLES[0])
    n.request(f)
    s.request(f)
    from mitmproxy.test import tutils

    f.response = tutils.tresp()
    asyncio.run(s.response(f))
    assert f.request.content == HOSTILE_EXAMPLES[0]


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
