"""What an end-to-end run did, read back from its records: the server's per-request figures
(`/v1/cache/requests`), mitmdump's flow file (bodies, replies, rejections, the stability addon's
verdicts) and the ideal prefill (each forwarded body rendered with the server's own renderer).
Used by scripts/e2e_claude_code.py.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from cache_backend.token_prefix import common_prefix_len
from ccwarm import flowmeta, payload

BILLING = payload.BILLING_HEADER_NAME


@dataclass
class Stack:
    proxy_port: int
    server_url: str
    server_log: Path
    mitm_log: Path
    flows: Path
    normalize: bool
    stability: bool
    figures: dict[str, dict[str, Any]] = field(default_factory=dict)  # request id -> server figures


def request_figures(server_url: str) -> dict[str, dict[str, Any]]:
    """The server's per-request figures (GET /v1/cache/requests), keyed by request id."""
    data = httpx.get(f"{server_url}/v1/cache/requests", params={"limit": 512}, timeout=30).json()["data"]
    return {r["request_id"]: r for r in data}


def rejections(flows: list[Any]) -> list[dict[str, Any]]:
    """Every 4xx/5xx answer in the flow file, with the error JSON's type and message."""
    out = []
    for fl in flows:
        resp = fl.response
        if resp is None or resp.status_code < 400:
            continue
        try:
            err = json.loads(resp.content or b"{}").get("error") or {}
        except ValueError:
            err = {}
        out.append(
            {
                "status": resp.status_code,
                "path": fl.request.path,
                "type": err.get("type"),
                "message": err.get("message"),
            }
        )
    return out


def parse_sse(raw: bytes) -> dict[str, Any]:
    """Text, tool calls, stop reason and usage of a streamed reply."""
    text, tools, stop, usage = [], [], None, {}
    for line in raw.decode("utf-8", "replace").splitlines():
        if not line.startswith("data:"):
            continue
        try:
            ev = json.loads(line[5:])
        except ValueError:
            continue
        t = ev.get("type")
        if t == "message_start":
            usage = dict(ev.get("message", {}).get("usage") or {})
        elif t == "content_block_start" and ev.get("content_block", {}).get("type") == "tool_use":
            tools.append(ev["content_block"].get("name"))
        elif t == "content_block_delta" and ev.get("delta", {}).get("type") == "text_delta":
            text.append(ev["delta"].get("text", ""))
        elif t == "message_delta":
            stop = ev.get("delta", {}).get("stop_reason")
            usage.update({k: v for k, v in (ev.get("usage") or {}).items() if v is not None})
    return {"text": "".join(text), "tool_calls": tools, "stop_reason": stop, "usage": usage}


def parse_json_reply(raw: bytes) -> dict[str, Any]:
    """Text, tool calls, stop reason and usage of a non-streamed reply (or an error)."""
    try:
        msg = json.loads(raw)
    except ValueError:
        return {}
    blocks = msg.get("content") or [] if isinstance(msg, dict) else []
    return {
        "text": "".join(b.get("text", "") for b in blocks if b.get("type") == "text"),
        "tool_calls": [b.get("name") for b in blocks if b.get("type") == "tool_use"],
        "stop_reason": msg.get("stop_reason") if isinstance(msg, dict) else None,
        "usage": msg.get("usage") or {} if isinstance(msg, dict) else {},
    }


def read_flows(path: Path) -> list[Any]:
    from mitmproxy import io as mio

    if not path.exists():
        return []
    with open(path, "rb") as f:
        flows = [fl for fl in mio.FlowReader(f).stream() if getattr(fl, "request", None) is not None]
    return sorted(flows, key=lambda fl: fl.request.timestamp_start)


