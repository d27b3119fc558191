"""The shared payload module: billing block variants, identities, byte-faithful stripping."""

from __future__ import annotations

import json
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ccwarm import jsonedit, payload
from ccwarm.testing.synthetic import SessionGenerator, SessionSpec

BILLING_VARIANTS = [
    (
        "x-anthropic-billing-header: cc_version=2.1.39.c39; cc_entrypoint=cli; cch=56445;",
        {"cc_version": "2.1.39.c39", "cc_entrypoint": "cli", "cch": "56445"},
    ),
    (
        "x-anthropic-billing-header: cc_version=2.1.197.f2f; cc_entrypoint=cli; cc_is_subagent=true;",
        {"cc_version": "2.1.197.f2f", "cc_entrypoint": "cli", "cc_is_subagent": "true"},
    ),
    (
        "x-anthropic-billing-header: cc_version=2.0.1.abc; cc_entrypoint=sdk-cli; cch=1a2b3; cc_workload=batch; "
        "cc_prev_req=req_011",
        {
            "cc_version": "2.0.1.abc",
            "cc_entrypoint": "sdk-cli",
            "cch": "1a2b3",
            "cc_workload": "batch",
            "cc_prev_req": "req_011",
        },
    ),
    (
        "x-anthropic-billing-header:cc_version=3.0.0.aaa;cc_entrypoint=claude-vscode;cc_future_field=42",
        {"cc_version": "3.0.0.aaa", "cc_entrypoint": "claude-vscode", "cc_future_field": "42"},
    ),
    (
        "  X-Anthropic-Billing-Header  :   cc_version = 1.2.3.fff ;  cch= 0ab12 ;;  ",
        {"cc_version": "1.2.3.fff", "cch": "0ab12"},
    ),
]


@pytest.mark.parametrize("text,fields", BILLING_VARIANTS)
def test_billing_header_variants_parse(text: str, fields: dict[str, str]) -> None:
    header = payload.parse_billing_header(text)
    assert header is not None
    assert header.fields == fields
    assert payload.is_billing_block({"type": "text", "text": text})


def test_billing_header_display_fields() -> None:
    header = payload.parse_billing_header(BILLING_VARIANTS[0][0])
    assert header.describe() == "billing header cc_version=2.1.39.c39 cch=56445"
    assert header.entrypoint == "cli" and not header.is_subagent
    sub = payload.parse_billing_header(BILLING_VARIANTS[1][0])
    assert sub.is_subagent and sub.describe().endswith("subagent")


def test_text_that_merely_mentions_the_header_is_not_a_billing_block() -> None:
    assert not payload.is_billing_block({"type": "text", "text": "Never send x-anthropic-billing-header: yourself."})
    assert not payload.is_billing_block({"type": "image", "source": {}})
    assert not payload.is_billing_block("x-anthropic-billing-header: cch=1;")


@pytest.mark.parametrize("text,_", BILLING_VARIANTS)
def test_list_form_drops_only_the_billing_block(text: str, _: dict) -> None:
    body = {
        "model": "m",
        "system": [{"type": "text", "text": text}, {"type": "text", "text": "You are Claude Code."}],
        "max_tokens": 10,
    }
    raw = json.dumps(body).encode()
    result = payload.strip_volatile(raw)
    assert [d.where for d in result.dropped] == ["system[0]"]
    assert json.loads(result.body) == {**body, "system": body["system"][1:]}


@pytest.mark.parametrize("text,_", BILLING_VARIANTS)
def test_string_form_drops_only_the_billing_line(text: str, _: dict) -> None:
    body = {"system": f"{text}\nYou are Claude Code.\nBe brief.", "messages": []}
    result = payload.strip_volatile(json.dumps(body).encode())
    assert json.loads(result.body)["system"] == "You are Claude Code.\nBe brief."
    assert result.dropped[0].where == "system:line 1"


def test_string_form_keeps_the_clients_escaping() -> None:
    raw = b'{"system":"x-anthropic-billing-header: cch=1;\\ncaf\\u00e9 \\\\n \\"q\\"\\u000aend"}'
    result = payload.strip_volatile(raw)
    assert result.body == b'{"system":"caf\\u00e9 \\\\n \\"q\\"\\u000aend"}'


