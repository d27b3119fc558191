"""`make run`'s launcher (scripts/run_stack.py) as a user starts it: server and proxy come up,
Claude-Code-shaped requests are answered through both (billing block stripped, prefix restored on
the next turn), the banner shows the claude command line, and Ctrl-C or SIGTERM stops both."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import anthropic

from ccwarm.harness import REPO, free_port
from ccwarm.testing.synthetic import SessionGenerator, SessionSpec
from ccwarm.testing.upstream import RecordingUpstream


class Launcher:
    """scripts/run_stack.py as a subprocess; its output collected line by line."""

    def __init__(self, *args: str, sigint_ignored: bool = False) -> None:
        # Its own process group, so cleanup reaches the server and proxy it starts. A shell starts
        # a background job (`make run &`) with SIGINT ignored: `sigint_ignored` does the same.
        def preexec() -> None:
            if sigint_ignored:
                signal.signal(signal.SIGINT, signal.SIG_IGN)

        self.proc = subprocess.Popen(
            [sys.executable, "scripts/run_stack.py", *args],
            cwd=REPO,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            preexec_fn=preexec,
        )
        self.lines: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def wait_for(self, text: str, timeout: float = 180.0) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.output:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"{text!r} never appeared (rc={self.proc.poll()}):\n{self.output[-3000:]}")
            time.sleep(0.1)

    def stop(self) -> None:
        """Ctrl-C as a user would; then SIGKILL for anything of its group still alive."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(30)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()


def listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def ask(client: anthropic.Anthropic, req) -> anthropic.types.Message:
    b = req.body
    return client.messages.create(
        model=b["model"],
        max_tokens=4,
        system=b["system"],
        tools=b["tools"],
        messages=b["messages"],
        extra_headers=req.headers,
    )


def test_make_run_serves_claude_code_through_the_proxy(tiny_model_dir: Path, tmp_path: Path) -> None:
    proxy_port, server_port = free_port(), free_port()
    run = Launcher(
        "--proxy-port",
        str(proxy_port),
        "--server-port",
        str(server_port),
        "--model",
        str(tiny_model_dir),
        "--cache-dir",
        str(tmp_path / "cache"),
    )
    try:
        run.wait_for("Ctrl-C stops everything")
        assert (
            f"ANTHROPIC_BASE_URL=http://127.0.0.1:{proxy_port} ANTHROPIC_API_KEY=local "
            "ANTHROPIC_MODEL=claude-ccwarm-local "
            "CLAUDE_CODE_MAX_CONTEXT_TOKENS=65536 CLAUDE_CODE_MAX_OUTPUT_TOKENS=8192 "
            "CLAUDE_STREAM_IDLE_TIMEOUT_MS=1800000 "
            "API_TIMEOUT_MS=1800000 claude"
        ) in run.output
        client = anthropic.Anthropic(base_url=f"http://127.0.0.1:{proxy_port}", api_key="local", max_retries=0)
        first, second = SessionGenerator(
            SessionSpec(seed=5, turns=2, tools_json_bytes=20_000, system_bytes=2_000)
        ).main_turns()
        cold = ask(client, first)
        warm = ask(client, second)
        assert cold.usage.cache_read_input_tokens == 0 and cold.usage.input_tokens > 3000
        # The billing block (cch differs between the two) is gone, so all of turn 1 is restored.
        assert warm.usage.cache_read_input_tokens >= cold.usage.input_tokens - 1, warm.usage
        run.wait_for("normalize: dropped system[0]: billing header")
        run.wait_for(f"restored={warm.usage.cache_read_input_tokens} ")  # the server's per-request line
        run.proc.send_signal(signal.SIGINT)
        assert run.proc.wait(60) == 0, run.output[-3000:]
        assert not listening(proxy_port) and not listening(server_port)
        assert "Traceback" not in run.output, run.output[-3000:]  # Ctrl-C is a normal stop
    finally:
        run.stop()