@dataclass
class RequestRecord:
    n: int
    session: str  # A, B, ... in order of first appearance of the session id
    kind: str
    agent_id: str | None
    path: str
    status: int | None
    request_id: str | None
    prompt: int | None = None
    restored: int | None = None
    prefilled: int | None = None
    ttft_s: float | None = None
    output: int | None = None
    ideal_prefilled: int | None = None
    system_tools: int | None = None  # tokens of the rendered system + tools prefix
    rendered: int | None = None  # our rendering's token count (== prompt when it matches the server)
    billing_forwarded: bool = False
    normalize_dropped: list[str] = field(default_factory=list)
    verdict: str = ""
    verdict_source: str = ""
    first_break_block: str | None = None
    cross_session: str | None = None  # first request of a later session vs the previous session
    cross_session_block: str | None = None
    reply: str = ""
    tool_calls: list[str] = field(default_factory=list)
    stop_reason: str | None = None
    usage: dict[str, Any] = field(default_factory=dict)


class PromptRenderer:
    """The server's own rendering (cache_backend.render) of a forwarded body, for token counts."""

    def __init__(self, model_dir: Path) -> None:
        from mlx_lm.utils import load_tokenizer

        from cache_backend.render import Renderer

        config = json.loads((model_dir / "config.json").read_text())
        tok = load_tokenizer(model_dir, {}, eos_token_ids=config.get("eos_token_id"))
        tok.model_max_length = sys.maxsize
        self.renderer = Renderer(tok)

    def render(self, body: dict[str, Any]):
        from cache_backend.validate import parse_messages_request

        return self.renderer.render(parse_messages_request(body))


def ideal_restorable(rendered: list[Any]) -> list[int | None]:
    """Per request: tokens a cache holding every earlier prompt and its reply could restore.

    Longest common token prefix with any earlier prompt; when an earlier prompt is a whole prefix
    of this one, its reply (the assistant message right after it) counts as cached too.
    """
    out: list[int | None] = []
    for i, rp in enumerate(rendered):
        if rp is None:
            out.append(None)
            continue
        best = 0
        for prev in rendered[:i]:
            if prev is None:
                continue
            n = common_prefix_len(np.asarray(rp.tokens), np.asarray(prev.tokens))
            if n == len(prev.tokens) and n < len(rp.tokens):
                after = [e for e in rp.message_ends if e > n]
                n = min(after) if after else n
            best = max(best, n)
        out.append(min(best, len(rp.tokens)))
    return out


def _verdict_of(meta: dict[str, Any]) -> tuple[str, str | None]:
    if meta.get("first"):
        return "first request of its conversation", None
    breaks = meta.get("prefix_breaks") or []
    if breaks:
        b = breaks[0]
        more = f" (+{len(breaks) - 1} more)" if len(breaks) > 1 else ""
        return f"prefix break at {b.get('path')}: {b.get('reason')}{more}", b.get("block")
    return f"stable ({len(meta.get('growth') or [])} appended, {len(meta.get('json_only') or [])} json-only)", None


def _block_of(diff: Any) -> str | None:
    breaks = diff.prefix_breaks
    return breaks[0].block if breaks else None