def test_user_patterns_drop_blocks_and_lines() -> None:
    pattern = re.compile(r"^Current time: ")
    body = {"system": [{"type": "text", "text": "Current time: 12:01"}, {"type": "text", "text": "Stay."}]}
    result = payload.strip_volatile(json.dumps(body).encode(), [pattern])
    assert json.loads(result.body)["system"] == [{"type": "text", "text": "Stay."}]
    assert "matched" in result.dropped[0].reason
    result = payload.strip_volatile(json.dumps({"system": "Current time: 1\nStay."}).encode(), [pattern])
    assert json.loads(result.body)["system"] == "Stay."


def test_unchanged_bodies_come_back_as_the_same_object() -> None:
    raw = b'{"system": [{"type": "text", "text": "hi"}], "x": 1.50}'
    assert payload.strip_volatile(raw).body is raw
    assert payload.strip_volatile(b'{"messages": []}').body == b'{"messages": []}'
    assert payload.strip_volatile(b'{"system": null}').dropped == []


@pytest.mark.parametrize(
    "raw,message",
    [
        (b"", "empty body"),
        (b"   ", "empty body"),
        (b"not json", "not valid JSON"),
        (b"[1, 2]", "JSON list, not an object"),
        (b'"str"', "JSON str, not an object"),
        (b'{"a": 1} trailing', "not valid JSON"),
        (b'{"system": 5}', "'system' is neither"),
        (b'{"system": {"text": "x"}}', "'system' is neither"),
        (b"\xff\xfe{}", "not UTF-8"),
    ],
)
def test_bad_bodies_raise_payload_error(raw: bytes, message: str) -> None:
    with pytest.raises(payload.PayloadError, match=re.escape(message)):
        payload.strip_volatile(raw)


def test_duplicate_system_keys_follow_json_semantics() -> None:
    raw = b'{"system": "first", "system": [{"type":"text","text":"x-anthropic-billing-header: cch=1;"}]}'
    result = payload.strip_volatile(raw)
    assert result.body == b'{"system": "first", "system": []}'


# --- identities -------------------------------------------------------------------------------

SID = "0b7f3c2e-9d3a-4c1b-8e55-5a1f2f0d9c11"


def test_session_from_header_wins() -> None:
    ident = payload.identify(
        {"tools": [{}], "metadata": {"user_id": "user_x_session_other"}}, {"X-Claude-Code-Session-Id": SID}
    )
    assert ident.session_id == SID and ident.kind is payload.RequestKind.MAIN
    assert ident.conversation_key == SID


def test_session_from_json_user_id() -> None:
    user_id = json.dumps({"device_id": "d", "account_uuid": "", "session_id": SID})
    assert payload.identify({"tools": [{}], "metadata": {"user_id": user_id}}).session_id == SID


def test_session_from_legacy_user_id() -> None:
    user_id = f"user_4f1e2d_account_1c9a0b6e-1111-2222-3333-444455556666_session_{SID}"
    assert payload.identify({"tools": [{}], "metadata": {"user_id": user_id}}).session_id == SID


@pytest.mark.parametrize("user_id", [None, "", "{not json", "user_abc", 7, '["list"]'])
def test_missing_or_odd_user_ids_give_no_session(user_id) -> None:
    ident = payload.identify({"tools": [{}], "metadata": {"user_id": user_id}})
    assert ident.session_id is None and ident.conversation_key == "no-session"


def test_request_kinds() -> None:
    gen = SessionGenerator(SessionSpec(tools=3, tools_json_bytes=3000, system_bytes=500, turns=2))
    main = gen.main_turns()[0]
    title = gen.title_request()
    sub = gen.subagent_requests(1)[0]
    kinds = [payload.identify(r.body, r.headers) for r in (main, title, sub)]
    assert [k.kind for k in kinds] == [payload.RequestKind.MAIN, payload.RequestKind.SIDE, payload.RequestKind.SUBAGENT]
    assert kinds[1].conversation_key == f"{gen.session_id}/side"
    assert kinds[2].conversation_key.startswith(f"{gen.session_id}/agent:")
    # The billing flag alone marks a sub-agent when the header is missing.
    assert payload.identify(sub.body, {}).kind is payload.RequestKind.SUBAGENT
    assert kinds[0].billing.entrypoint == "cli"


@pytest.mark.parametrize(
    "path,ok",
    [
        ("/v1/messages", True),
        ("/v1/messages?beta=true", True),
        ("/v1/messages/count_tokens?beta=true", True),
        ("/v1/messages/", True),
        ("/v1/models", False),
        ("/v1/messages/batches", False),
        ("/v2/messages", False),
    ],
)
def test_messages_paths(path: str, ok: bool) -> None:
    assert payload.is_messages_path(path) is ok


