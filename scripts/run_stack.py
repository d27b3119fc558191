#!/usr/bin/env python3
"""`make run`: the companion MLX server and the proxy in front of it, stopped together.

Without --upstream: starts `python -m cache_backend` (the bundled default model unless --model)
and `mitmdump -s addons/normalize.py -s addons/stability.py` in reverse mode before it.
With --upstream URL: only the proxy, in front of any Anthropic-compatible server.
Prints the one command line that points Claude Code at the proxy. Ctrl-C (or SIGTERM) stops both.
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import subprocess
import sys
import time

from ccwarm.harness import BIN, REPO, stop_process, wait_for_port
from ccwarm.server_proc import ServerProcess

# SmolLM2 was trained on 8k tokens, but Claude Code's full first prompt is 12-22k tokens and every
# prompt grows each turn: raised so the whole chain works out of the box.
DEFAULT_MAX_CONTEXT = 65536
ADDONS = ("addons/normalize.py", "addons/stability.py")


WEB_PORT = 8081


def web_token() -> tuple[str, str]:
    """A fresh token for mitmweb's UI and its argon2 hash for `web_password` (so mitmweb neither
    invents its own token, which only its log would show, nor warns about a plain password)."""
    import secrets

    from argon2 import PasswordHasher

    token = secrets.token_hex(16)
    return token, PasswordHasher().hash(token)


DEFAULT_MAX_OUTPUT = 8192  # the server's output cap, told to Claude Code so its limits match


def claude_env(proxy_port: int, max_context: int | None, max_output: int | None, bare: bool = False) -> str:
    """The environment line that points Claude Code at the proxy with limits that match the server.

    - a model name the CLI does not know, so it reads the window from CLAUDE_CODE_MAX_CONTEXT_TOKENS
      (it assumes 1M tokens for unknown names, and the catalog's window for known ones) and
      compacts before the server must refuse; any claude-* name is served by the local model;
    - CLAUDE_CODE_MAX_OUTPUT_TOKENS = the server's cap, so a cut answer is reported against it;
    - CLAUDE_STREAM_IDLE_TIMEOUT_MS / API_TIMEOUT_MS: 30 minutes, for CPU prefills of a long first
      prompt (the progress block keeps the stream alive anyway; these cover a queued request);
    - bare: CLAUDE_CODE_SIMPLE=1 (what `claude --bare` sets), for the bundled model: Claude Code's
      minimal prompt (3 tools, ~1.2k tokens) fits the 8k tokens SmolLM2 was trained on, where its
      full prompt (12-22k tokens) gets noise after a 2-minute CPU prefill.
    """
    parts = [f"ANTHROPIC_BASE_URL=http://127.0.0.1:{proxy_port}", "ANTHROPIC_API_KEY=local"]
    if max_context:
        parts += [f"ANTHROPIC_MODEL={LOCAL_MODEL_NAME}", f"CLAUDE_CODE_MAX_CONTEXT_TOKENS={max_context}"]
    if max_output:
        parts.append(f"CLAUDE_CODE_MAX_OUTPUT_TOKENS={max_output}")
    parts += ["CLAUDE_STREAM_IDLE_TIMEOUT_MS=1800000", "API_TIMEOUT_MS=1800000"]
    if bare:
        parts.append(f"{BARE_MODE}=1")
    return " ".join(parts)


LOCAL_MODEL_NAME = "claude-ccwarm-local"
BARE_MODE = "CLAUDE_CODE_SIMPLE"


def banner(proxy_port: int, upstream: str, tool: str, token: str | None = None, env_line: str = "") -> str:
    web = ""
    if tool == "mitmweb":
        web = (
            f"\nmitmweb's UI: http://127.0.0.1:{WEB_PORT}/?token={token} "
            "(flows that break the cached prefix are marked)\n"
        )
    bare = ""
    if f"{BARE_MODE}=1" in env_line.split():
        bare = (
            f"\n{BARE_MODE}=1 is `claude --bare`: Claude Code's short prompt, which the bundled 135M model\n"
            "(trained on 8k tokens) answers in seconds. Its full prompt is 12-22k tokens: a 2-minute CPU\n"
            "prefill, then noise. For real work pass a real model: make run MODEL=..."
        )
    return f"""
ccwarm is running: proxy 127.0.0.1:{proxy_port} -> {upstream}
{web}
Point Claude Code (npm install -g @anthropic-ai/claude-code; node >= 22) at the proxy:

    {env_line} claude

(any API key works unless the server was started with --api-key). The proxy strips the billing
header, so CLAUDE_CODE_ATTRIBUTION_HEADER=0 is not needed; it is harmless if set.{bare}
First start with a fresh HOME: put {{"hasCompletedOnboarding": true}} in ~/.claude.json, then
answer "Yes, I trust this folder" and "Yes" to "use this API key" (its default is No).
Watch this log: one 'normalize: dropped system[0] ...' line per request, a warning for anything
else that breaks the cached prefix, and the server's per-request line with restored/prefilled tokens.
Ctrl-C stops everything.
"""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--proxy-port", type=int, default=8082)
    ap.add_argument("--server-port", type=int, default=8080)
    ap.add_argument("--upstream", help="Anthropic-compatible server to proxy instead of starting the companion server")
    ap.add_argument("--model", help="mlx-lm model directory or Hugging Face repo id (default: bundled SmolLM2-135M)")
    ap.add_argument("--max-context", type=int, default=DEFAULT_MAX_CONTEXT)
    ap.add_argument("--max-output-tokens", type=int, default=DEFAULT_MAX_OUTPUT)
    ap.add_argument(
        "--cache-dir", help="the server's model and snapshot folder (default: the server's, ~/.cache/ccwarm)"
    )
    ap.add_argument("--web", action="store_true", help="use mitmweb (UI on http://127.0.0.1:8081) instead of mitmdump")
    args = ap.parse_args(argv)

    # SIGTERM takes the same path as Ctrl-C, so the ExitStack below stops both children. SIGINT is
    # set too: a background job (`make run &`) inherits it ignored, and could not be stopped.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    with contextlib.ExitStack() as stack:
        try:
            upstream = args.upstream
            if upstream is None:
                server_args = [
                    "--max-context",
                    str(args.max_context),
                    "--max-output-tokens",
                    str(args.max_output_tokens),
                ]
                server_args += ["--model", args.model] if args.model else []
                server_args += ["--cache-dir", args.cache_dir] if args.cache_dir else []
                print(
                    f"run: starting the companion server on 127.0.0.1:{args.server_port} "
                    "(the first run converts the default model)",
                    flush=True,
                )
                server = ServerProcess(*server_args, log_path=None, port=args.server_port, timeout=1800)
                stack.callback(server.stop)
                upstream = server.url
            tool = "mitmweb" if args.web else "mitmdump"
            cmd = [str(BIN / tool), "--mode", f"reverse:{upstream}@{args.proxy_port}", "--listen-host", "127.0.0.1"]
            for script in ADDONS:
                cmd += ["-s", str(REPO / script)]
            token = None
            if args.web:
                token, hashed = web_token()
                cmd += [
                    "--set",
                    "web_open_browser=false",
                    "--set",
                    f"web_port={WEB_PORT}",
                    "--set",
                    f"web_password={hashed}",
                ]
            proxy = subprocess.Popen(cmd, cwd=REPO)
            stack.callback(stop_process, proxy)
            wait_for_port(args.proxy_port, proxy)
            if args.web:
                wait_for_port(WEB_PORT, proxy)
            local = args.upstream is None
            env_line = claude_env(
                args.proxy_port,
                args.max_context if local else None,
                args.max_output_tokens if local else None,
                bare=local and not args.model,
            )
            print(banner(args.proxy_port, upstream, tool, token, env_line), flush=True)
            children = [proxy] + ([server.proc] if args.upstream is None else [])
            while all(p.poll() is None for p in children):
                time.sleep(0.5)
            gone = next(p for p in children if p.poll() is not None)
            print(
                f"run: the {'proxy' if gone is proxy else 'server'} exited with code {gone.returncode}; stopping",
                file=sys.stderr,
            )
            return gone.returncode or 1
        except KeyboardInterrupt:
            print("run: stopping", flush=True)
            return 0
        except (RuntimeError, TimeoutError) as e:  # a child that died or never came up
            print(f"run: {e}", file=sys.stderr)
            return 1


if __name__ == "__main__":
    sys.exit(main())