def analyse(stack: Stack, model_dir: Path | None) -> tuple[list[RequestRecord], list[dict[str, str]]]:
    """Per-request records from the flow file, the server log, and our own rendering and diffs."""
    from ccwarm import stability as stab

    lines = stack.figures
    renderer = None
    if model_dir is not None:
        try:
            renderer = PromptRenderer(model_dir)
        except Exception as e:  # token counts then come from the server only
            print(f"e2e: cannot render prompts offline ({e}); no ideal/system+tools counts", file=sys.stderr)
    tracker = stab.StabilityTracker()
    sessions: dict[str, str] = {}
    records: list[RequestRecord] = []
    rendered: list[Any] = []
    last_main: dict[str, dict[str, Any]] = {}  # session label -> last main body
    flows = read_flows(stack.flows)
    for fl in flows:
        req = fl.request
        if req.method != "POST" or not payload.is_messages_path(req.path):
            continue
        raw = req.raw_content or b""
        try:
            body = json.loads(raw)
        except ValueError:
            body = {}
        headers = {k.lower(): v for k, v in req.headers.items()}
        dropped = flowmeta.dropped(fl.metadata)
        ident = payload.identify(body, headers, dropped=dropped)
        kind = str(ident.kind)
        kind = payload.purpose(body) if payload.purpose(body) in ("classifier", "compaction") else kind
        sid = ident.session_id or "?"
        sessions.setdefault(sid, chr(ord("A") + len(sessions)))
        resp = fl.response
        rid = resp.headers.get("request-id") if resp is not None else None
        rec = RequestRecord(
            n=len(records) + 1,
            session=sessions[sid],
            kind=kind,
            agent_id=ident.agent_id,
            path=req.path,
            status=resp.status_code if resp is not None else None,
            request_id=rid,
            billing_forwarded=BILLING in raw.decode("utf-8", "replace").lower(),
            normalize_dropped=[f"{d.get('where')}: {d.get('reason')}" for d in dropped],
        )
        if resp is not None and resp.content:
            sse = (
                parse_sse(resp.content)
                if "event-stream" in resp.headers.get("content-type", "")
                else parse_json_reply(resp.content)
            )
            rec.reply, rec.tool_calls = sse.get("text", ""), sse.get("tool_calls", [])
            rec.stop_reason, rec.usage = sse.get("stop_reason"), sse.get("usage", {})
        if rid in lines:
            s = lines[rid]
            rec.prompt, rec.restored, rec.prefilled = s["prompt"], s["restored"], s["prefilled"]
            rec.ttft_s, rec.output = s["ttft_s"], s["output"]
        # Stability verdict: the addon's, else our own diff with the same module.
        is_count = "count_tokens" in req.path
        obs = tracker.observe(body, headers, label=str(rec.n)) if body and not is_count else None
        meta = fl.metadata.get(flowmeta.STABILITY_KEY)
        if meta:
            rec.verdict, rec.first_break_block = _verdict_of(meta)
            rec.verdict_source = "stability addon"
        elif obs is not None:
            rec.verdict = obs.summary_line()
            rec.first_break_block = _block_of(obs.diff) if obs.diff else None
            rec.verdict_source = flowmeta.STABILITY_KEY
        if kind == "main" and body and not is_count:
            if rec.session not in last_main:
                earlier = [s for s in last_main if s != rec.session]
                if earlier:
                    diff = stab.compare(last_main[earlier[-1]], body)
                    rec.cross_session = f"vs session {earlier[-1]}: {diff.summary_line()}"
                    rec.cross_session_block = _block_of(diff)
            last_main[rec.session] = body
        rp = ideal_rp = None
        if renderer is not None and body and not is_count:
            try:
                rp = renderer.render(body)
                rec.rendered, rec.system_tools = len(rp.tokens), rp.prefix_end
                # The ideal is taken without the volatile blocks, whether or not normalize ran.
                stripped = payload.strip_volatile(raw)
                ideal_rp = renderer.render(json.loads(stripped.body)) if stripped.changed else rp
            except Exception as e:
                print(f"e2e: request {rec.n}: offline render failed: {e}", file=sys.stderr)
        records.append(rec)
        rendered.append(ideal_rp)
    for rec, rp, best in zip(records, rendered, ideal_restorable(rendered), strict=True):
        if best is not None and rp is not None:
            rec.ideal_prefilled = len(rp.tokens) - best
    return records, rejections(flows)


def totals(records: list[RequestRecord]) -> dict[str, Any]:
    done = [r for r in records if r.prompt is not None]

    def total(attr: str) -> int:
        return sum(getattr(r, attr) or 0 for r in done)

    out = {
        "requests": len(records),
        "served": len(done),
        "prompt": total("prompt"),
        "restored": total("restored"),
        "prefilled": total("prefilled"),
        "ttft_s": round(sum(r.ttft_s or 0 for r in done), 3),
    }
    if done and all(r.ideal_prefilled is not None for r in done):
        out["ideal_prefilled"] = total("ideal_prefilled")
        out["prefilled_over_ideal"] = (
            round(out["prefilled"] / out["ideal_prefilled"], 3) if out["ideal_prefilled"] else None
        )
    out["by_kind"] = {}
    for kind in sorted({r.kind for r in done}):
        ks = [r for r in done if r.kind == kind]
        out["by_kind"][kind] = {
            "requests": len(ks),
            "prompt": sum(r.prompt or 0 for r in ks),
            "prefilled": sum(r.prefilled or 0 for r in ks),
        }
    return out
