"""The tracker's summary as Markdown and JSON files (secrets redacted)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ccwarm.redact import Redactor


def _md(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _n(count: int, word: str) -> str:
    return f"{count} {word}" + ("" if count == 1 else "s")


def summary_markdown(summary: Mapping[str, Any]) -> str:
    t = summary["totals"]
    lines = [
        "# Prompt prefix stability",
        "",
        f"{_n(t['requests'], 'request')} in {_n(t['conversations'], 'conversation')}; "
        f"{t['requests_with_prefix_breaks']} of {t['compared']} compared requests broke the prefix "
        f"({_n(t['prefix_breaks'], 'break')}); {_n(t['json_only'], 'JSON-only change')} noted.",
        "",
    ]
    if summary.get("volatile_blocks"):
        lines += ["## Volatile blocks", "", "| block | prefix breaks | conversations |", "| --- | --- | --- |"]
        lines += [
            f"| `{_md(v['block'])}` | {v['changed']} | {v['conversations']} |" for v in summary["volatile_blocks"]
        ]
        lines.append("")
    lines += ["## Conversations", ""]
    for c in summary["conversations"]:
        n = c["counts"]
        lines += [
            f"### `{_md(c['key'])}` ({c['kind']})",
            "",
            f"{_n(n['requests'], 'request')}, {n['requests_with_prefix_breaks']} with prefix breaks, "
            f"{n['growth']} appended, {_n(n['json_only'], 'JSON-only change')}.",
            "",
        ]
        if c["volatile_blocks"]:
            lines += [
                f"- `{_md(v['block'])}` changed in {v['changed']} of {v['requests']} requests"
                for v in c["volatile_blocks"]
            ]
            lines.append("")
        requests = c.get("requests")
        if requests:
            lines += ["| # | request | result |", "| --- | --- | --- |"]
            for r in requests:
                if r["prefix_breaks"]:
                    text = "; ".join(
                        f"**break** `{_md(b['path'])}` @{b['offset']}: {_md(b['reason'])}" for b in r["prefix_breaks"]
                    )
                else:
                    text = _md(r["summary"])
                lines.append(f"| {r['index']} | {_md(r.get('source') or r.get('label') or '')} | {text} |")
            lines.append("")
        elif c.get("recent_breaks"):
            lines += ["Recent breaks:", ""]
            for rb in c["recent_breaks"]:
                for b in rb["breaks"]:
                    lines.append(
                        f"- request {rb['index']} ({_md(rb.get('label') or '')}): `{_md(b['path'])}` @{b['offset']}: "
                        f"{_md(b['reason'])}"
                    )
            lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def write_summary(summary: Mapping[str, Any], path: str | Path, redactor: Redactor | None = None) -> list[Path]:
    path = Path(path).expanduser()
    if path.suffix.lower() in (".json", ".md"):
        stem = path.with_suffix("")
    else:
        stem = path
    json_path, md_path = stem.with_name(stem.name + ".json"), stem.with_name(stem.name + ".md")
    redactor = redactor or Redactor()
    data = redactor.data(summary)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(redactor.text(json.dumps(data, indent=2, ensure_ascii=False)) + "\n", encoding="utf-8")
    md_path.write_text(redactor.text(summary_markdown(data)), encoding="utf-8")
    return [json_path, md_path]
