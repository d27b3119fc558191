"""A readable outline of one request (mitmweb's content view): system blocks, tools, messages,
and what the stability diff found."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

from ccwarm import payload
from ccwarm.stability.render import (
    as_list,
    message_blocks,
    render_block,
    render_message,
    render_tool,
    short_hash,
    system_blocks,
    tool_name,
)


def _size(n: int) -> str:
    return f"{n} B" if n < 10_000 else f"{n / 1000:.1f} KB"


def _oneline(text: str, limit: int = 70) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _original_system(
    system: Any, dropped: Sequence[Mapping[str, Any]]
) -> list[tuple[int, Any, Mapping[str, Any] | None]]:
    """System blocks in the client's indexing: the forwarded blocks with normalize's drops put back."""
    blocks = system_blocks(system)
    by_index: dict[int, Mapping[str, Any]] = {}
    for d in dropped or ():
        m = re.fullmatch(r"system\[(\d+)\]", str(d.get("where", "")))
        if m:
            by_index[int(m.group(1))] = d
    out: list[tuple[int, Any, Mapping[str, Any] | None]] = []
    forwarded = iter(blocks)
    index = 0
    total = len(blocks) + len(by_index)
    while index < total:
        if index in by_index:
            d = by_index[index]
            out.append((index, {"type": "text", "text": d.get("text", "")}, d))
        else:
            try:
                out.append((index, next(forwarded), None))
            except StopIteration:
                break
        index += 1
    return out


def _change_lines(change: Mapping[str, Any], indent: str = "  ") -> list[str]:
    lines = [
        f"{indent}{change['path']}"
        + (f" @{change['offset']}" if change.get("offset") is not None else "")
        + (f" ({change['prefix_chars']} chars before it unchanged)" if change.get("prefix_chars") is not None else "")
        + f": {change['reason']}"
    ]
    ex = change.get("excerpt")
    if ex:
        before = " ".join(ex.get("before", "").split())[-40:]
        lines.append(f"{indent}  - …{before}[{_oneline(ex.get('old', ''), 80)}]{_oneline(ex.get('after', ''), 30)}")
        lines.append(f"{indent}  + …{before}[{_oneline(ex.get('new', ''), 80)}]{_oneline(ex.get('after', ''), 30)}")
    return lines


def describe_request(
    body: Mapping[str, Any],
    *,
    headers: Mapping[str, str] | None = None,
    size: int | None = None,
    dropped: Sequence[Mapping[str, Any]] = (),
    result: Mapping[str, Any] | None = None,
) -> str:
    """Plain-text outline of a /v1/messages body: system blocks, tools, messages, and the stability result."""
    ident = payload.identify(body, headers, dropped=dropped)
    lines: list[str] = []
    head = [f"model {body.get('model')}"]
    if body.get("stream"):
        head.append("stream")
    if "max_tokens" in body:
        head.append(f"max_tokens {body.get('max_tokens')}")
    if size is not None:
        head.append(_size(size))
    lines.append("Claude Code request: " + ", ".join(head))
    key = (result or {}).get("conversation") or ident.conversation_key
    index = f", request {result['index']} of it" if result and result.get("index") else ""
    lines.append(f"conversation {key} ({ident.kind}{index})")
    lines.append("")

    system = body.get("system")
    entries = _original_system(system, dropped)
    n_dropped = sum(1 for _, _, d in entries if d is not None)
    form = "a string" if isinstance(system, str) else f"{len(entries)} blocks"
    extra = f", {n_dropped} dropped by normalize, {len(entries) - n_dropped} forwarded" if n_dropped else ""
    lines.append(f"system: {form}{extra}")
    forwarded_index = 0
    for index_, block, d in entries:
        text = render_block(block)
        flags = []
        if d is not None:
            flags.append(f"DROPPED by normalize ({d.get('reason', '')})")
        else:
            if isinstance(block, dict) and block.get("cache_control"):
                flags.append("cache_control")
            if forwarded_index != index_:
                flags.append(f"forwarded as system[{forwarded_index}]")
            forwarded_index += 1
        if payload.parse_billing_header(text) and d is None:
            flags.append("billing block")
        lines.append(
            f"  [{index_}] {len(text):>7} chars  {short_hash(text)}  {_oneline(text, 50)!r}"
            + (f"  <- {'; '.join(flags)}" if flags else "")
        )
    for d in dropped or ():
        if not str(d.get("where", "")).startswith("system["):
            lines.append(f"  {d.get('where')}: DROPPED by normalize ({d.get('reason', '')})")
    tools = as_list(body.get("tools"))
    if tools:
        tools_json = sum(len(render_tool(t)) for t in tools)
        names = [tool_name(t) for t in tools]
        lines.append(
            f"tools: {len(tools)} tools, {_size(tools_json)} JSON, hash "
            f"{short_hash(''.join(render_tool(t) for t in tools))}"
        )
        lines.append("  " + ", ".join(names[:40]) + (f", … ({len(names) - 40} more)" if len(names) > 40 else ""))
    else:
        lines.append("tools: none (a side request)")
    messages = as_list(body.get("messages"))
    roles = Counter(str(m.get("role")) if isinstance(m, dict) else "?" for m in messages)
    kinds = Counter(
        str(b.get("type", "?")) if isinstance(b, dict) else "string" for m in messages for b in message_blocks(m)
    )
    lines.append(
        f"messages: {len(messages)} ({', '.join(f'{r} {n}' for r, n in roles.items())}); blocks: "
        + ", ".join(f"{k} {n}" for k, n in kinds.most_common())
    )
    if len(messages) <= 60:
        shown: list[tuple[int | None, Any]] = list(enumerate(messages))
    else:
        shown = [
            *enumerate(messages[:10]),
            (None, None),
            *((len(messages) - 40 + i, m) for i, m in enumerate(messages[-40:])),
        ]
    for real, m in shown:
        if real is None:
            lines.append(f"  … {len(messages) - 50} messages not shown …")
            continue
        rendered = render_message(m)[1]
        types = [str(b.get("type", "?")) if isinstance(b, dict) else "string" for b in message_blocks(m)]
        cc = (
            " cache_control"
            if isinstance(m, dict)
            and isinstance(m.get("content"), list)
            and any(isinstance(b, dict) and b.get("cache_control") for b in m["content"])
            else ""
        )
        lines.append(
            f"  [{real}] {str(m.get('role') if isinstance(m, dict) else '?'):<9} {', '.join(types)} "
            f"({sum(len(t) for t in rendered)} chars){cc}"
        )
    lines.append("")

    if result is None:
        lines.append("diff to the previous request: not available (not diffed yet, or not a /v1/messages request)")
        return "\n".join(lines) + "\n"
    if result.get("first") or not result.get("compared_to"):
        lines.append("diff: first request of this conversation seen by the proxy")
    else:
        lines.append(
            f"diff to the previous request of this conversation (flow {result.get('compared_to')}): "
            f"{result.get('summary', '')}"
        )
    breaks = result.get("prefix_breaks") or []
    if breaks:
        lines.append(f"PREFIX BREAKS ({len(breaks)}):")
        for c in breaks:
            lines += _change_lines(c)
    growth = result.get("growth") or []
    if growth:
        lines.append(f"appended ({len(growth)}): " + "; ".join(f"{c['path']} {c['reason']}" for c in growth[:12]))
    notes = result.get("json_only") or []
    if notes:
        lines.append(f"JSON-only, not rendered ({len(notes)}):")
        lines += [f"  {c['path']}: {c['reason']}" for c in notes[:20]]
    if result.get("normalize_dropped"):
        lines.append(
            "normalize dropped before forwarding: "
            + "; ".join(f"{d.get('where')} ({d.get('reason')})" for d in result["normalize_dropped"])
        )
    return "\n".join(lines) + "\n"