def test_make_run_with_the_bundled_model_answers_the_real_cli_in_seconds(tmp_path: Path) -> None:
    """First contact as the README tells it: `make run` with no model (the bundled SmolLM2 is
    converted into a fresh cache), its banner's line (bare mode: a prompt inside the 8k tokens the
    model was trained on), the real `claude -p "say hi"`, sampled at the model card's settings."""
    from ccwarm.testing.claude_runs import ensure_cli

    cli = ensure_cli()
    home, work = tmp_path / "home", tmp_path / "work"
    home.mkdir()
    work.mkdir()
    (home / ".claude.json").write_text('{"hasCompletedOnboarding": true}')
    proxy_port = free_port()
    run = Launcher(
        "--proxy-port", str(proxy_port), "--server-port", str(free_port()), "--cache-dir", str(tmp_path / "cache")
    )
    try:
        run.wait_for("Ctrl-C stops everything", timeout=600)
        line = next(x for x in run.output.splitlines() if x.strip().startswith("ANTHROPIC_BASE_URL="))
        assert line.split()[-2:] == ["CLAUDE_CODE_SIMPLE=1", "claude"], line
        sampling = "temperature 0.2, top_p 0.9, repetition_penalty 1.1"
        assert f"sampling where a request sets none: {sampling} (from " in run.output
        env = {k: v for k, v in os.environ.items() if not k.startswith(("ANTHROPIC_", "CLAUDE"))}
        env.update(dict(part.split("=", 1) for part in line.split()[:-1]))
        env.update({"HOME": str(home), "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1", "NO_COLOR": "1"})
        answer = subprocess.run(
            [str(cli), "-p", "say hi"], cwd=work, env=env, capture_output=True, text=True, timeout=600
        )
        assert answer.returncode == 0 and answer.stdout.strip(), (answer.stdout, answer.stderr[-2000:])
        prompts = [int(n) for n in re.findall(r" prompt=(\d+) restored=", run.output)]
        assert len(prompts) == 1 and 500 < prompts[0] < 8192, run.output[-3000:]
    finally:
        run.stop()


def test_make_run_with_upstream_starts_only_the_proxy_and_stops_on_sigterm(tmp_path: Path) -> None:
    upstream = RecordingUpstream()
    proxy_port = free_port()
    with upstream.serve():
        run = Launcher("--proxy-port", str(proxy_port), "--upstream", f"http://127.0.0.1:{upstream.port}")
        try:
            run.wait_for("Ctrl-C stops everything", timeout=60)
            assert "starting the companion server" not in run.output
            client = anthropic.Anthropic(base_url=f"http://127.0.0.1:{proxy_port}", api_key="local", max_retries=0)
            req = SessionGenerator(
                SessionSpec(seed=6, turns=1, tools_json_bytes=5_000, system_bytes=1_000)
            ).main_turns()[0]
            ask(client, req)
            assert b"x-anthropic-billing-header" not in upstream.requests[-1].body
            run.proc.send_signal(signal.SIGTERM)
            assert run.proc.wait(30) == 0, run.output[-3000:]
            assert not listening(proxy_port)
        finally:
            run.stop()


def test_make_run_reports_a_server_that_cannot_start(tmp_path: Path) -> None:
    run = Launcher(
        "--proxy-port", str(free_port()), "--server-port", str(free_port()), "--model", str(tmp_path / "missing")
    )
    try:
        assert run.proc.wait(120) == 1
        assert "run: server exited with" in run.output, run.output[-3000:]
    finally:
        run.stop()


def test_make_run_started_as_a_background_job_stops_on_ctrl_c_and_mitmweb_url_opens(tmp_path: Path) -> None:
    """Started with SIGINT ignored (as `make run &` is), SIGINT still stops it; with --web the
    banner's UI address carries a token that mitmweb accepts, and the bare address is refused."""
    import httpx

    upstream = RecordingUpstream()
    proxy_port = free_port()
    with upstream.serve():
        run = Launcher(
            "--proxy-port",
            str(proxy_port),
            "--upstream",
            f"http://127.0.0.1:{upstream.port}",
            "--web",
            sigint_ignored=True,
        )
        try:
            run.wait_for("Ctrl-C stops everything", timeout=60)
            url = next(w for w in run.output.split() if w.startswith("http://127.0.0.1:8081/?token="))
            assert httpx.get(url, timeout=10).status_code == 200
            assert httpx.get("http://127.0.0.1:8081/flows", timeout=10).status_code == 403
            run.proc.send_signal(signal.SIGINT)
            assert run.proc.wait(30) == 0, run.output[-3000:]
            assert not listening(proxy_port)
        finally:
            run.stop()
