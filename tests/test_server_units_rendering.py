"""Unit tests for the prompt renderer: the rendering guarantees the prefix cache relies on (append-only
prefixes, output tokens rendered back as generated), segments remembered across a restart, and
deferred tools loaded by tool_reference."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from server_helpers import base, build_tiny_model

from cache_backend.errors import InvalidRequest
from cache_backend.hermes import tool_call_markup
from cache_backend.render import Renderer
from cache_backend.validate import parse_messages_request

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
