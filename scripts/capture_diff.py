#!/usr/bin/env python3
"""Offline prefix-stability report for captured Claude Code traffic.

Input: a flow file written by `mitmdump -w FILE` (or mitmweb's "save"), or a folder of JSON
request bodies (`*.json`, read in name order; a file may also hold `{"headers": {...}, "body":
{...}}`). Only `POST /v1/messages` requests are diffed (not `count_tokens`). Requests are
grouped by conversation (session id + agent id; side requests apart, see
`ccwarm.payload.identify`) and each is compared with the previous request of its conversation
by `ccwarm.stability` (tools, system, messages in rendering order).

    python scripts/capture_diff.py capture.flows                 # Markdown report on stdout
    python scripts/capture_diff.py capture.flows --json          # machine-readable, schema below
    python scripts/capture_diff.py capture.flows --html out.html # side-by-side changed spans
    python scripts/capture_diff.py bodies/ --normalize           # as forwarded by addons/normalize.py
    python scripts/capture_diff.py capture.flows --fail-on-break # exit 3 when the prefix broke

`--normalize` applies `payload.strip_volatile` (what addons/normalize.py does) to every body
before diffing: a normal session then shows zero prefix breaks. Secrets (`x-api-key`,
`authorization`, cookies, and any value seen in those headers, plus `sk-ant-...` keys and bearer
tokens found in text) are replaced by `[REDACTED]` in every output.

Exit status: 0 on success; 2 when the input is broken or truncated (the report covers what could
be read and a message on stderr says where reading stopped); 1 when there is nothing to read;
3 with `--fail-on-break` when at least one prefix break was found.

JSON schema (`--json`), `schema_version` 1. Fields are only ever added within one version.

    {
      "schema_version": 1,
      "tool": "ccwarm capture_diff",
      "input": {"path": str, "format": "flows" | "json-folder", "requests_read": int,
                "complete": bool, "error": str | null,
                "skipped": [{"source": str, "reason": str}]},
      "normalize": bool,
      "totals": {"conversations": int, "requests": int, "compared": int,
                 "requests_with_prefix_breaks": int, "prefix_breaks": int, "json_only": int},
      "volatile_blocks": [{"block": str, "changed": int, "conversations": int}],  # most volatile first
      "conversations": [{
        "key": str, "session_id": str | null, "agent_id": str | null,
        "kind": "main" | "subagent" | "side",
        "counts": {"requests": int, "compared": int, "requests_with_prefix_breaks": int,
                   "prefix_breaks": int, "growth": int, "json_only": int},
        "volatile_blocks": [{"block": str, "changed": int, "requests": int, "text": str}],
        "json_only_blocks": [{"block": str, "changed": int}],
        "requests": [{
          "index": int,                  # 1-based, within the conversation
          "source": str,                 # "flow <id>" or the file name
          "flow_id": str | null, "timestamp": float | null, "size": int,
          "headers": {str: str},         # secrets redacted
          "compared_to": str | null,     # source of the previous request of the conversation
          "first": bool,
          "normalize_dropped": [{"where": str, "reason": str}],   # optional: --normalize, or dropped live
          "summary": str,
          "prefix_breaks": [Change], "growth": [Change], "json_only": [Change]
        }]
      }]
    }

    Change = {"kind": "prefix_break" | "growth" | "json_only",
              "path": str,            # JSON path of the first difference, e.g. "messages[0].content[0].text"
              "block": str,           # the rendered block, e.g. "system[0]", "tools", "messages[3]"
              "reason": str,
              "offset": int | null,   # first differing character in the block's rendered text
              "prefix_chars": int | null,  # rendered characters of the request before the difference
              "fields": {name: [old, new]},  # optional: billing header fields that changed
              "excerpt": {"before": str, "old": str, "new": str, "after": str},  # optional
              "details": [str]}       # optional: deepdiff findings
"""

from __future__ import annotations

import argparse
import html
import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ccwarm import flowmeta, payload, stability

TOOL = "ccwarm capture_diff"


