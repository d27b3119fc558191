#!/usr/bin/env python3
"""`make run`: the companion MLX server and the proxy in front of it, stopped together.

Without --upstream: starts `python -m cache_backend` (the bundled default model unless --model)
and `mitmdump -s addons/normalize.py -s addons/stability.py` in reverse mode before it.
With --upstream URL: only the proxy, in front of any Anthropic-compatible server.
Prints the one command line that points Claude Code at the proxy.
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
# SmolLM2 was trained on 8k tokens; Claude Code's first prompt is ~22k. Raised so the chain works.
DEFAULT_MAX_CONTEXT = 32768


def wait_healthy(url: str, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"run: the server exited with code {proc.returncode} before it was ready")
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"run: the server did not answer {url} within {timeout:.0f}s")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--proxy-port", type=int, default=8082)
    ap.add_argument("--server-port", type=int, default=8080)
    ap.add_argument("--upstream", help="Anthropic-compatible server to proxy instead of starting the companion server")
    ap.add_argument("--model", help="mlx-lm model directory or Hugging Face repo id (default: bundled SmolLM2-135M)")
    ap.add_argument("--max-context", type=int, default=DEFAULT_MAX_CONTEXT)
    ap.add_argument("--web", action="store_true", help="use mitmweb (UI on http://127.0.0.1:8081) instead of mitmdump")
    args = ap.parse_args()

    procs: list[subprocess.Popen] = []

    def stop(*_: object) -> None:
        for p in reversed(procs):
            if p.poll() is None:
                p.terminate()
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()

    signal.signal(signal.SIGTERM, lambda *_: (stop(), sys.exit(0)))
    try:
        upstream = args.upstream
        if upstream is None:
            cmd = [sys.executable, "-m", "cache_backend", "--port", str(args.server_port), "--max-context", str(args.max_context)]
            if args.model:
                cmd += ["--model", args.model]
            print(f"run: starting the companion server on 127.0.0.1:{args.server_port} (first run converts the default model)", flush=True)
            procs.append(subprocess.Popen(cmd, cwd=REPO))
            upstream = f"http://127.0.0.1:{args.server_port}"
            wait_healthy(f"{upstream}/health", procs[-1], timeout=1800)
        scripts = ["addons/normalize.py"]
        if (REPO / "addons" / "stability.py").exists():
            scripts.append("addons/stability.py")
        tool = "mitmweb" if args.web else "mitmdump"
        cmd = [str(BIN / tool), "--mode", f"reverse:{upstream}@{args.proxy_port}", "--listen-host", "127.0.0.1"]
        for s in scripts:
            cmd += ["-s", str(REPO / s)]
        procs.append(subprocess.Popen(cmd, cwd=REPO))
        time.sleep(1.0)
        print(
            f"""
ccwarm is running: proxy 127.0.0.1:{args.proxy_port} -> {upstream}

Point Claude Code at the proxy:

    ANTHROPIC_BASE_URL=http://127.0.0.1:{args.proxy_port} ANTHROPIC_API_KEY=local claude

(any API key works unless the server was started with --api-key). The proxy strips the billing
header, so CLAUDE_CODE_ATTRIBUTION_HEADER=0 is not needed; it is harmless if set.
Watch this log: one 'normalize: dropped system[0] ...' line per request, a warning for anything
else that breaks the cached prefix, and the server's per-request line with restored/prefilled tokens.
Ctrl-C stops everything.
""",
            flush=True,
        )
        while all(p.poll() is None for p in procs):
            time.sleep(0.5)
        return next(p.returncode for p in procs if p.poll() is not None) or 0
    except KeyboardInterrupt:
        return 0
    finally:
        stop()


if __name__ == "__main__":
    sys.exit(main())
