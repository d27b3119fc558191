"""Unit tests for the server's pure parts: tool-call parsing, stop sequences, relaxed JSON,
validation messages, and the rendering guarantees the prefix cache relies on."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from server_helpers import build_tiny_model

from cache_backend.errors import InvalidRequest
from cache_backend.hermes import tool_call_markup
from cache_backend.output import OutputAssembler, StopSequenceFilter
from cache_backend.render import Renderer
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


def base(**kw: Any) -> dict[str, Any]:
    return {"model": "claude-x", "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}], **kw}


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


# --- rendering -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path) -> Any:
    from mlx_lm.utils import load_tokenizer

    return load_tokenizer(tiny_model_dir)


TOOLS = [
    {
        "name": "Read",
        "description": "Read a file.",
        "input_schema": {"type": "object", "properties": {"path": {"type": "string"}}},
    }
]


def req(messages: list[dict[str, Any]], **kw: Any) -> Any:
    body = {
        "model": "claude-x",
        "max_tokens": 10,
        "system": [{"type": "text", "text": "You are a coder."}],
        "tools": TOOLS,
        "messages": messages,
        **kw,
    }
    return parse_messages_request(body)


CONVERSATION: list[dict[str, Any]] = [
    {
        "role": "user",
        "content": [
            {"type": "text", "text": "<system-reminder>ctx</system-reminder>"},
            {"type": "text", "text": "Read a.txt"},
        ],
    },
    {
        "role": "assistant",
        "content": [
            {"type": "thinking", "thinking": "plan", "signature": "s"},
            {"type": "text", "text": "Reading it."},
            {"type": "tool_use", "id": "toolu_1", "name": "Read", "input": {"path": "a.txt"}},
        ],
    },
    {
        "role": "user",
        "content": [
            {"type": "tool_result", "tool_use_id": "toolu_1", "content": [{"type": "text", "text": "hello"}]},
            {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AAAA"}},
        ],
    },
    {"role": "system", "content": "Mid-conversation note."},
    {"role": "user", "content": "Now summarize."},
    {"role": "assistant", "content": "It says hello."},
    {"role": "user", "content": [{"type": "text", "text": "ok?"}]},
    {
        "role": "assistant",
        "content": [{"type": "tool_use", "id": "toolu_2", "name": "Read", "input": {"path": "b.txt"}}],
    },
    {
        "role": "user",
        "content": [{"type": "tool_result", "tool_use_id": "toolu_2", "is_error": True, "content": "boom"}],
    },
]


def test_append_only_prefix_property(tokenizer: Any) -> None:
    r = Renderer(tokenizer)
    prev = None
    for n in range(1, len(CONVERSATION) + 1):
        if CONVERSATION[n - 1]["role"] == "assistant":
            continue
        p = r.render(req(CONVERSATION[:n]))
        assert p.segmented
        body = p.tokens[: p.generation_start]
        if prev is not None:
            assert body[: len(prev)] == prev, f"turn with {n} messages is not an extension"
        prev = body
        assert p.boundaries[-1] == len(p.tokens)
        assert list(p.message_ends) == sorted(p.message_ends)


def test_memo_does_not_change_tokens(tokenizer: Any) -> None:
    warm = Renderer(tokenizer)
    for n in range(1, len(CONVERSATION) + 1):
        if CONVERSATION[n - 1]["role"] != "assistant":
            warm.render(req(CONVERSATION[:n]))
    assert warm.render(req(CONVERSATION)).tokens == Renderer(tokenizer).render(req(CONVERSATION)).tokens


def test_model_output_renders_back_to_its_tokens(tokenizer: Any) -> None:
    r = Renderer(tokenizer)
    first = req(CONVERSATION[:1])
    p1 = r.render(first)
    reply = "Reading it.\n" + tool_call_markup("Read", {"path": "a.txt"})
    generated = r.encode(reply) + [tokenizer.eos_token_id]
    p2 = r.render(req(CONVERSATION[:3]))
    assert p2.tokens[: len(p1.tokens) + len(generated)] == p1.tokens + generated
    # Plain text answers too.
    p4 = r.render(req(CONVERSATION[:5]))
    p6 = r.render(req(CONVERSATION[:7]))
    text_gen = r.encode("It says hello.") + [tokenizer.eos_token_id]
    assert p6.tokens[: len(p4.tokens) + len(text_gen)] == p4.tokens + text_gen


def test_string_and_single_block_render_identically(tokenizer: Any) -> None:
    r = Renderer(tokenizer)
    a = r.render(req([{"role": "user", "content": "hello"}]))
    b = r.render(
        req([{"role": "user", "content": [{"type": "text", "text": "hello", "cache_control": {"type": "ephemeral"}}]}])
    )
    assert a.tokens == b.tokens
    sa = r.render(parse_messages_request({**base(), "system": "sys"}))
    sb = r.render(parse_messages_request({**base(), "system": [{"type": "text", "text": "sys"}]}))
    assert sa.tokens == sb.tokens


def test_thinking_is_dropped_consistently(tokenizer: Any) -> None:
    r = Renderer(tokenizer)
    with_thinking = r.render(req(CONVERSATION[:3])).tokens
    no_thinking = [dict(m) for m in CONVERSATION[:3]]
    no_thinking[1] = {
        "role": "assistant",
        "content": [b for b in CONVERSATION[1]["content"] if b["type"] != "thinking"],
    }
    assert Renderer(tokenizer).render(req(no_thinking)).tokens == with_thinking
    assert "plan" not in tokenizer.decode(with_thinking)


def test_mid_conversation_system_stays_in_place_and_images_become_placeholders(tokenizer: Any) -> None:
    text = tokenizer.decode(Renderer(tokenizer).render(req(CONVERSATION)).tokens)
    assert (
        text.index("You are a coder.")
        < text.index("Read a.txt")
        < text.index("Mid-conversation note.")
        < text.index("Now summarize.")
    )
    assert "image omitted" in text and "AAAA" not in text
    assert "Error: boom" in text
    assert '"name": "Read"' in text  # tools reached the template


def test_prefix_end_covers_system_and_tools(tokenizer: Any) -> None:
    r = Renderer(tokenizer)
    a = r.render(req([{"role": "user", "content": "zebra"}]))
    b = r.render(req([{"role": "user", "content": "giraffe, different"}]))
    assert a.prefix_end > 0 and a.tokens[: a.prefix_end] == b.tokens[: b.prefix_end]
    head = tokenizer.decode(a.tokens[: a.prefix_end])
    assert "You are a coder." in head and '"name": "Read"' in head and "zebra" not in head


def test_template_without_tool_support_gets_a_tools_section(tmp_path: Path) -> None:
    from mlx_lm.utils import load_tokenizer

    d = build_tiny_model(tmp_path)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg["chat_template"] = (
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    )
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    tok = load_tokenizer(d)
    r = Renderer(tok)
    assert not r.native_tools and not r.native_tool_calls
    p = r.render(req(CONVERSATION[:3]))
    text = tok.decode(p.tokens)
    assert "<tools>" in text and '"name": "Read"' in text
    assert tool_call_markup("Read", {"path": "a.txt"}) in text
    assert "<tool_response>\nhello" in text
    p1 = r.render(req(CONVERSATION[:1]))
    assert p.tokens[: len(p1.tokens)] == p1.tokens


def test_assistant_prefill_is_continued(tokenizer: Any) -> None:
    r = Renderer(tokenizer)
    p = r.render(req([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Sure, "}]))
    assert tokenizer.decode(p.tokens).endswith("<|im_start|>assistant\nSure, ")
    with pytest.raises(InvalidRequest):
        r.render(
            req(
                [
                    {"role": "user", "content": "hi"},
                    {"role": "assistant", "content": [{"type": "tool_use", "id": "t", "name": "Read", "input": {}}]},
                ]
            )
        )


def test_remembered_output_tokens_are_reused(tokenizer: Any) -> None:
    r = Renderer(tokenizer)
    nl = tokenizer.encode("\n", add_special_tokens=False)
    assert len(tokenizer.encode("\n\n\n\n", add_special_tokens=False)) < 4  # the canonical form merges
    convo = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "\n\n\n\n"},
        {"role": "user", "content": "and?"},
    ]
    canonical = Renderer(tokenizer).render(req(convo)).tokens
    r.remember_output("\n\n\n\n", nl * 4)
    p1 = r.render(req(convo[:1]))
    own = r.render(req(convo)).tokens
    assert own != canonical
    assert own[: len(p1.tokens) + 5] == p1.tokens + nl * 4 + [tokenizer.eos_token_id]


# --- token logs: what the renderer learned, across restarts -----------------------------------


def test_segments_survive_a_restart_without_tokenizing_again(tokenizer: Any, tmp_path: Path) -> None:
    from cache_backend.token_log import TokenLog

    tools = [
        {"name": f"Tool{i}", "description": "Reads a file. " * 200, "input_schema": {"type": "object"}}
        for i in range(4)
    ]
    convo = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "and?"},
    ]
    log = TokenLog(tmp_path / "segments.jsonl", limit=64)
    before = Renderer(tokenizer)
    before.on_segment = log.append
    expected = before.render(req(convo, system="You are terse.", tools=tools)).tokens

    after = Renderer(tokenizer)  # a restarted server
    for key, tokens in TokenLog(tmp_path / "segments.jsonl", limit=64).load():
        after.remember_segment(key, tokens)
    encoded: list[str] = []
    real = after.encode
    after.encode = lambda text: (encoded.append(text), real(text))[1]
    assert after.render(req(convo, system="You are terse.", tools=tools)).tokens == expected
    assert max(map(len, encoded)) < 40, encoded  # only the generation prompt, not the ~11 KB of tools


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


# --- deferred tools (Claude Code 2.1.33x: defer_loading + ToolSearch's tool_reference) ----------

WEBFETCH = {
    "name": "WebFetch",
    "description": "Fetch a URL.",
    "defer_loading": True,
    "input_schema": {"type": "object", "properties": {"url": {"type": "string"}}, "required": ["url"]},
}
SEARCH_CALL = {
    "role": "assistant",
    "content": [{"type": "tool_use", "id": "toolu_s", "name": "ToolSearch", "input": {"query": "select:WebFetch"}}],
}
SEARCH_RESULT = {
    "role": "user",
    "content": [
        {
            "type": "tool_result",
            "tool_use_id": "toolu_s",
            "content": [{"type": "tool_reference", "tool_name": "WebFetch"}],
        }
    ],
}


def test_a_tool_loaded_by_tool_reference_appends_and_never_moves_the_prefix(tokenizer: Any) -> None:
    """Before the load the deferred tool is absent from the prompt; the request that loads it (with
    the tool inserted mid-list, as the CLI does) extends the previous prompt token for token, and
    the tool's definition stands inside the tool result."""
    r = Renderer(tokenizer)
    search = {
        "name": "ToolSearch",
        "description": "Find tools.",
        "input_schema": {"type": "object", "properties": {"query": {"type": "string"}}},
    }
    first = [{"role": "user", "content": "Fetch the docs."}]
    before = r.render(req(first, tools=[search, TOOLS[0]]))
    after = r.render(req(first + [SEARCH_CALL, SEARCH_RESULT], tools=[search, WEBFETCH, TOOLS[0]]))
    assert after.tokens[: before.generation_start] == before.tokens[: before.generation_start]
    assert after.prefix_end == before.prefix_end
    text = tokenizer.decode(after.tokens[before.generation_start :])
    assert '"name": "WebFetch"' in text and "Fetch a URL." in text
    assert "WebFetch" not in tokenizer.decode(before.tokens)


def test_an_unloaded_deferred_tool_is_not_in_the_prompt(tokenizer: Any) -> None:
    r = Renderer(tokenizer)
    plain = r.render(req([{"role": "user", "content": "hi"}]))
    with_deferred = r.render(req([{"role": "user", "content": "hi"}], tools=[*TOOLS, WEBFETCH]))
    assert plain.tokens == with_deferred.tokens


def test_tool_reference_to_a_missing_tool_is_a_400_naming_the_field() -> None:
    with pytest.raises(
        InvalidRequest, match=r"messages\[2\]\.content\[0\]\.content\[0\]\.tool_name: no tool named 'WebFetch' in tools"
    ):
        req([{"role": "user", "content": "x"}, SEARCH_CALL, SEARCH_RESULT])
    bare = {"role": "user", "content": [{"type": "tool_reference", "tool_name": "Nope"}]}
    with pytest.raises(InvalidRequest, match=r"messages\[0\]\.content\[0\]\.tool_name: no tool named 'Nope'"):
        req([bare])
    with pytest.raises(InvalidRequest, match=r"tools\[1\]\.defer_loading: expected a boolean"):
        req([{"role": "user", "content": "x"}], tools=[*TOOLS, {**WEBFETCH, "defer_loading": "yes"}])


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