@dataclass
class Captured:
    source: str
    raw: bytes
    headers: dict[str, str]
    flow_id: str | None = None
    timestamp: float | None = None
    dropped: list[dict[str, Any]] = field(default_factory=list)  # what addons/normalize.py removed live


@dataclass
class ReadState:
    path: str
    format: str
    skipped: list[dict[str, str]] = field(default_factory=list)
    error: str | None = None
    read: int = 0


def _is_diffed(method: str, path: str) -> bool:
    return (
        method == "POST"
        and payload.is_messages_path(path)
        and not path.split("?", 1)[0].rstrip("/").endswith("/count_tokens")
    )


def read_flows(path: Path, state: ReadState) -> Iterator[Captured]:
    from mitmproxy import exceptions, http, io

    with path.open("rb") as fo:
        reader = io.FlowReader(fo)
        n = 0
        try:
            for f in reader.stream():
                n += 1
                if not isinstance(f, http.HTTPFlow):
                    continue
                req = f.request
                if not _is_diffed(req.method, req.path):
                    continue
                try:
                    raw = req.get_content(strict=True) or b""
                except ValueError as e:
                    state.skipped.append({"source": f"flow {f.id}", "reason": f"cannot decode body: {e}"})
                    continue
                dropped = flowmeta.dropped(f.metadata)
                yield Captured(f"flow {f.id}", raw, dict(req.headers.items()), f.id, req.timestamp_start, list(dropped))
        except exceptions.FlowReadException as e:
            state.error = f"{path}: flow file is broken or truncated after {n} flow(s): {e}"
        except Exception as e:  # tnetstring raises assorted errors on damaged input
            state.error = f"{path}: flow file is broken or truncated after {n} flow(s): {type(e).__name__}: {e}"


def read_folder(path: Path, state: ReadState) -> Iterator[Captured]:
    for file in sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() == ".json"):
        raw = file.read_bytes()
        headers: dict[str, str] = {}
        try:
            doc = json.loads(raw)
        except ValueError as e:
            state.skipped.append({"source": file.name, "reason": f"not JSON: {e}"})
            continue
        if isinstance(doc, dict) and "messages" not in doc and isinstance(doc.get("body"), dict):
            headers = {str(k): str(v) for k, v in (doc.get("headers") or {}).items()}
            raw = json.dumps(doc["body"], ensure_ascii=False).encode()
        yield Captured(file.name, raw, headers)


def analyse(
    items: Iterator[Captured], state: ReadState, *, normalize: bool, redactor: stability.Redactor
) -> stability.StabilityTracker:
    tracker = stability.StabilityTracker(max_conversations=1 << 20, keep_history=True)
    for item in items:
        headers = redactor.headers(item.headers)
        raw = item.raw
        dropped: list[dict[str, Any]] = list(item.dropped)
        if normalize:
            try:
                stripped = payload.strip_volatile(raw)
            except payload.PayloadError as e:
                state.skipped.append({"source": item.source, "reason": str(e)})
                continue
            raw = stripped.body
            dropped += [{"where": d.where, "reason": d.reason, "text": d.text} for d in stripped.dropped]
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            state.skipped.append({"source": item.source, "reason": f"body is not JSON: {e}"})
            continue
        if not isinstance(body, dict):
            state.skipped.append(
                {"source": item.source, "reason": f"body is a JSON {type(body).__name__}, not an object"}
            )
            continue
        extra: dict[str, Any] = {
            "source": item.source,
            "flow_id": item.flow_id,
            "timestamp": item.timestamp,
            "headers": headers,
        }
        if dropped:
            extra["normalize_dropped"] = [{"where": d.get("where"), "reason": d.get("reason")} for d in dropped]
        tracker.observe(body, item.headers, label=item.source, size=len(raw), extra=extra, dropped=dropped)
        state.read += 1
    return tracker


