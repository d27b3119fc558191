"""Unit tests for the server's pure parts outside the renderer: tool-call parsing, the block
assembler, stop sequences, relaxed JSON, request validation messages, the token log files, and the
Prometheus metrics."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from server_helpers import base

from cache_backend.errors import InvalidRequest
from cache_backend.output import OutputAssembler, StopSequenceFilter
from cache_backend.structured import JsonValueTracker, validate
from cache_backend.toolcalls import HERMES, StreamingToolParser, TextPiece, ToolCall
from cache_backend.validate import parse_messages_request


def feed_all(parser: StreamingToolParser, text: str, step: int = 1) -> list:
    out = []
    for i in range(0, len(text), step):
        out += parser.feed(text[i : i + step])
    return out + parser.finish()


def merged(pieces: list) -> list:
    """Adjacent text pieces joined, so results do not depend on how the text was chunked."""
    out: list = []
    for p in pieces:
        if isinstance(p, TextPiece) and out and isinstance(out[-1], TextPiece):
            out[-1] = TextPiece(out[-1].text + p.text)
        else:
            out.append(p)
    return out


# --- tool-call parser ------------------------------------------------------------------------


@pytest.mark.parametrize("step", [1, 3, 1000])
def test_tool_call_parser_text_then_call(step: int) -> None:
    text = 'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    out = merged(feed_all(StreamingToolParser(HERMES), text, step))
    assert out == [TextPiece("Let me check."), ToolCall("get_weather", {"city": "Paris"})]


def test_tool_call_parser_two_calls_and_partial_marker_holdback() -> None:
    p = StreamingToolParser(HERMES)
    assert p.feed("Hi <tool") == [TextPiece("Hi")]  # "<tool" may be a marker: held back
    out = p.feed(
        '_call>{"name": "a", "arguments": {}}</tool_call>\n'
        '<tool_call>{"name": "b", "arguments": {"x": [1, "}"]}}</tool_call>'
    )
    assert out == [ToolCall("a", {}), ToolCall("b", {"x": [1, "}"]})]
    assert p.finish() == []
    assert p.calls == 2


def test_tool_call_parser_not_a_marker_is_released() -> None:
    p = StreamingToolParser(HERMES)
    assert merged(p.feed("a <tool") + p.feed("box> b") + p.finish()) == [TextPiece("a <toolbox> b")]


def test_malformed_markup_comes_back_as_text() -> None:
    text = "x <tool_call>\n{not json}\n</tool_call> y"
    out = merged(feed_all(StreamingToolParser(HERMES), text))
    assert out == [TextPiece("x"), TextPiece("<tool_call>\n{not json}\n</tool_call>"), TextPiece("y")] or "".join(
        p.text for p in out if isinstance(p, TextPiece)
    ).replace(" ", "") == text.replace(" ", "")
    assert all(isinstance(p, TextPiece) for p in out)
    # Valid JSON that is not a call (no name) is text as well.
    assert all(
        isinstance(p, TextPiece) for p in feed_all(StreamingToolParser(HERMES), '<tool_call>{"x": 1}</tool_call>')
    )


def test_unterminated_call_is_accepted_if_it_parses() -> None:
    out = feed_all(StreamingToolParser(HERMES), '<tool_call>\n{"name": "a", "arguments": {"k": 1}}\n')
    assert out == [ToolCall("a", {"k": 1})]
    out = feed_all(StreamingToolParser(HERMES), '<tool_call>\n{"name": "a", "argu')
    assert out == [TextPiece('<tool_call>\n{"name": "a", "argu')]


def test_string_arguments_are_decoded() -> None:
    out = feed_all(StreamingToolParser(HERMES), '<tool_call>{"name": "a", "arguments": "{\\"k\\": 2}"}</tool_call>')
    assert out == [ToolCall("a", {"k": 2})]


def test_assembler_emits_anthropic_block_events() -> None:
    events: list[dict[str, Any]] = []
    asm = OutputAssembler(emit=events.append, tool_syntax=HERMES)
    for ch in 'Sure.\n<tool_call>\n{"name": "f", "arguments": {"q": "' + "z" * 100 + '"}}\n</tool_call>':
        asm.feed(ch)
    assert asm.finish("eos") == "tool_use"
    types = [(e["type"], e.get("index")) for e in events]
    assert types[0] == ("content_block_start", 0) and types[-1] == ("content_block_stop", 1)
    assert ("content_block_stop", 0) in types and ("content_block_start", 1) in types
    start = [e for e in events if e["type"] == "content_block_start"][1]["content_block"]
    assert start["type"] == "tool_use" and start["id"].startswith("toolu_") and start["input"] == {}
    pieces = [e["delta"]["partial_json"] for e in events if e["type"] == "content_block_delta" and e["index"] == 1]
    assert len(pieces) > 1 and json.loads("".join(pieces)) == {"q": "z" * 100}
    assert asm.blocks[0] == {"type": "text", "text": "Sure."}


# --- stop sequences and JSON -----------------------------------------------------------------


def test_stop_sequence_across_pieces() -> None:
    f = StopSequenceFilter(("END", "###"))
    out = f.feed("hello E") + f.feed("N") + f.feed("D tail")
    assert out == "hello " and f.hit == "END"
    f = StopSequenceFilter(("END",))
    assert f.feed("an EN") == "an " and f.feed("VOY") == "ENVOY" and f.hit is None


def test_assembler_stop_sequence_stops() -> None:
    events: list[dict[str, Any]] = []
    asm = OutputAssembler(emit=events.append, stop_sequences=("STOP",))
    assert not asm.feed("one ST")
    assert asm.feed("OP two")
    assert asm.finish("max_tokens") == "stop_sequence" and asm.stop_sequence == "STOP"
    assert asm.blocks == [{"type": "text", "text": "one "}]


def test_json_tracker_skips_preamble_and_stops_when_complete() -> None:
    t = JsonValueTracker()
    got = t.feed('```json\n{"a": "x}{\\"", "b": [1, {"c": 2}]') + t.feed("}\n```")
    assert t.complete and got == '{"a": "x}{\\"", "b": [1, {"c": 2}]}'
    assert json.loads(got)["a"] == 'x}{"'
    schema = {"type": "object", "required": ["title"], "properties": {"title": {"type": "string"}}}
    assert validate(schema, '{"title": "t"}') is None
    assert "title" in validate(schema, '{"x": 1}')
    assert "not valid JSON" in validate(schema, "{")


# --- validation ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "body, message",
    [
        (
            base(messages=[{"role": "user", "content": [{"type": "text"}]}]),
            "messages[0].content[0].text: field required",
        ),
        (
            base(messages=[{"role": "user", "content": [{"type": "tool_use", "id": "a", "name": "b", "input": {}}]}]),
            "messages[0].content[0].type: tool_use blocks are only allowed in assistant messages",
        ),
        (
            base(
                messages=[{"role": "assistant", "content": [{"type": "tool_use", "id": "a", "name": "b", "input": []}]}]
            ),
            "messages[0].content[0].input: expected an object, got an array",
        ),
        (
            base(
                messages=[{"role": "user", "content": [{"type": "tool_result", "tool_use_id": "a", "is_error": "yes"}]}]
            ),
            "messages[0].content[0].is_error: expected a boolean, got a string",
        ),
        (base(stop_sequences="END"), "stop_sequences: expected an array, got a string"),
        (base(tool_choice={"type": "tool", "name": "nope"}), "tool_choice.name: no tool named 'nope'"),
        (base(output_config={"format": {"type": "xml"}}), "output_config.format.type: unsupported format type 'xml'"),
        (base(max_tokens=0), "max_tokens: must be at least 1"),
        (base(stream="yes"), "stream: expected a boolean, got a string"),
    ],
)
def test_validation_messages_name_the_path(body: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidRequest) as e:
        parse_messages_request(body)
    assert message in e.value.message


def test_count_tokens_body_needs_no_max_tokens() -> None:
    body = base()
    del body["max_tokens"]
    assert parse_messages_request(body, count_tokens=True).max_tokens is None


# --- token logs --------------------------------------------------------------------------------


def test_token_log_keeps_the_newest_and_compacts(tmp_path: Path) -> None:
    from cache_backend.token_log import TokenLog

    path = tmp_path / "log.jsonl"
    log = TokenLog(path, limit=3)
    for k in "abcdea":
        log.append(k, [ord(k)])
    assert TokenLog(path, limit=3).load() == [("b", [98]), ("c", [99]), ("d", [100]), ("e", [101]), ("a", [97])][-3:]
    assert len(path.read_text().splitlines()) == 6  # not yet twice the limit
    log.append("f", [102])  # the 7th line: compacted to the newest 3
    assert path.read_text().count("\n") == 3
    assert TokenLog(path, limit=3).load() == [("e", [101]), ("a", [97]), ("f", [102])]


@pytest.mark.parametrize(
    "damage",
    [
        "torn json",
        "wrong type",
        "not json",
        "torn utf-8",
        "garbage bytes",
        "token id changed",
        "old format without checksum",
    ],
)
def test_token_log_drops_damaged_lines_with_one_warning(tmp_path: Path, damage: str, caplog) -> None:
    """Finding 3 and 4 of the hardening issue: a torn write that cuts a multi-byte character, or
    garbage, used to stop the server from starting; a changed token id gave a different answer."""
    from cache_backend.token_log import TokenLog

    path = tmp_path / "outputs.jsonl"
    log = TokenLog(path, limit=8)
    log.append("héllo wörld", [5, 6, 7])
    good = path.read_bytes()
    bad = {
        "torn json": b'{"key": "torn", "tokens": [1, 2\n',
        "wrong type": b'{"key": "b", "tokens": ["x"], "crc": 1}\n',
        "not json": b"not json\n",
        "torn utf-8": good[: good.index("ö".encode()) + 1],  # cut inside the 2-byte character, no newline
        "garbage bytes": bytes(range(256)) * 4,
        "token id changed": good.replace(b"[5, 6, 7]", b"[5, 9, 7]"),
        "old format without checksum": b'{"key": "x", "tokens": [1]}\n',
    }[damage]
    with path.open("ab") as f:
        f.write(bad)
    with caplog.at_level("WARNING", logger="cache_backend.token_log"):
        loaded = TokenLog(path, limit=8).load()
    assert loaded == [("héllo wörld", [5, 6, 7])]
    warnings = [r for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "outputs.jsonl: dropped " in warnings[0].getMessage()
    # The file was rewritten without the damage: a later append is never glued to a torn line.
    log.append("next", [1])
    caplog.clear()
    assert TokenLog(path, limit=8).load() == [("héllo wörld", [5, 6, 7]), ("next", [1])]
    assert not caplog.records


def test_token_log_that_is_a_directory_is_removed_not_fatal(tmp_path: Path, caplog) -> None:
    from cache_backend.token_log import TokenLog

    path = tmp_path / "outputs.jsonl"
    (path / "inner").mkdir(parents=True)
    with caplog.at_level("WARNING", logger="cache_backend.token_log"):
        assert TokenLog(path).load() == []
    assert "outputs.jsonl: unusable" in caplog.text and not path.exists()
    TokenLog(path).append("a", [1])
    assert TokenLog(path).load() == [("a", [1])]


# --- metrics -----------------------------------------------------------------------------------


def test_prometheus_reads_the_same_totals_as_the_json_stats() -> None:
    from cache_backend.metrics import ServerMetrics

    m = ServerMetrics()
    m.observe(100, 60, 5, 0.3)
    m.observe(10, 0, 2, None)
    text = m.prometheus({"snapshots": 3, "describe": "not a number"}).decode()
    stats = m.snapshot({})
    assert f"ccwarm_requests_total {float(stats['requests_total'])}" in text
    assert f"ccwarm_prefill_tokens_total {float(stats['prefill_tokens_total'])}" in text
    assert "ccwarm_cache_read_tokens_total 60.0" in text and "ccwarm_output_tokens_total 7.0" in text
    assert 'ccwarm_cache{field="snapshots"} 3.0' in text and "describe" not in text
    assert "ccwarm_ttft_seconds_count 1.0" in text
