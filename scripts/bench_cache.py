#!/usr/bin/env python3
"""Does a warm turn prefill only what is new? A Claude-Code-shaped session replayed for real.

Starts the companion server on the tiny model (or --model) with a fresh cache directory and a
real mitmdump with addons/normalize.py in front of it, then replays a generated session the way
Claude Code drives one: ~22k tokens of system + tools, main turns whose model replies (scripted
with forced decoding: real prefill and decode, only the token choice is fixed) call a tool and
get a tool result back, a title side request with `json_schema`, and a sub-agent. Each request
is built from the server's real previous answers, so prompt + output snapshots are exercised.

Variants, measured in one run: billing block normalized away by the proxy, and not (the proxy
with normalize=false). Then: tail-only requests (the limit a cache can reach), and a server
restarts on the same cache directory (the server loads its recent conversations back from disk
before the first warm turn after each). Main turns come after a user's 1 s pause
(replay.THINK_S), those after a restart too, so both kinds of turn meet an idle server.
Writes JSON and a PNG chart of TTFT per request.

    .venv/bin/python scripts/bench_cache.py [--turns 8] [--model DIR] [--out artifacts/bench_cache]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import httpx
from bench_cache_current import chart_current, kv_bytes_per_token, print_current, run_current, summarize_current
from tqdm import tqdm

from ccwarm.harness import REPO
from ccwarm.stack import proxy_chain
from ccwarm.testing.replay import Measured, Replay, send, wait_for_warm_start
from ccwarm.testing.synthetic import SessionSpec


def run_session(
    client: httpx.Client, replay: Replay, *, tail_probe: bool = False
) -> tuple[list[Measured], list[dict[str, Any]]]:
    """The main turns with the side request and the sub-agent interleaved; returns the history."""
    out: list[Measured] = []

    def send_(body, headers, label, kind):
        return send(client, out, body, headers, label, kind)

    msgs = [replay.gen.first_user_message("Look at the project and tell me what the build does. [[turn 1]]")]
    bar = tqdm(total=replay.turns + 3, desc="replay", unit="req", leave=False)
    for turn in range(1, replay.turns + 1):
        body, headers = replay.request(msgs, tools=replay.tools, label=f"main {turn}")
        answer = send_(body, headers, f"main {turn}", "main")
        bar.update()
        msgs = msgs + [
            {"role": "assistant", "content": answer["content"]},
            replay.tool_results(answer, f"[[turn {turn + 1}]]"),
        ]
        if turn == 1:
            body, headers = replay.request(
                [{"role": "user", "content": "Look at the project and tell me what the build does. [[title]]"}],
                tools=None,
                label="side: title",
                instructions="Generate a concise title for this conversation. Answer with JSON.",
            )
            body["max_tokens"] = 64
            body["output_config"] = {
                "format": {
                    "type": "json_schema",
                    "schema": {"type": "object", "properties": {"title": {"type": "string"}}, "required": ["title"]},
                }
            }
            send_(body, headers, "side: title", "side")
            bar.update()
        if turn == replay.turns // 2:
            sub = [{"role": "user", "content": "Find every place that reads the build configuration. [[sub 1]]"}]
            for k in (1, 2):
                body, headers = replay.subagent_request(sub, agent_id="agent-bench-0001", label=f"subagent {k}")
                answer = send_(body, headers, f"subagent {k}", "subagent")
                sub = sub + [
                    {"role": "assistant", "content": answer["content"]},
                    replay.tool_results(answer, "[[sub 2]]"),
                ]
            bar.update()
    bar.close()
    if tail_probe:
        # The new tail of the last turn sent alone: no cached prefix can help or hurt it.
        last = msgs[-1]["content"]
        tail_text = last if isinstance(last, str) else "\n".join(b["content"] for b in last)
        for i in range(3):
            body = {
                "model": "claude-opus-4-8",
                "max_tokens": 8,
                "stream": True,
                "messages": [{"role": "user", "content": f"{i} [[tail]] {tail_text}"}],
            }  # unique start: never cached
            send_(body, {}, f"tail-only {i + 1}", "tail")
    return out, msgs


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--turns", type=int, default=8)
    ap.add_argument(
        "--restarts", type=int, default=3, help="server restarts, each followed by one main turn (default %(default)s)"
    )
    ap.add_argument("--model", help="mlx-lm model directory (default: a fresh tiny model, see --hidden)")
    ap.add_argument(
        "--hidden",
        type=int,
        default=512,
        help="hidden size of the generated 1-layer tiny model (default %(default)s: a cold 22k-token "
        "prefill then takes ~10 s on 2 cores, the regime real deployments are in, so fixed "
        "per-request overheads do not hide what the cache saves)",
    )
    ap.add_argument(
        "--tools-kb", type=int, default=88, help="JSON size of the generated tool list (default: ~22k prompt tokens)"
    )
    ap.add_argument("--system-kb", type=int, default=12)
    ap.add_argument("--out", type=Path, default=REPO / "artifacts" / "bench_cache")
    ap.add_argument(
        "--scenario",
        choices=("all", "classic", "current"),
        default="all",
        help="classic: the 2.1.197-shaped session, normalized or not; current: the KV block store against whole "
        "snapshots on a current-CLI session (scripts/bench_cache_current.py); all: both (default)",
    )
    ap.add_argument("--current-turns", type=int, default=18, help="main turns of the current-CLI session")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="ccwarm-bench-"))
    model = args.model
    if model is None:
        from cache_backend.testing.tiny_model import make_tiny_model

        model = str(
            make_tiny_model(
                work / "tiny-model", seed=0, num_layers=1, hidden_size=args.hidden, intermediate_size=4 * args.hidden
            )
        )
    try:
        if args.scenario in ("all", "current"):
            current = run_current(model, work, args.restarts, args.current_turns)
            current["summary"] = summarize_current(current, kv_bytes_per_token(_config(model)))
            current["machine"] = _machine()
            (args.out / "bench_cache_current.json").write_text(json.dumps(current, indent=2))
            chart_current(current, args.out / "bench_cache_current.png")
            print_current(current["summary"])
            print(f"\nwrote {args.out / 'bench_cache_current.json'} and {args.out / 'bench_cache_current.png'}")
        if args.scenario in ("all", "classic"):
            run_classic(args, model, work)
    finally:
        # The servers' KV caches run to gigabytes a run; their logs are what is worth keeping.
        for cache in work.glob("cache-*"):
            shutil.rmtree(cache, ignore_errors=True)
        print(f"server logs in {work}")
    return 0


def _config(model: str) -> dict[str, Any]:
    return json.loads((Path(model) / "config.json").read_text())


def _machine() -> dict[str, Any]:
    return {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count()}


def run_classic(args: argparse.Namespace, model: str, work: Path) -> None:
    spec = SessionSpec(seed=3, tools_json_bytes=args.tools_kb * 1000, system_bytes=args.system_kb * 1000)
    replay = Replay(spec, args.turns)
    script = work / "script.json"
    script.write_text(json.dumps(replay.script(args.restarts)))

    results: dict[str, Any] = {
        "machine": _machine(),
        "turns": args.turns,
        "model": model,
        "model_config": json.loads((Path(model) / "config.json").read_text())
        if (Path(model) / "config.json").exists()
        else None,
        "variants": {},
    }

    @contextlib.contextmanager
    def chain(cache_dir: Path, log: Path, normalize: bool = True) -> Iterator[tuple[httpx.Client, str]]:
        """Server + mitmdump (normalize on or off) before it; yields (client of the proxy, server URL)."""
        args = Replay.server_args(model, cache_dir, script)
        options = (f"normalize={'true' if normalize else 'false'}", "termlog_verbosity=warn")
        with (
            proxy_chain(args, server_log=log, proxy_options=options) as chain_,
            httpx.Client(base_url=chain_.proxy_url, timeout=3600) as client,
        ):
            yield client, chain_.server.url

    for variant, normalize in (("normalized", True), ("not normalized", False)):
        cache_dir = work / f"cache-{'on' if normalize else 'off'}"
        entry: dict[str, Any] = {}
        with chain(cache_dir, work / f"server-{variant[:3]}.log", normalize) as (client, server_url):
            print(f"\n== {variant}: {args.turns} main turns, a title side request, a sub-agent", flush=True)
            measured, history = run_session(client, replay, tail_probe=normalize)
            entry["stats"] = httpx.get(f"{server_url}/v1/cache/stats", timeout=30).json()

        if normalize:
            # Restart on the same cache directory, several times: each first turn after a restart
            # must come back from disk. The median of those is the figure (one restart is noisy).
            for k in range(1, args.restarts + 1):
                with chain(cache_dir, work / f"server-restart-{k}.log") as (client, server_url):
                    time.sleep(1.0)  # both processes done starting: the figure is the restore, not process start-up
                    entry.setdefault("warm_starts", []).append(wait_for_warm_start(server_url))
                    turn = args.turns + k
                    body, headers = replay.request(history, tools=replay.tools, label=f"after restart {k}")
                    answer = send(client, measured, body, headers, f"main {turn} after restart {k}", "restart")
                    history = history + [
                        {"role": "assistant", "content": answer["content"]},
                        replay.tool_results(answer, f"[[turn {turn + 1}]]"),
                    ]
        entry["requests"] = [asdict(m) for m in measured]
        results["variants"][variant] = entry

    summary = summarize(results)
    results["summary"] = summary
    (args.out / "bench_cache.json").write_text(json.dumps(results, indent=2))
    chart(results, args.out / "bench_cache.png")
    print_report(results)
    print(f"\nwrote {args.out / 'bench_cache.json'} and {args.out / 'bench_cache.png'}")


def ideal_prefill(requests: list[dict[str, Any]]) -> int:
    """Tokens no earlier prompt or output covered: the first request of each distinct prefix
    (main, side, sub-agent) plus, per later request, what its predecessor did not contain."""
    total = 0
    seen: dict[str, int] = {}
    for r in requests:
        key = r["kind"]
        prev = seen.get(key)
        total += r["prompt_tokens"] - (prev if prev is not None and prev < r["prompt_tokens"] else 0)
        seen[key] = r["prompt_tokens"] + r["output_tokens"] - 1
    return total


def summarize(results: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, v in results["variants"].items():
        reqs = [r for r in v["requests"] if r["kind"] not in ("tail", "restart")]
        main = [r for r in reqs if r["kind"] == "main"]
        warm = [r["ttft_s"] for r in main[1:]]
        entry = {
            "prefilled": sum(r["prefilled"] for r in reqs),
            "prompt_tokens": sum(r["prompt_tokens"] for r in reqs),
            "ideal_prefill": ideal_prefill(reqs),
            "cold_ttft_s": main[0]["ttft_s"],
            "cold_prompt_tokens": main[0]["prompt_tokens"],
            "warm_ttft_median_s": statistics.median(warm) if warm else None,
            "warm_prefilled_median": statistics.median(r["prefilled"] for r in main[1:]) if len(main) > 1 else None,
        }
        entry["prefilled_over_ideal"] = entry["prefilled"] / max(1, entry["ideal_prefill"])
        if entry["warm_ttft_median_s"]:
            entry["cold_over_warm"] = entry["cold_ttft_s"] / entry["warm_ttft_median_s"]
        tails = [r["ttft_s"] for r in v["requests"] if r["kind"] == "tail"]
        if tails:
            entry["tail_only_ttft_median_s"] = statistics.median(tails)
            entry["tail_only_prompt_tokens"] = next(r["prompt_tokens"] for r in v["requests"] if r["kind"] == "tail")
            entry["warm_over_tail_only"] = entry["warm_ttft_median_s"] / entry["tail_only_ttft_median_s"]
        restart = [r for r in v["requests"] if r["kind"] == "restart"]
        if restart:
            entry["restarts"] = len(restart)
            entry["after_restart_restored"] = [r["restored"] for r in restart]
            entry["after_restart_prefilled"] = [r["prefilled"] for r in restart]
            entry["after_restart_warm_ttft_s"] = [r["ttft_s"] for r in restart]
            entry["after_restart_warm_ttft_median_s"] = statistics.median(r["ttft_s"] for r in restart)
            entry["restart_over_in_memory_warm"] = (
                entry["after_restart_warm_ttft_median_s"] / entry["warm_ttft_median_s"]
            )
            # Each restart loaded its recent conversations back before the turn was sent.
            entry["warm_start_seconds"] = [w.get("seconds") for w in v.get("warm_starts", [])]
            entry["warm_start_bytes"] = [w.get("bytes") for w in v.get("warm_starts", [])]
        out[name] = entry
    return out


def print_report(results: dict[str, Any]) -> None:
    for name, v in results["variants"].items():
        print(f"\n{name}")
        print(f"  {'request':<30}{'prompt':>8}{'restored':>10}{'prefilled':>11}{'TTFT s':>9}")
        for r in v["requests"]:
            print(
                f"  {r['label']:<30}{r['prompt_tokens']:>8}{r['restored']:>10}{r['prefilled']:>11}{r['ttft_s']:>9.2f}"
            )
    print("\nsummary")
    for name, s in results["summary"].items():
        print(f"  {name}:")
        for k, val in s.items():
            if isinstance(val, float):
                print(f"    {k:<36}{val:.3f}")
            elif not isinstance(val, dict):
                print(f"    {k:<36}{val}")


def chart(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(11, 5))
    labels: list[str] = []
    for name, v in results["variants"].items():
        reqs = [r for r in v["requests"] if r["kind"] != "tail"]
        labels = labels if len(labels) >= len(reqs) else [r["label"] for r in reqs]
        ax.plot(range(1, len(reqs) + 1), [r["ttft_s"] for r in reqs], marker="o", label=name)
        tails = [r["ttft_s"] for r in v["requests"] if r["kind"] == "tail"]
        if tails:
            ax.axhline(statistics.median(tails), color="grey", linestyle=":", label="tail-only request (the limit)")
    ax.set_xticks(range(1, len(labels) + 1), labels, rotation=45, ha="right", fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("time to first token (s, log)")
    ax.set_title("TTFT per request, Claude-Code-shaped session on the tiny model")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
