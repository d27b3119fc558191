#!/usr/bin/env python3
"""How much latency do the proxy addons add? Measured through real mitmdump processes.

Sends the same ~90 KB Claude-Code-shaped requests (rotating `cch`, as the real client does)
through a plain mitmdump, mitmdump with normalize.py, and (if present) normalize.py +
stability.py, all in reverse mode before one loopback upstream; requests are interleaved across
the variants so machine noise hits them alike. Then times the first SSE byte of a held stream,
direct and through each proxy: if a proxy buffered, its first byte would wait for the hold.

    .venv/bin/python scripts/bench_proxy.py [--requests 300] [--json artifacts/bench_proxy.json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import httpx
from tqdm import tqdm

from ccwarm.harness import REPO, mitmdump
from ccwarm.testing.synthetic import SessionGenerator, SessionSpec
from ccwarm.testing.upstream import RecordingUpstream


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def first_sse_byte(client: httpx.Client, body: bytes, headers: dict[str, str]) -> tuple[float, float]:
    """Seconds to the first body byte and to the end of the stream."""
    start = time.perf_counter()
    with client.stream("POST", "/v1/messages?beta=true", content=body, headers=headers) as resp:
        first = None
        for _ in resp.iter_raw():
            if first is None:
                first = time.perf_counter() - start
        return first or 0.0, time.perf_counter() - start


def compare_timing(requests: list, rounds: int = 5) -> dict[str, float]:
    """What the stability worker spends per request, off the request path: parse + compare."""
    from ccwarm import stability

    raws = [r.raw() for r in requests]
    samples = []
    for _ in range(rounds):
        tracker = stability.StabilityTracker()
        for r, raw in zip(requests, raws):
            started = time.perf_counter()
            tracker.observe(json.loads(raw), r.headers)
            samples.append((time.perf_counter() - started) * 1000)
    return {"request_kb": len(raws[0]) / 1024, "p50_ms": statistics.median(samples), "max_ms": max(samples)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=300, help="requests per variant")
    ap.add_argument("--streams", type=int, default=20, help="SSE first-byte samples per variant")
    ap.add_argument("--hold", type=float, default=0.3, help="seconds the upstream holds a stream after its first event")
    ap.add_argument("--json", type=Path, default=REPO / "artifacts" / "bench_proxy.json")
    args = ap.parse_args()

    gen = SessionGenerator(SessionSpec(seed=7, turns=2))
    first = gen.main_turns()[0]
    requests = []
    for i in range(args.requests):
        body = dict(first.body, stream=False)
        body["system"] = [
            dict(body["system"][0], text=body["system"][0]["text"].replace("cch=", f"cch={i:05x}"[:9] + "x"))
        ] + body["system"][1:]
        requests.append(json.dumps(body).encode())
    size = sum(map(len, requests)) / len(requests)
    headers = {**first.headers, "content-type": "application/json"}

    variants: dict[str, tuple[str, ...]] = {"mitmdump (no addon)": (), "normalize": ("addons/normalize.py",)}
    if (REPO / "addons" / "stability.py").exists():
        variants["normalize + stability"] = ("addons/normalize.py", "addons/stability.py")

    upstream = RecordingUpstream(hold_seconds=args.hold, hold_always=True)
    results: dict[str, dict] = {}
    with contextlib.ExitStack() as stack:
        stack.enter_context(upstream.serve())
        urls = {"direct": f"http://127.0.0.1:{upstream.port}"}
        for name, scripts in variants.items():
            port, _ = stack.enter_context(mitmdump(upstream.port, *scripts, options=("termlog_verbosity=warn",)))
            urls[name] = f"http://127.0.0.1:{port}"
        clients = {name: stack.enter_context(httpx.Client(base_url=url, timeout=60)) for name, url in urls.items()}

        timings: dict[str, list[float]] = {name: [] for name in urls}
        for client in clients.values():  # warm-up: connections, imports, first-request costs
            for raw in requests[:10]:
                client.post("/v1/messages?beta=true", content=raw, headers=headers).raise_for_status()
        order = list(clients)
        for i, raw in enumerate(tqdm(requests, desc="90 KB requests", unit="req")):
            for name in order[i % len(order) :] + order[: i % len(order)]:
                t = time.perf_counter()
                clients[name].post("/v1/messages?beta=true", content=raw, headers=headers).raise_for_status()
                timings[name].append((time.perf_counter() - t) * 1e3)
            upstream.requests.clear()

        sse: dict[str, list[tuple[float, float]]] = {name: [] for name in urls}
        stream_body = json.dumps(dict(first.body, stream=True)).encode()
        for _ in tqdm(range(args.streams), desc="SSE first byte", unit="stream"):
            for name, client in clients.items():
                sse[name].append(first_sse_byte(client, stream_body, headers))
            upstream.requests.clear()

    base = statistics.median(timings["mitmdump (no addon)"])
    print(
        f"\nRequest size {size / 1024:.1f} KB, {args.requests} requests per variant, upstream holds streams "
        f"{args.hold * 1e3:.0f} ms\n"
    )
    print(f"{'variant':<24}{'p50 ms':>9}{'p99 ms':>9}{'added p50':>11}{'SSE 1st byte p50':>18}{'SSE end p50':>13}")
    for name in urls:
        p50, p99 = statistics.median(timings[name]), percentile(timings[name], 99)
        firsts = [f * 1e3 for f, _ in sse[name]]
        ends = [e * 1e3 for _, e in sse[name]]
        added = p50 - base if name not in ("direct", "mitmdump (no addon)") else None
        results[name] = {
            "p50_ms": p50,
            "p99_ms": p99,
            "added_p50_ms": added,
            "sse_first_byte_p50_ms": statistics.median(firsts),
            "sse_end_p50_ms": statistics.median(ends),
        }
        added_s = f"{added:+.2f}" if added is not None else "-"
        print(
            f"{name:<24}{p50:>9.2f}{p99:>9.2f}{added_s:>11}{statistics.median(firsts):>18.2f}{statistics.median(ends):>13.2f}"
        )
    compare = compare_timing(SessionGenerator(SessionSpec(turns=10)).main_turns())
    print(
        f"\nstability parse + compare of a ~{compare['request_kb']:.0f} KB request, in process: "
        f"p50 {compare['p50_ms']:.2f} ms, max {compare['max_ms']:.2f} ms"
    )
    # Plain mitmdump buffers SSE (mitmproxy's default): it is the reference, not a failure.
    buffered = [n for n in urls if results[n]["sse_first_byte_p50_ms"] > args.hold * 1e3 * 0.8]
    ours = [n for n in buffered if n in variants and variants[n]]
    print("\nSSE buffering:", ", ".join(f"{n}: {'BUFFERED' if n in buffered else 'streamed'}" for n in urls))

    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(
        json.dumps(
            {
                "machine": {
                    "platform": platform.platform(),
                    "python": platform.python_version(),
                    "cpus": __import__("os").cpu_count(),
                },
                "request_bytes": size,
                "requests_per_variant": args.requests,
                "hold_ms": args.hold * 1e3,
                "variants": results,
                "stability_compare": compare,
                "sse_buffered": buffered,
                "sse_buffered_by_addons": ours,
            },
            indent=2,
        )
    )
    print(f"wrote {args.json}")
    return 1 if ours else 0


if __name__ == "__main__":
    sys.exit(main())
