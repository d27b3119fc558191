"""The headless end-to-end runs: `claude -p` sessions A and B through a fresh chain with normalize
on and then off, session C (a turn over the server's context limit, which makes the CLI compact),
and the comparison of the two modes. Each run starts its chain, drives the turns, stops the chain
and reads back what went through. Used by scripts/e2e_claude_code.py.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from tqdm import tqdm

from ccwarm import payload
from ccwarm.claude_cli import cli_version
from ccwarm.testing.claude_runs import CLI_MODEL, CliRun, E2EError, cli_env, run_claude
from ccwarm.testing.e2e_chain import MAX_CONTEXT, chain
from ccwarm.testing.e2e_records import PromptRenderer, analyse, totals
from ccwarm.testing.e2e_script import (
    SESSION_A,
    SESSION_B,
    ToolNames,
    Turn,
    compaction_turns,
    forced_replies,
    make_workspace,
    probe_tools,
)


def run_sessions(
    cli: Path,
    model_dir: Path,
    root: Path,
    tools: ToolNames,
    *,
    normalize: bool,
    turns: tuple[Turn, ...] = SESSION_A + SESSION_B,
    cache_args: tuple[str, ...] = (),
    max_context: int = MAX_CONTEXT,
) -> dict[str, Any]:
    """Start the chain, drive the turns, stop the chain, analyse what went through."""
    root.mkdir(parents=True, exist_ok=True)
    home, work = make_workspace(root)
    script = root / "forced_replies.json"
    script.write_text(json.dumps(forced_replies(work, tools), indent=1))
    runs: list[CliRun] = []
    t0 = time.monotonic()
    failure = None
    with chain(root, model_dir, script, normalize=normalize, cache_args=cache_args, max_context=max_context) as stack:
        env = cli_env(home, stack.proxy_port)
        for turn in tqdm(turns, desc=f"claude -p, normalize {'on' if normalize else 'off'}", unit="turn", leave=False):
            try:
                run = run_claude(cli, env, work, turn.prompt, cont=turn.cont, label=turn.label)
            except E2EError as e:
                failure = str(e)
                break
            runs.append(run)
            if run.returncode != 0 or turn.expect not in run.stdout:
                failure = (
                    f"{turn.label}: claude rc={run.returncode}, expected {turn.expect!r} on stdout\n"
                    f"stdout: {run.stdout[-1500:]}\nstderr: {run.stderr[-1500:]}"
                )
                break
    wall = time.monotonic() - t0
    records, rejected = analyse(stack, model_dir)
    return {
        "normalize": normalize,
        "stability_addon": stack.stability,
        "turns": [
            {
                "label": r.label,
                "argv": r.argv,
                "rc": r.returncode,
                "seconds": r.seconds,
                "stdout": r.stdout.strip()[-500:],
                "stderr": r.stderr.strip()[-500:],
            }
            for r in runs
        ],
        "requests": [asdict(r) for r in records],
        "totals": totals(records),
        "server_rejections": rejected,
        "failure": failure,
        "wall_s": round(wall, 2),
        "root": str(root),
        "logs": {"server": str(stack.server_log), "mitmdump": str(stack.mitm_log), "flows": str(stack.flows)},
    }


# Session C's sizes in tokens: the compaction request (history + ~1.6k tokens of summary
# instructions) and the turn resent after it must fit; the turn before compacting must not.
COMPACT_FIRST, COMPACT_SECOND, COMPACT_ROOM = 1500, 2500, 3500


def run_compaction(
    cli: Path, model_dir: Path, root: Path, tools: ToolNames, first_request: dict[str, Any]
) -> dict[str, Any]:
    """Session C against a server whose context limit the second turn exceeds: the server answers
    `prompt is too long: N tokens > M maximum`, the CLI compacts and resends the turn."""
    renderer = PromptRenderer(model_dir)
    base = len(renderer.render(json.loads(payload.strip_volatile(json.dumps(first_request).encode()).body)).tokens)
    turns = compaction_turns(renderer.renderer.encode, COMPACT_FIRST, COMPACT_SECOND)
    run = run_sessions(cli, model_dir, root, tools, normalize=True, turns=turns, max_context=base + COMPACT_ROOM)
    run["max_context"] = base + COMPACT_ROOM
    return run


def run_comparison(
    cli: Path,
    model_dir: Path,
    root: Path,
    *,
    modes: tuple[bool, ...] = (True, False),
    probed: tuple[ToolNames, dict[str, Any]] | None = None,
    max_context: int = MAX_CONTEXT,
    compaction: bool = True,
) -> dict[str, Any]:
    """Probe the tool list once (unless given), then the same sessions with normalize on and off,
    then session C (the CLI compacting on a prompt over the server's limit)."""
    tools, probe = probed or probe_tools(cli, root / "probe")
    result: dict[str, Any] = {
        "cli_version": cli_version(cli),
        "cli_model": CLI_MODEL,
        "model": str(model_dir),
        "probe": {k: v for k, v in probe.items() if k != "first_request"},
        "runs": {},
    }
    for normalize in modes:
        name = "normalize_on" if normalize else "normalize_off"
        result["runs"][name] = run_sessions(
            cli, model_dir, root / name, tools, normalize=normalize, max_context=max_context
        )
    if compaction:
        result["runs"]["compaction"] = run_compaction(
            cli, model_dir, root / "compaction", tools, probe["first_request"]
        )
    on, off = result["runs"].get("normalize_on"), result["runs"].get("normalize_off")
    if on and off:
        result["comparison"] = {
            "prefilled_on": on["totals"]["prefilled"],
            "prefilled_off": off["totals"]["prefilled"],
            "ideal_on": on["totals"].get("ideal_prefilled"),
            "ideal_off": off["totals"].get("ideal_prefilled"),
            "ttft_on_s": on["totals"]["ttft_s"],
            "ttft_off_s": off["totals"]["ttft_s"],
        }
    return result
