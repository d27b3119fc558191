#!/usr/bin/env python3
"""Soak: a main thread, sub-agents and classifier requests at once, for minutes, on tight budgets.

What it checks is what a long Claude Code session needs and a short test cannot show: that the
main conversation is never dropped from the cache while side traffic churns it (every warm main
turn restores at least its whole previous prompt), that no request fails, and how memory and
disk grow. Starts the companion server on a generated tiny model (1 layer, hidden 512: a cold
~22k-token prefill takes ~10 s on 2 cores) with `--cache-memory 200MB --cache-disk 300MB`, a real
mitmdump with addons/normalize.py before it, and three client threads through the proxy:

- main: a conversation whose scripted replies call a tool and get ~1.2 KB results back, each
  request built from the server's real previous answer; a new conversation after --main-turns;
- sub-agents: two-turn background agents (own agent id, own instructions), one after another;
- classifier: auto-mode permission checks in the current CLI's shape (not streamed, no tools, a
  ~141 KB system prompt, the transcript so far), as the CLI sends between main turns.

Reports errors, restored/prompt per kind, main turns that lost their conversation, server RSS
(VmRSS) and disk use over time; writes JSON and a PNG chart; exits 1 on any error or loss.

    .venv/bin/python scripts/soak.py [--minutes 10] [--out artifacts/soak]
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx
from tqdm import tqdm

from ccwarm.harness import REPO
from ccwarm.stack import proxy_chain
from ccwarm.testing.replay import Replay, stream_request
from ccwarm.testing.synthetic import SessionSpec
from ccwarm.testing.synthetic_current_requests import CurrentRequests, CurrentSpec


@dataclass
class Sample:
    """One request as the client saw it."""

    t: float
    kind: str
    label: str
    prompt: int
    restored: int
    ttft_s: float
    lost: bool = False  # a main turn that restored less than its previous prompt
    error: str = ""


class Soak:
    def __init__(self, proxy_url: str, deadline: float, main_turns: int) -> None:
        self.url = proxy_url
        self.deadline = deadline
        self.main_turns = main_turns
        self.samples: list[Sample] = []
        self.lock = threading.Lock()
        self.t0 = time.monotonic()
        self.bar = tqdm(desc="soak", unit="req", leave=False)

    def running(self) -> bool:
        return time.monotonic() < self.deadline

    def add(self, s: Sample) -> None:
        with self.lock:
            self.samples.append(s)
            self.bar.update()
            errors = sum(1 for x in self.samples if x.error)
            lost = sum(1 for x in self.samples if x.lost)
            self.bar.set_postfix(errors=errors, lost=lost)

    def _stream(self, client: httpx.Client, kind: str, label: str, body: dict, headers: dict) -> dict | None:
        try:
            message, ttft, usage = stream_request(client, body, headers)
        except Exception as e:  # noqa: BLE001 - every failure is a finding, reported
            self.add(Sample(time.monotonic() - self.t0, kind, label, 0, 0, 0.0, error=f"{type(e).__name__}: {e}"[:300]))
            return None
        restored = usage.get("cache_read_input_tokens", 0)
        message["_sample"] = Sample(
            time.monotonic() - self.t0, kind, label, restored + usage.get("input_tokens", 0), restored, ttft
        )
        return message

    # -- the three threads ---------------------------------------------------------------------------

    def main_thread(self, replay: Replay) -> None:
        conversation = 0
        with httpx.Client(base_url=self.url, timeout=3600) as client:
            while self.running():
                conversation += 1
                msgs = [
                    replay.gen.first_user_message(f"Conversation {conversation}: what does the build do? [[turn 1]]")
                ]
                previous_prompt = 0
                for turn in range(1, self.main_turns + 1):
                    if not self.running():
                        return
                    body, headers = replay.request(msgs, tools=replay.tools, label=f"main {conversation}.{turn}")
                    answer = self._stream(client, "main", f"main {conversation}.{turn}", body, headers)
                    if answer is None:
                        break
                    sample = answer.pop("_sample")
                    sample.lost = turn > 1 and sample.restored < previous_prompt
                    self.add(sample)
                    previous_prompt = sample.prompt
                    msgs = msgs + [
                        {"role": "assistant", "content": answer["content"]},
                        replay.tool_results(answer, f"[[turn {turn + 1}]]"),
                    ]
                    self.transcript = msgs

    def subagent_thread(self, replay: Replay) -> None:
        n = 0
        with httpx.Client(base_url=self.url, timeout=3600) as client:
            while self.running():
                n += 1
                agent = f"agent-soak-{n:04d}"
                sub = [{"role": "user", "content": f"Task {n}: find where the configuration is read. [[sub 1]]"}]
                for k in (1, 2):
                    body, headers = replay.subagent_request(sub, agent_id=agent, label=f"subagent {n}.{k}")
                    answer = self._stream(client, "subagent", f"subagent {n}.{k}", body, headers)
                    if answer is None:
                        break
                    self.add(answer.pop("_sample"))
                    sub = sub + [
                        {"role": "assistant", "content": answer["content"]},
                        replay.tool_results(answer, "[[sub 2]]"),
                    ]
                time.sleep(2.0)  # the CLI launches agents now and then, not back to back

    def classifier_thread(self) -> None:
        session = CurrentRequests(CurrentSpec(seed=7))
        n = 0
        with httpx.Client(base_url=self.url, timeout=3600) as client:
            while self.running():
                time.sleep(5.0)
                transcript = [{"user": "what does the build do?"}]
                for m in getattr(self, "transcript", [])[1:]:
                    blocks = (
                        m["content"] if isinstance(m["content"], list) else [{"type": "text", "text": m["content"]}]
                    )
                    for b in blocks:
                        if b.get("type") == "tool_use":
                            transcript.append({"tool": b["name"], "input": b["input"]})
                n += 1
                req = session.classifier(transcript, stage=1, label=f"classifier {n}")
                body = dict(req.body, max_tokens=8)
                t = time.monotonic()
                try:
                    r = client.post("/v1/messages?beta=true", json=body, headers=req.headers)
                    if r.status_code != 200:
                        raise RuntimeError(f"HTTP {r.status_code}: {r.text[:300]}")
                    usage = r.json()["usage"]
                except Exception as e:  # noqa: BLE001
                    self.add(
                        Sample(
                            t - self.t0,
                            "classifier",
                            f"classifier {n}",
                            0,
                            0,
                            0.0,
                            error=f"{type(e).__name__}: {e}"[:300],
                        )
                    )
                    continue
                restored = usage.get("cache_read_input_tokens", 0)
                self.add(
                    Sample(
                        t - self.t0,
                        "classifier",
                        f"classifier {n}",
                        restored + usage["input_tokens"],
                        restored,
                        time.monotonic() - t,
                    )
                )


def sample_resources(server_pid: int, cache_dir: Path, server_url: str, soak: Soak, out: list[dict]) -> None:
    while soak.running():
        try:
            status = Path(f"/proc/{server_pid}/status").read_text()
            rss_kb = int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS:")))
        except (OSError, StopIteration, ValueError):
            rss_kb = 0
        disk = sum(p.stat().st_size for p in cache_dir.rglob("*") if p.is_file())
        try:
            stats = httpx.get(server_url + "/v1/cache/stats", timeout=10).json()
        except httpx.HTTPError:
            stats = {}
        out.append(
            {
                "t": round(time.monotonic() - soak.t0, 1),
                "rss_mib": round(rss_kb / 1024, 1),
                "disk_mib": round(disk / 2**20, 1),
                "snapshot_memory_mib": round(stats.get("memory_bytes", 0) / 2**20, 1),
                "snapshot_disk_mib": round(stats.get("disk_bytes", 0) / 2**20, 1),
            }
        )
        time.sleep(5.0)


def summarize(samples: list[Sample], resources: list[dict]) -> dict[str, Any]:
    kinds: dict[str, Any] = {}
    for kind in ("main", "subagent", "classifier"):
        ok = [s for s in samples if s.kind == kind and not s.error]
        ttfts = sorted(s.ttft_s for s in ok) or [0.0]
        kinds[kind] = {
            "requests": len(ok),
            "errors": sum(1 for s in samples if s.kind == kind and s.error),
            "restored_over_prompt": round(sum(s.restored for s in ok) / max(1, sum(s.prompt for s in ok)), 4),
            "ttft_p50_s": round(statistics.median(ttfts), 3),
            "ttft_p95_s": round(ttfts[int(0.95 * (len(ttfts) - 1))], 3),
        }
    warm_main = [s for s in samples if s.kind == "main" and not s.error and not s.label.endswith(".1")]
    return {
        "kinds": kinds,
        "errors": sum(1 for s in samples if s.error),
        "warm_main_turns": len(warm_main),
        "lost_main_turns": sum(1 for s in samples if s.lost),
        "rss_mib": {
            "first": resources[0]["rss_mib"],
            "max": max(r["rss_mib"] for r in resources),
            "last": resources[-1]["rss_mib"],
        }
        if resources
        else {},
        "disk_mib_max": max((r["disk_mib"] for r in resources), default=0),
        "snapshot_memory_mib_max": max((r["snapshot_memory_mib"] for r in resources), default=0),
    }


def chart(samples: list[Sample], resources: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(11, 7), sharex=True)
    for kind, marker in (("main", "o"), ("subagent", "s"), ("classifier", "^")):
        pts = [s for s in samples if s.kind == kind and not s.error]
        top.scatter([s.t / 60 for s in pts], [s.ttft_s for s in pts], marker=marker, s=14, label=kind)
    lost = [s for s in samples if s.lost]
    if lost:
        top.scatter(
            [s.t / 60 for s in lost], [s.ttft_s for s in lost], marker="x", color="red", s=60, label="lost main turn"
        )
    top.set_yscale("log")
    top.set_ylabel("time to first token (s, log)")
    top.legend(fontsize=8)
    ts = [r["t"] / 60 for r in resources]
    for key, label in (
        ("rss_mib", "server RSS"),
        ("snapshot_memory_mib", "snapshots in memory"),
        ("disk_mib", "cache folder on disk"),
    ):
        bottom.plot(ts, [r[key] for r in resources], label=label)
    bottom.set_xlabel("minutes")
    bottom.set_ylabel("MiB")
    bottom.legend(fontsize=8)
    fig.suptitle(
        "Soak: main thread, sub-agents and classifier requests at once (--cache-memory 200MB --cache-disk 300MB)"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--main-turns", type=int, default=40, help="main turns per conversation before a new one starts")
    ap.add_argument("--cache-memory", default="200MB")
    ap.add_argument("--cache-disk", default="300MB")
    ap.add_argument("--out", type=Path, default=REPO / "artifacts" / "soak")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="ccwarm-soak-"))
    from cache_backend.testing.tiny_model import make_tiny_model

    model = make_tiny_model(work / "tiny-model", seed=0, num_layers=1, hidden_size=512, intermediate_size=2048)
    replay = Replay(SessionSpec(seed=3, tools_json_bytes=60_000, system_bytes=8_000), args.main_turns)
    script = work / "script.json"
    script.write_text(json.dumps(replay.script()))
    cache_dir = work / "cache"
    server_args = (
        *Replay.server_args(model, cache_dir, script),
        "--cache-memory",
        args.cache_memory,
        "--cache-disk",
        args.cache_disk,
    )
    resources: list[dict] = []
    print(
        f"soak: {args.minutes:g} min, --cache-memory {args.cache_memory} --cache-disk {args.cache_disk}; work in "
        f"{work}",
        flush=True,
    )
    with proxy_chain(server_args, server_log=work / "server.log") as chain:
        server = chain.server
        soak = Soak(chain.proxy_url, time.monotonic() + args.minutes * 60, args.main_turns)
        threads = [
            threading.Thread(target=soak.main_thread, args=(replay,), name="main"),
            threading.Thread(target=soak.subagent_thread, args=(Replay(replay.gen.spec, args.main_turns),), name="sub"),
            threading.Thread(target=soak.classifier_thread, name="classifier"),
            threading.Thread(
                target=sample_resources,
                args=(server.proc.pid, cache_dir, server.url, soak, resources),
                name="resources",
            ),
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        soak.bar.close()
        final_stats = httpx.get(server.url + "/v1/cache/stats", timeout=30).json()
        traceback_in_log = "Traceback" in server.log()
    summary = summarize(soak.samples, resources)
    summary["traceback_in_server_log"] = traceback_in_log
    results = {
        "machine": {"platform": platform.platform(), "cpus": __import__("os").cpu_count()},
        "minutes": args.minutes,
        "cache_memory": args.cache_memory,
        "cache_disk": args.cache_disk,
        "summary": summary,
        "final_stats": final_stats,
        "resources": resources,
        "samples": [asdict(s) for s in soak.samples],
    }
    (args.out / "soak.json").write_text(json.dumps(results, indent=2))
    chart(soak.samples, resources, args.out / "soak.png")
    print_report(summary)
    print(f"\nwrote {args.out / 'soak.json'} and {args.out / 'soak.png'}")
    bad = summary["errors"] or summary["lost_main_turns"] or traceback_in_log
    if not bad:
        shutil.rmtree(work, ignore_errors=True)
    else:
        print(f"kept {work} (server.log) for a look")
    return 1 if bad else 0


def print_report(summary: dict[str, Any]) -> None:
    print("\n| kind | requests | errors | restored / prompt | TTFT p50 | TTFT p95 |")
    print("|---|---|---|---|---|---|")
    for kind, k in summary["kinds"].items():
        print(
            f"| {kind} | {k['requests']} | {k['errors']} | {k['restored_over_prompt']:.3f} | "
            f"{k['ttft_p50_s']:.2f} s | {k['ttft_p95_s']:.2f} s |"
        )
    rss = summary["rss_mib"]
    print(
        f"\nwarm main turns {summary['warm_main_turns']}, lost {summary['lost_main_turns']}; errors "
        f"{summary['errors']}; "
        f"server RSS {rss.get('first')} -> max {rss.get('max')} -> {rss.get('last')} MiB; "
        f"snapshots in memory max {summary['snapshot_memory_mib_max']} MiB; cache folder max "
        f"{summary['disk_mib_max']} MiB"
    )


if __name__ == "__main__":
    sys.exit(main())
