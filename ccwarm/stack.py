"""The chain a user runs, started from code: the companion server and a mitmdump before it.

Benchmarks, the soak and the e2e script all need the same thing, on free loopback ports and
always stopped: `proxy_chain(...)` is that one way. (`make run` starts the same two processes
in the foreground with its banner: scripts/run_stack.py.)
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from ccwarm.harness import mitmdump
from ccwarm.server_proc import ServerProcess, companion_server


@dataclass(frozen=True)
class ProxyChain:
    server: ServerProcess
    proxy_port: int
    proxy_log: Path

    @property
    def proxy_url(self) -> str:
        return f"http://127.0.0.1:{self.proxy_port}"


@contextlib.contextmanager
def proxy_chain(
    server_args: Sequence[str],
    *,
    server_log: Path,
    addons: Sequence[str] = ("addons/normalize.py",),
    proxy_options: Sequence[str] = ("termlog_verbosity=warn",),
    proxy_log: Path | None = None,
) -> Iterator[ProxyChain]:
    """`python -m cache_backend SERVER_ARGS` and `mitmdump -s ADDONS` in reverse mode before it."""
    with (
        companion_server(*server_args, log=server_log) as server,
        mitmdump(server.port, *addons, options=tuple(proxy_options), log=proxy_log) as (port, log),
    ):
        yield ProxyChain(server, port, log)
