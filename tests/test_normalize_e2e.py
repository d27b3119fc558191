"""A real `mitmdump -s addons/normalize.py` in reverse mode, driven by the official anthropic SDK."""

from __future__ import annotations

import json
import time

import anthropic
import httpx
import pytest

from ccwarm.harness import mitmdump
from ccwarm.testing.synthetic import SessionGenerator, SessionSpec
from ccwarm.testing.upstream import RecordingUpstream

BILLING = "x-anthropic-billing-header: cc_version=2.1.39.c39; cc_entrypoint=cli; cch=56445;"
SYSTEM = [
    {"type": "text", "text": BILLING},
    {"type": "text", "text": "You are Claude Code.", "cache_control": {"type": "ephemeral"}},
]


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    upstream = RecordingUpstream()
    log = tmp_path_factory.mktemp("mitm") / "mitmdump.log"
    with upstream.serve(), mitmdump(upstream.port, "addons/normalize.py", log=log) as (port, log):
        client = anthropic.Anthropic(base_url=f"http://127.0.0.1:{port}", api_key="sk-test", max_retries=0)
        yield upstream, client, port, log


def last_body(upstream: RecordingUpstream) -> dict:
    return json.loads(upstream.requests[-1].body)


def test_non_streaming_request_reaches_upstream_without_billing_block(chain) -> None:
    upstream, client, _, log = chain
    reply = client.messages.create(
        model="claude-opus-4-8", max_tokens=16, system=SYSTEM, messages=[{"role": "user", "content": "hi"}]
    )
    assert reply.content[0].text == "Hello"
    sent = last_body(upstream)
    assert sent["system"] == SYSTEM[1:]
    assert "x-anthropic-billing-header" not in upstream.requests[-1].body.decode()
    assert "dropped system[0]: billing header cc_version=2.1.39.c39 cch=56445" in log.read_text()


def test_streaming_events_arrive_before_upstream_finishes(chain) -> None:
    upstream, client, _, _ = chain
    upstream.release.clear()
    started = time.monotonic()
    with client.messages.stream(
        model="claude-opus-4-8", max_tokens=16, system=SYSTEM, messages=[{"role": "user", "content": "hi"}]
    ) as stream:
        events = iter(stream)
        first = next(events)
        first_after = time.monotonic() - started
        # The upstream is still holding the rest of the stream: the proxy did not buffer.
        assert not upstream.release.is_set()
        upstream.release.set()
        rest = [e.type for e in events]
        text = stream.get_final_text()
    assert first.type == "message_start"
    assert first_after < upstream.hold_seconds / 2
    assert "message_stop" in rest and text == "Hello"
    assert last_body(upstream)["system"] == SYSTEM[1:]


def test_count_tokens_path_with_query(chain) -> None:
    upstream, client, _, _ = chain
    count = client.messages.count_tokens(
        model="claude-opus-4-8", system=SYSTEM, messages=[{"role": "user", "content": "hi"}]
    )
    assert count.input_tokens == 3
    assert upstream.requests[-1].path.startswith("/v1/messages/count_tokens")
    assert last_body(upstream)["system"] == SYSTEM[1:]


def test_generated_session_bytes(chain) -> None:
    """A full-size generated request: upstream gets the client's bytes minus the block, exactly."""
    upstream, _, port, _ = chain
    req = SessionGenerator(SessionSpec(turns=3)).main_turns()[-1]
    req.body["stream"] = False
    raw = req.raw()
    httpx.post(
        f"http://127.0.0.1:{port}/v1/messages?beta=true", content=raw, headers=req.headers, timeout=30
    ).raise_for_status()
    assert upstream.requests[-1].body == json.dumps(dict(req.body, system=req.body["system"][1:])).encode()


@pytest.mark.parametrize(
    "content,headers",
    [
        (b"{not json", {"content-type": "application/json"}),
        (b'["a"]', {"content-type": "application/json"}),
        (b'{"system": 3}', {"content-type": "application/json"}),
    ],
)
def test_bad_bodies_pass_through_untouched(chain, content, headers) -> None:
    upstream, _, port, log = chain
    httpx.post(f"http://127.0.0.1:{port}/v1/messages", content=content, headers=headers, timeout=30)
    assert upstream.requests[-1].body == content
    assert "forwarded untouched" in log.read_text()