def build_report(
    tracker: stability.StabilityTracker, state: ReadState, *, normalize: bool, redactor: stability.Redactor
) -> dict[str, Any]:
    summary = tracker.summary()
    report = {
        "schema_version": stability.SCHEMA_VERSION,
        "tool": TOOL,
        "input": {
            "path": state.path,
            "format": state.format,
            "requests_read": state.read,
            "complete": state.error is None,
            "error": state.error,
            "skipped": state.skipped,
        },
        "normalize": normalize,
        "totals": summary["totals"],
        "volatile_blocks": summary["volatile_blocks"],
        "conversations": summary["conversations"],
    }
    for conv in report["conversations"]:
        for req in conv.get("requests", []):
            req.pop("label", None)
    return redactor.data(report)


# --- HTML -------------------------------------------------------------------------------------

_CSS = """
body{font:14px/1.45 system-ui,sans-serif;margin:2em;color:#222}
h1{font-size:1.5em} h2{font-size:1.2em;margin-top:2em;border-bottom:1px solid #ccc}
table{border-collapse:collapse;margin:.5em 0}
td,th{border:1px solid #ddd;padding:3px 8px;text-align:left;vertical-align:top}
.break{background:#fff4f4} .ok{color:#2a7a2a} .bad{color:#b00020;font-weight:600}
.pair{display:grid;grid-template-columns:1fr 1fr;gap:8px;margin:.3em 0 1em}
.pair pre{white-space:pre-wrap;word-break:break-all;background:#f7f7f7;padding:6px;margin:0;
  font:12px/1.4 ui-monospace,monospace}
del{background:#ffd6d6;text-decoration:none} ins{background:#c9f2c9;text-decoration:none}
code{background:#f0f0f0;padding:0 3px} .muted{color:#777}
"""


def _plural(count: int, word: str) -> str:
    return f"{count} {word}" + ("" if count == 1 else "s")


def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def render_html(report: dict[str, Any]) -> str:
    t = report["totals"]
    inp = report["input"]
    out = [
        "<!doctype html>",
        '<html lang="en"><head><meta charset="utf-8">',
        "<title>Prefix stability: " + _e(inp["path"]) + "</title>",
        f"<style>{_CSS}</style></head><body>",
        f"<h1>Prompt prefix stability: <code>{_e(inp['path'])}</code></h1>",
        f"<p>{_plural(t['requests'], 'request')} in {_plural(t['conversations'], 'conversation')}; "
        f"<span class='{'bad' if t['requests_with_prefix_breaks'] else 'ok'}'>{t['requests_with_prefix_breaks']} of "
        f"{t['compared']} "
        f"compared requests broke the prefix</span> ({_plural(t['prefix_breaks'], 'break')}); "
        f"{_plural(t['json_only'], 'JSON-only change')}."
        + (" Bodies normalized (<code>strip_volatile</code>) before diffing." if report["normalize"] else "")
        + "</p>",
    ]
    if inp.get("error"):
        out.append(f"<p class='bad'>Input incomplete: {_e(inp['error'])}</p>")
    for s in inp.get("skipped") or []:
        out.append(f"<p class='muted'>skipped {_e(s['source'])}: {_e(s['reason'])}</p>")
    if report["volatile_blocks"]:
        out.append("<h2>Volatile blocks</h2><table><tr><th>block</th><th>prefix breaks</th><th>conversations</th></tr>")
        for v in report["volatile_blocks"]:
            out.append(
                f"<tr><td><code>{_e(v['block'])}</code></td><td>{v['changed']}</td><td>{v['conversations']}</td></tr>"
            )
        out.append("</table>")
    for conv in report["conversations"]:
        n = conv["counts"]
        out.append(f"<h2>{_e(conv['kind'])}: <code>{_e(conv['key'])}</code></h2>")
        out.append(
            f"<p>{_plural(n['requests'], 'request')}, {n['requests_with_prefix_breaks']} with prefix breaks, "
            f"{n['growth']} appended, {_plural(n['json_only'], 'JSON-only change')}.</p>"
        )
        if conv["volatile_blocks"]:
            out.append(
                "<ul>"
                + "".join(
                    f"<li><code>{_e(v['block'])}</code> changed in {v['changed']} of {v['requests']} requests</li>"
                    for v in conv["volatile_blocks"]
                )
                + "</ul>"
            )
        out.append("<table><tr><th>#</th><th>request</th><th>result</th></tr>")
        for req in conv.get("requests", []):
            cls = " class='break'" if req["prefix_breaks"] else ""
            summary = "" if req["prefix_breaks"] else _e(req["summary"])
            out.append(f"<tr{cls}><td>{req['index']}</td><td>{_e(req.get('source'))}</td><td>{summary}")
            for c in req["prefix_breaks"]:
                out.append(_change_html(c))
            if req["json_only"]:
                out.append(
                    "<div class='muted'>JSON-only: "
                    + "; ".join(f"<code>{_e(c['path'])}</code> {_e(c['reason'])}" for c in req["json_only"])
                    + "</div>"
                )
            out.append("</td></tr>")
        out.append("</table>")
    out.append("</body></html>")
    return "\n".join(out) + "\n"


