"""Hostile input against the real server and the real addons: no 5xx, no traceback.

- Server fuzz: hypothesis sends raw bytes, arbitrary JSON and mutations of valid Claude Code
  bodies to a real tiny-model server (`/v1/messages` and `count_tokens`, streamed or not). Every
  answer is a success in Anthropic's shape or an Anthropic error JSON; the log holds no traceback.
- Proxy fuzz: the same bodies, plus Claude Code bodies with billing blocks, through normalize and
  stability in mitmproxy's test harness. No traceback is logged; the body is byte-identical unless
  a volatile block was dropped, and then it decodes to the original minus exactly those blocks.

Fixed seeds (`derandomize=True`, no example database): the same examples every run.
Disconnects, damaged cache files and kill -9 are in test_faults_recovery.py.
"""

from __future__ import annotations

import asyncio
import copy
import json
import logging
import re
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