def test_generated_session_strips_to_a_stable_prefix() -> None:
    """After stripping, consecutive main turns share their system + tools bytes exactly."""
    gen = SessionGenerator(SessionSpec(turns=3))
    reqs = gen.main_turns()
    stripped = [json.loads(payload.strip_volatile(r.raw()).body) for r in reqs]
    assert len({json.dumps(s["system"]) for s in stripped}) == 1
    assert len({r.body["system"][0]["text"] for r in reqs}) == 3  # cch rotated on every request
    assert 60_000 <= len(json.dumps(gen.tools)) <= 90_000


# --- properties -------------------------------------------------------------------------------

_field_names = st.sampled_from(
    ["cc_version", "cc_entrypoint", "cch", "cc_is_subagent", "cc_workload", "cc_prev_req", "cc_new"]
)
_field_values = st.text(alphabet="abcdef0123456789.-_", min_size=1, max_size=12)
_spaces = st.sampled_from(["", " ", "  ", "\t"])


@st.composite
def billing_texts(draw) -> str:
    fields = draw(st.lists(st.tuples(_field_names, _field_values), min_size=1, max_size=6))
    sep = draw(st.sampled_from([";", "; ", " ; "]))
    body = sep.join(f"{k}={v}" for k, v in fields)
    end = draw(st.sampled_from(["", ";", "; "]))
    return f"{draw(_spaces)}x-anthropic-billing-header{draw(_spaces)}:{draw(_spaces)}{body}{end}"


_json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**12), 10**12),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=30),
)
_json_values = st.recursive(
    _json_scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)),
    max_leaves=12,
)
_blocks = st.fixed_dictionaries(
    {
        "type": st.just("text"),
        "text": st.text(min_size=1, max_size=60).filter(lambda t: payload.parse_billing_header(t) is None),
    },
    optional={"cache_control": st.just({"type": "ephemeral"})},
)


@settings(max_examples=300, deadline=None)
@given(
    blocks=st.lists(_blocks, max_size=5),
    billing=billing_texts(),
    position=st.integers(0, 5),
    others=st.dictionaries(st.text(max_size=10).filter(lambda k: k != "system"), _json_values, max_size=5),
    ensure_ascii=st.booleans(),
    indent=st.sampled_from([None, 1, 2]),
)
def test_only_the_billing_block_is_removed(blocks, billing, position, others, ensure_ascii, indent) -> None:
    position = min(position, len(blocks))
    system = [*blocks[:position], {"type": "text", "text": billing}, *blocks[position:]]
    body = {**others, "system": system, **{f"z{k}": v for k, v in others.items()}}
    raw = json.dumps(body, ensure_ascii=ensure_ascii, indent=indent).encode()

    result = payload.strip_volatile(raw)

    assert [d.where for d in result.dropped] == [f"system[{position}]"]
    assert json.loads(result.body) == {**body, "system": blocks}
    # Every byte outside the system array is the client's own.
    span = jsonedit.top_level_members(raw.decode())["system"]
    assert result.body.startswith(raw[: len(raw.decode()[: span.start].encode())])
    assert result.body.endswith(raw.decode()[span.end :].encode())
    # Deterministic and idempotent.
    assert payload.strip_volatile(raw).body == result.body
    assert payload.strip_volatile(result.body).body == result.body


@settings(max_examples=200, deadline=None)
@given(
    lines=st.lists(
        st.text(alphabet=st.characters(codec="utf-8", exclude_characters="\n\r"), max_size=40).filter(
            lambda t: payload.parse_billing_header(t) is None
        ),
        max_size=5,
    ),
    billing=billing_texts(),
    position=st.integers(0, 5),
    ensure_ascii=st.booleans(),
)
def test_string_system_loses_only_the_billing_line(lines, billing, position, ensure_ascii) -> None:
    position = min(position, len(lines))
    system = "\n".join([*lines[:position], billing, *lines[position:]])
    raw = json.dumps({"model": "m", "system": system}, ensure_ascii=ensure_ascii).encode()
    result = payload.strip_volatile(raw)
    assert json.loads(result.body) == {"model": "m", "system": "\n".join(lines)}
    assert payload.strip_volatile(result.body).body == result.body
