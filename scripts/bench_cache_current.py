"""bench_cache's second scenario: the KV block store against whole snapshots, on a session in the
current CLI's shape (run it with `scripts/bench_cache.py --scenario current`).

The session (ccwarm/testing/replay_current.py): a main thread that grows past 60k tokens, two
background sub-agents, six classifier checks that share a ~33k-token prefix, replayed with the
recorded assistant turns (the server's answer is a short scripted text), so every generation is
a dead branch. Four servers in turn, each on a
fresh cache folder behind a real mitmdump with the normalize addon: blocks and snapshots, each
with the disk tier on and off; then the disk-on ones restart on their folder for the held-back
main turns. Figures, per store:
- memory held / (unique cached tokens x KV bytes per token), both from the store's stats at the
  end (unique tokens count each distinct prefix once, as a trie would);
- disk bytes written / (KV of the tokens computed: prefilled + generated), per warm main turn
  (the server counts each write against the request whose save created what it wrote) and for
  the whole session once every write is done;
- warm main-turn TTFT with the disk tier on / off, at 60k+ prompt tokens;
- warm TTFT and prefilled tokens of blocks / of snapshots (the snapshot store with room to spare
  restores the exact longest prefix: the ideal);
- the first warm turn after a restart (once the server's warm start is done) / in-memory warm
  turns. Every main turn, the ones after a restart included, comes after a user's 1 s pause
  (replay.THINK_S), so both kinds of turn meet an idle server.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import httpx
from tqdm import tqdm

from ccwarm.stack import proxy_chain
from ccwarm.testing.replay import Measured, send, wait_for_warm_start
from ccwarm.testing.replay_current import CurrentReplaySpec, Step, current_session

# KV bytes per token (fp16, K and V, every layer) from the models' configs: layers x KV heads x head dim.
PROJECTED = {
    "Qwen2.5-Coder-7B": 2 * 28 * 4 * 128 * 2,
    "Qwen2.5-Coder-32B": 2 * 64 * 8 * 128 * 2,
}
VARIANTS = (("blocks", True), ("blocks", False), ("snapshots", True), ("snapshots", False))


def kv_bytes_per_token(config: dict[str, Any]) -> int:
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    size = {"float32": 4, "bfloat16": 2, "float16": 2}.get(config.get("torch_dtype", "float16"), 2)
    return 2 * config["num_hidden_layers"] * config.get("num_key_value_heads", heads) * head_dim * size


def _stats(url: str) -> dict[str, Any]:
    return httpx.get(f"{url}/v1/cache/stats", timeout=60).json()


def _settled_stats(url: str, timeout: float = 180.0) -> dict[str, Any]:
    """Stats once every queued write is done (tails wait ~10 s before they are written)."""
    deadline = time.monotonic() + timeout
    time.sleep(12.0)
    s = _stats(url)
    while s.get("disk_pending_bytes", 0) and time.monotonic() < deadline:
        time.sleep(1.0)
        s = _stats(url)
    return s


def _rss_mib(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS:"))) / 1024


def run_current(model: str, work: Path, restarts: int, main_turns: int) -> dict[str, Any]:
    spec = CurrentReplaySpec(main_turns=main_turns, extra_main_turns=restarts)
    steps, held_back = current_session(spec)
    # Every answer is the same short scripted text, fed through the real model: the first token
    # streams at once (a random model's own first tokens can be held back as a possible tool
    # call), and it never matches the recorded assistant turn that the next prompt carries.
    script = work / "current-script.json"
    script.write_text(json.dumps([{"reply": "Reading the next file."}]))
    results: dict[str, Any] = {"spec": asdict(spec), "variants": {}}
    for store, disk in VARIANTS:
        name = f"{store}, disk {'on' if disk else 'off'}"
        cache_dir = work / f"cache-{store}-{'disk' if disk else 'mem'}"
        server_args = ("--model", model, "--cache-dir", str(cache_dir), "--max-context", "200000",
                       "--cache-store", store, "--cache-disk", "20GB" if disk else "0",
                       "--test-forced-replies", str(script))  # fmt: skip
        measured: list[Measured] = []
        written: list[int] = []
        warm_starts: list[dict[str, Any]] = []
        print(f"\n== current CLI session, {name}: {len(steps)} requests", flush=True)
        with (
            proxy_chain(server_args, server_log=work / f"server-{store}-{disk}.log") as chain,
            httpx.Client(base_url=chain.proxy_url, timeout=3600) as client,
        ):
            for step in tqdm(steps, desc=name, unit="req", leave=False):
                written.append(_stats(chain.server.url).get("disk_bytes_written", 0))
                _send(client, measured, step)
            final = _settled_stats(chain.server.url) if disk else _stats(chain.server.url)
            rss = _rss_mib(chain.server.proc.pid)
        written.append(final.get("disk_bytes_written", 0))
        if disk:
            for k, step in enumerate(held_back, 1):
                with (
                    proxy_chain(server_args, server_log=work / f"server-{store}-restart-{k}.log") as chain,
                    httpx.Client(base_url=chain.proxy_url, timeout=3600) as client,
                ):
                    time.sleep(1.0)  # both processes done starting: the figure is the restore
                    warm_starts.append(wait_for_warm_start(chain.server.url))
                    _send(client, measured, step, kind="restart")
        results["variants"][name] = {
            "store": store,
            "disk": disk,
            "requests": [asdict(m) for m in measured],
            "disk_bytes_written_before": written,
            "final_stats": final,
            "server_rss_mib": round(rss, 1),
            "warm_starts": warm_starts,
        }
    return results


def _send(client: httpx.Client, measured: list[Measured], step: Step, kind: str | None = None) -> None:
    req = step.request
    send(client, measured, req.body, req.headers, req.label, kind or step.kind)


def summarize_current(results: dict[str, Any], bpt: int) -> dict[str, Any]:
    out: dict[str, Any] = {"kv_bytes_per_token": bpt, "stores": {}}
    v = results["variants"]
    for name, entry in v.items():
        reqs = entry["requests"]
        session = [r for r in reqs if r["kind"] != "restart"]
        mains = [i for i, r in enumerate(session) if r["kind"] == "main"]
        warm = [session[i] for i in mains[1:]]
        s = entry["final_stats"]
        row: dict[str, Any] = {
            "prefilled": sum(r["prefilled"] for r in session),
            "prompt_tokens": sum(r["prompt_tokens"] for r in session),
            "warm_ttft_median_s": statistics.median(r["ttft_s"] for r in warm),
            "warm_ttft_60k_median_s": _median([r["ttft_s"] for r in warm if r["prompt_tokens"] >= 60_000]),
            "largest_prompt_tokens": max(r["prompt_tokens"] for r in session),
            "unique_tokens": s.get("unique_tokens"),
            "memory_bytes": s.get("memory_bytes"),
            "memory_over_unique_kv": s["memory_bytes"] / (s["unique_tokens"] * bpt) if s.get("unique_tokens") else None,
            "evictions": s.get("evictions", 0) + s.get("truncations", 0),
            "server_rss_mib": entry["server_rss_mib"],
        }
        if entry["disk"]:
            w = entry["disk_bytes_written_before"]
            computed = [r["prefilled"] + r["output_tokens"] for r in session]
            # The server counts each write against the request whose save created the block.
            by_request = s.get("disk_bytes_written_by_request", {})
            per_turn = [by_request.get(str(i + 1), 0) / (computed[i] * bpt) for i in mains[1:]]
            row["disk_written_over_new_kv_per_warm_turn_median"] = statistics.median(per_turn)
            row["disk_written_over_new_kv_per_warm_turn_max"] = max(per_turn)
            row["disk_written_over_new_kv_session"] = w[-1] / (sum(computed) * bpt)
            row["disk_bytes_written_session"] = w[-1]
            row["disk_bytes_at_end"] = s.get("disk_bytes")
            restarts = [r for r in reqs if r["kind"] == "restart"]
            ref = [r["ttft_s"] for r in warm[-len(restarts) :]] if restarts else []
            if restarts:
                row["after_restart_restored"] = [r["restored"] for r in restarts]
                row["after_restart_ttft_s"] = [r["ttft_s"] for r in restarts]
                row["warm_start_seconds"] = [w.get("seconds") for w in entry["warm_starts"]]
                row["warm_start_bytes"] = [w.get("bytes") for w in entry["warm_starts"]]
                row["after_restart_over_warm"] = statistics.median(r["ttft_s"] for r in restarts) / statistics.median(
                    ref
                )
        out["stores"][name] = row
    for store in ("blocks", "snapshots"):
        on, off = out["stores"].get(f"{store}, disk on"), out["stores"].get(f"{store}, disk off")
        if on and off and on["warm_ttft_60k_median_s"] and off["warm_ttft_60k_median_s"]:
            on["warm_ttft_60k_disk_on_over_off"] = on["warm_ttft_60k_median_s"] / off["warm_ttft_60k_median_s"]
    blocks, snaps = out["stores"].get("blocks, disk on"), out["stores"].get("snapshots, disk on")
    if blocks and snaps:
        out["blocks_over_snapshots"] = {
            "warm_ttft": blocks["warm_ttft_median_s"] / snaps["warm_ttft_median_s"],
            "warm_ttft_60k": _ratio(blocks["warm_ttft_60k_median_s"], snaps["warm_ttft_60k_median_s"]),
            "prefilled": blocks["prefilled"] / snaps["prefilled"],
        }
        out["projected"] = _projection(out, bpt)
    return out


def _projection(out: dict[str, Any], bpt: int) -> dict[str, Any]:
    """This session's bytes on bigger models: token counts x their KV bytes per token."""
    rows = {}
    for model, model_bpt in {"bench model (measured)": bpt, **PROJECTED}.items():
        row = {"kv_bytes_per_token": model_bpt}
        for name in ("blocks, disk on", "snapshots, disk on"):
            s = out["stores"][name]
            store = name.split(",")[0]
            scale = model_bpt / bpt
            row[f"{store}_memory_gb"] = s["memory_bytes"] * scale / 1e9
            row[f"{store}_disk_written_session_gb"] = s["disk_bytes_written_session"] * scale / 1e9
        rows[model] = row
    return rows


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def print_current(summary: dict[str, Any]) -> None:
    print(f"\ncurrent CLI session (KV bytes per token: {summary['kv_bytes_per_token']})")
    for name, row in summary["stores"].items():
        print(f"  {name}:")
        for k, val in row.items():
            print(f"    {k:<48}{val:.3f}" if isinstance(val, float) else f"    {k:<48}{val}")
    for k, val in summary.get("blocks_over_snapshots", {}).items():
        print(f"  blocks / snapshots {k:<30}{val:.3f}" if val is not None else f"  blocks / snapshots {k}: n/a")
    for model, row in summary.get("projected", {}).items():
        cells = (f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items())
        print(f"  {model}: " + ", ".join(cells))


def chart_current(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 5))
    for name, entry in results["variants"].items():
        mains = [r for r in entry["requests"] if r["kind"] == "main"]
        ax1.plot([r["prompt_tokens"] / 1000 for r in mains], [r["ttft_s"] for r in mains], marker="o", label=name)
        if entry["disk"]:
            w = entry["disk_bytes_written_before"]
            ax2.plot(range(len(w)), [x / 2**20 for x in w], label=name)
    ax1.set_xlabel("main-turn prompt (k tokens)")
    ax1.set_ylabel("TTFT (s)")
    ax1.set_yscale("log")
    ax1.set_title("Main-turn TTFT, current CLI session")
    ax1.legend(fontsize=8)
    ax2.set_xlabel("requests sent")
    ax2.set_ylabel("disk bytes written (MiB, cumulative)")
    ax2.set_title("What the disk tier writes")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
