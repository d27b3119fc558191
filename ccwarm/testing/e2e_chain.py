"""The chain an end-to-end run drives the real CLI through, and the model it serves: the companion
server on the forced-replies script, mitmdump with normalize (and the stability addon when the
checkout has it) before it, both on free loopback ports. Kept apart from the runs so the headless
sessions and the tmux UI start the very same chain. Used by scripts/e2e_claude_code.py.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import httpx

from ccwarm.harness import REPO
from ccwarm.stack import proxy_chain
from ccwarm.testing.e2e_records import Stack, request_figures

STABILITY_ADDON = "addons/stability.py"
MAX_CONTEXT = 200000  # Claude Code's first prompt alone is ~29k (-p) / ~32k (interactive) tokens here


@contextlib.contextmanager
def chain(
    root: Path,
    model_dir: Path,
    script: Path,
    *,
    normalize: bool,
    cache_args: tuple[str, ...] = (),
    max_context: int = MAX_CONTEXT,
) -> Iterator[Stack]:
    """Companion server + mitmdump before it, on free loopback ports; both stopped when the block ends."""
    server_log, mitm_log, flows = root / "server.log", root / "mitmdump.log", root / "flows.mitm"
    args = (
        "--model",
        str(model_dir),
        "--cache-dir",
        str(root / "cache"),
        "--max-context",
        str(max_context),
        "--max-output-tokens",
        "1024",
        "--test-forced-replies",
        str(script),
        *cache_args,
    )
    scripts = ["addons/normalize.py"]
    stability = (REPO / STABILITY_ADDON).exists()
    if stability:
        scripts.append(STABILITY_ADDON)
    options = [f"save_stream_file={flows}", f"normalize={'true' if normalize else 'false'}"]
    if stability:
        options.append("stability_wait_ms=500")  # flags on the flow before -w saves it
    with proxy_chain(args, server_log=server_log, addons=scripts, proxy_options=options, proxy_log=mitm_log) as chain:
        stack = Stack(chain.proxy_port, chain.server.url, server_log, mitm_log, flows, normalize, stability)
        try:
            yield stack
        finally:
            with contextlib.suppress(httpx.HTTPError, ValueError, KeyError):
                stack.figures = request_figures(chain.server.url)


def tiny_model(root: Path) -> Path:
    """The tiny random-weight test model, written under `root`."""
    from cache_backend.testing.tiny_model import make_tiny_model

    return Path(make_tiny_model(root / "tiny-model", seed=0))


def resolve_model(model: str | None, root: Path) -> Path:
    """The folder the server loads: the tiny model when none is named, else a folder or a Hugging Face id."""
    if not model:
        return tiny_model(root)
    if Path(model).is_dir():
        return Path(model).resolve()
    from mlx_lm.utils import hf_repo_to_path

    return Path(hf_repo_to_path(model))
