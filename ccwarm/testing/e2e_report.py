"""The end-to-end run's results as text: one table row per request (kind, tokens restored and
prefilled against the ideal, TTFT, whether the billing block was forwarded, the reply and the
stability verdict), the totals, the normalize on/off comparison and the interactive run's steps.
Read from the JSON-ready dicts the runs return, so a saved result prints the same. Used by
scripts/e2e_claude_code.py.
"""

from __future__ import annotations

from typing import Any


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3f}"
    return str(v)


def table(run: dict[str, Any]) -> str:
    """One run's requests and totals as an aligned text table, cross-session diffs below it."""
    head = [
        "#",
        "sess",
        "kind",
        "prompt",
        "restored",
        "prefilled",
        "ideal",
        "sys+tools",
        "ttft s",
        "billing fwd",
        "reply",
        "stability",
    ]
    rows = []
    for r in run["requests"]:
        reply = (r["reply"] or "").replace("\n", " ")
        if r["tool_calls"]:
            reply = "tool_use " + ",".join(r["tool_calls"])
        verdict = r["verdict"]
        if r.get("cross_session"):
            verdict += f" (new session: see #{r['n']} below)"
        rows.append(
            [
                r["n"],
                r["session"],
                r["kind"],
                r["prompt"],
                r["restored"],
                r["prefilled"],
                r["ideal_prefilled"],
                r["system_tools"],
                r["ttft_s"],
                "yes" if r["billing_forwarded"] else "no",
                reply[:28],
                verdict[:90],
            ]
        )
    t = run["totals"]
    rows.append(
        [
            "",
            "",
            "total",
            t["prompt"],
            t["restored"],
            t["prefilled"],
            t.get("ideal_prefilled"),
            "",
            t["ttft_s"],
            "",
            "",
            "",
        ]
    )
    cells = [[_fmt(c) for c in row] for row in [head, *rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(head))]
    left = (1, 2, 9, 10, 11)
    lines = [
        "  ".join(
            c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))
        ).rstrip()
        for row in cells
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines += [f"#{r['n']} {r['cross_session']}" for r in run["requests"] if r.get("cross_session")]
    return "\n".join(lines)


def report(result: dict[str, Any]) -> str:
    """The whole result: a table per run, rejections and failures, the comparison, the UI run."""
    out = []
    for name, run in result.get("runs", {}).items():
        out.append(
            f"\n== {name} (stability addon: {'yes' if run['stability_addon'] else 'no'}; wall {run['wall_s']}s) =="
        )
        out.append(table(run))
        if run["server_rejections"]:
            out.append(
                "server rejected: "
                + "; ".join(f"{r['status']} {r['path']}: {r['message']}" for r in run["server_rejections"])
            )
        if run["failure"]:
            out.append("FAILED: " + run["failure"])
    if "comparison" in result:
        c = result["comparison"]
        out.append(
            f"\nprefilled tokens: normalize on {c['prefilled_on']} (ideal {c['ideal_on']}), "
            f"normalize off {c['prefilled_off']} (ideal {c['ideal_off']}); "
            f"summed TTFT {c['ttft_on_s']}s on vs {c['ttft_off_s']}s off"
        )
    if "interactive" in result:
        ui = result["interactive"]
        out.append(f"\n== interactive (tmux; wall {ui['wall_s']}s) ==")
        out.append(table(ui | {"stability_addon": True}))
        out.append("steps: " + "; ".join(f"{s['prompt']!r} -> {s['expect']} in {s['seconds']}s" for s in ui["steps"]))
        out.append("dialogs answered: " + ", ".join(ui["dialogs_answered"]))
        if ui["failure"]:
            out.append("FAILED: " + ui["failure"])
        elif ui["screens"]:
            out.append("last screen:\n" + "\n".join(line for line in ui["screens"][-2].splitlines() if line.strip()))
    return "\n".join(out)