def _change_html(c: dict[str, Any]) -> str:
    head = (
        f"<div><span class='bad'>prefix break</span> at <code>{_e(c['path'])}</code> offset {_e(c.get('offset'))}"
        f" ({_e(c.get('prefix_chars'))} chars before it unchanged): {_e(c['reason'])}</div>"
    )
    ex = c.get("excerpt")
    if not ex:
        return head
    before, after = _e(ex.get("before")), _e(ex.get("after"))
    left = f"<pre>…{before}<del>{_e(ex.get('old'))}</del>{after}…</pre>"
    right = f"<pre>…{before}<ins>{_e(ex.get('new'))}</ins>{after}…</pre>"
    return head + f"<div class='pair'>{left}{right}</div>"


# --- main -------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Find what breaks the prompt prefix in captured Claude Code requests.")
    ap.add_argument("input", type=Path, help="flow file from `mitmdump -w`, or a folder of JSON request bodies")
    ap.add_argument("--json", action="store_true", help="print the report as JSON (schema in this script's docstring)")
    ap.add_argument(
        "--html",
        type=Path,
        metavar="FILE",
        help="also write a self-contained HTML page with the changed spans side by side",
    )
    ap.add_argument(
        "--normalize",
        action="store_true",
        help="apply payload.strip_volatile (as addons/normalize.py does) before diffing",
    )
    ap.add_argument("--fail-on-break", action="store_true", help="exit 3 when a prefix break was found")
    args = ap.parse_args(argv)

    if not args.input.exists():
        print(f"capture_diff: {args.input}: no such file or folder", file=sys.stderr)
        return 1
    redactor = stability.Redactor()
    if args.input.is_dir():
        state = ReadState(str(args.input), "json-folder")
        items = read_folder(args.input, state)
    else:
        state = ReadState(str(args.input), "flows")
        items = read_flows(args.input, state)
    tracker = analyse(items, state, normalize=args.normalize, redactor=redactor)
    report = build_report(tracker, state, normalize=args.normalize, redactor=redactor)

    if args.json:
        sys.stdout.write(redactor.text(json.dumps(report, indent=2, ensure_ascii=False)) + "\n")
    else:
        text = stability.summary_markdown(report)
        if state.error:
            text += f"\n**Input incomplete:** {state.error}\n"
        sys.stdout.write(redactor.text(text))
    if args.html:
        args.html.parent.mkdir(parents=True, exist_ok=True)
        args.html.write_text(redactor.text(render_html(report)), encoding="utf-8")

    if state.error:
        print(
            f"capture_diff: {state.error}; the report covers the {state.read} request(s) read before that",
            file=sys.stderr,
        )
        return 2
    if state.read == 0 and not state.skipped:
        print(f"capture_diff: {args.input}: no /v1/messages requests found", file=sys.stderr)
        return 1
    if args.fail_on_break and report["totals"]["prefix_breaks"]:
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
