"""addons/normalize.py driven through mitmproxy's own test harness (taddons, tflow)."""

from __future__ import annotations

import gzip
import json
import logging

import pytest
from mitmproxy import exceptions, http
from mitmproxy.test import taddons, tflow, tutils

from ccwarm.addons.normalize import METADATA_KEY, Normalize
from ccwarm.testing.synthetic import SessionGenerator, SessionSpec

BILLING = "x-anthropic-billing-header: cc_version=2.1.39.c39; cc_entrypoint=cli; cch=56445;"


def make_flow(
    content: bytes,
    *,
    method: bytes = b"POST",
    path: bytes = b"/v1/messages?beta=true",
    host: str = "127.0.0.1",
    headers: tuple = (),
) -> http.HTTPFlow:
    hdrs = http.Headers(((b"content-type", b"application/json"), *headers))
    req = tutils.treq(method=method, path=path, host=host, port=8080, headers=hdrs, content=content)
    return tflow.tflow(req=req)


def body(system) -> bytes:
    return json.dumps(
        {"model": "claude-opus-4-8", "system": system, "messages": [{"role": "user", "content": "hi"}]}
    ).encode()


@pytest.fixture
def addon():
    a = Normalize()
    with taddons.context(a) as tctx:
        yield a, tctx


def test_drops_billing_block_and_annotates_flow(addon) -> None:
    a, _ = addon
    f = make_flow(body([{"type": "text", "text": BILLING}, {"type": "text", "text": "You are Claude Code."}]))
    a.request(f)
    assert json.loads(f.request.content)["system"] == [{"type": "text", "text": "You are Claude Code."}]
    assert f.comment == "dropped system[0]: billing header cc_version=2.1.39.c39 cch=56445"
    assert f.metadata[METADATA_KEY]["dropped"][0]["text"] == BILLING
    assert f.request.headers["content-length"] == str(len(f.request.content))


def test_count_tokens_and_string_system(addon) -> None:
    a, _ = addon
    f = make_flow(body(f"{BILLING}\nYou are Claude Code."), path=b"/v1/messages/count_tokens")
    a.request(f)
    assert json.loads(f.request.content)["system"] == "You are Claude Code."


def test_generated_session_keeps_everything_but_the_block(addon) -> None:
    a, _ = addon
    req = SessionGenerator(SessionSpec(turns=2)).main_turns()[-1]
    f = make_flow(req.raw())
    a.request(f)
    expected = dict(req.body, system=req.body["system"][1:])
    assert f.request.content == json.dumps(expected).encode()


def test_user_patterns(addon) -> None:
    a, tctx = addon
    tctx.configure(a, normalize_drop=[r"^Session started at "])
    f = make_flow(body([{"type": "text", "text": "Session started at 10:01"}, {"type": "text", "text": "Keep"}]))
    a.request(f)
    assert json.loads(f.request.content)["system"] == [{"type": "text", "text": "Keep"}]
    assert "matched" in f.comment


def test_bad_pattern_is_an_option_error(addon) -> None:
    a, tctx = addon
    with pytest.raises(exceptions.OptionsError, match="normalize_drop"):
        tctx.configure(a, normalize_drop=["(unclosed"])


def test_switched_off(addon) -> None:
    a, tctx = addon
    tctx.configure(a, normalize=False)
    raw = body([{"type": "text", "text": BILLING}])
    f = make_flow(raw)
    a.request(f)
    assert f.request.content == raw and not f.comment


def test_first_party_is_left_alone_unless_asked(addon) -> None:
    a, tctx = addon
    raw = body([{"type": "text", "text": BILLING}])
    f = make_flow(raw, host="api.anthropic.com")
    a.request(f)
    assert f.request.content == raw
    tctx.configure(a, normalize_keep_first_party=False)
    f = make_flow(raw, host="api.anthropic.com")
    a.request(f)
    assert json.loads(f.request.content)["system"] == []


@pytest.mark.parametrize(
    "content,method,path,headers,log",
    [
        (b"not json", b"POST", b"/v1/messages", (), "body is not valid JSON"),
        (
            b'{"model": "x", "messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
            b"POST",
            b"/v1/messages",
            (),
            "too deeply to decode",
        ),
        (b'{"max_tokens": ' + b"9" * 5000 + b', "system": []}', b"POST", b"/v1/messages", (), "4300 digits"),
        (b"[1,2]", b"POST", b"/v1/messages", (), "not an object"),
        (b'{"system": 42}', b"POST", b"/v1/messages", (), "'system' is neither"),
        (b"", b"POST", b"/v1/messages", (), "empty body"),
        (
            gzip.compress(body([{"type": "text", "text": BILLING}])),
            b"POST",
            b"/v1/messages",
            ((b"content-encoding", b"gzip"),),
            "content-encoding 'gzip'",
        ),
        (
            body([{"type": "text", "text": BILLING}]),
            b"POST",
            b"/v1/messages",
            ((b"content-encoding", b"br"),),
            "content-encoding 'br'",
        ),
        (
            body([{"type": "text", "text": BILLING}]),
            b"POST",
            b"/v1/messages",
            ((b"content-encoding", b"zstd"),),
            "content-encoding 'zstd'",
        ),
        (body([{"type": "text", "text": BILLING}]), b"GET", b"/v1/messages", (), None),
        (body([{"type": "text", "text": BILLING}]), b"POST", b"/v1/complete", (), None),
        (body([{"type": "text", "text": BILLING}]), b"POST", b"/v1/messages/batches", (), None),
    ],
)
def test_bad_or_foreign_input_passes_untouched(addon, caplog, content, method, path, headers, log) -> None:
    a, _ = addon
    f = make_flow(content, method=method, path=path, headers=headers)
    before = f.request.raw_content
    with caplog.at_level(logging.DEBUG):
        a.request(f)
    assert f.request.raw_content == before
    assert not f.comment and METADATA_KEY not in f.metadata
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    if log is None:
        assert not warnings
    else:
        assert len(warnings) == 1 and log in warnings[0].getMessage()


def test_sse_responses_stream_others_buffer(addon) -> None:
    a, _ = addon
    f = make_flow(body([]))
    f.response = tutils.tresp(headers=http.Headers(((b"content-type", b"text/event-stream; charset=utf-8"),)))
    a.responseheaders(f)
    assert f.response.stream is True
    f = make_flow(body([]))
    f.response = tutils.tresp(headers=http.Headers(((b"content-type", b"application/json"),)))
    a.responseheaders(f)
    assert not f.response.stream


def test_same_input_same_bytes(addon) -> None:
    a, _ = addon
    raw = SessionGenerator(SessionSpec(turns=1)).main_turns()[0].raw()
    outputs = set()
    for _ in range(3):
        f = make_flow(raw)
        a.request(f)
        outputs.add(f.request.content)
    assert len(outputs) == 1
