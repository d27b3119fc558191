"""`python -m cache_backend` / `ccwarm-server`: load a model and serve the Anthropic Messages API.

Why a separate entry module: argument parsing, model loading and process setup (logging,
uvicorn) are kept out of the app so tests and other tools can build the app from parts.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cache_backend.files import default_cache_dir

if TYPE_CHECKING:
    from cache_backend.prefix_cache import PrefixCache

log = logging.getLogger("cache_backend")

DEFAULT_CACHE_DIR = default_cache_dir()


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="ccwarm-server", description="Anthropic Messages API server on mlx-lm.")
    ap.add_argument(
        "--model",
        help="mlx-lm model directory or Hugging Face repo id (default: SmolLM2-135M-Instruct, converted on first use)",
    )
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8080)
    ap.add_argument(
        "--cache-dir",
        type=Path,
        default=DEFAULT_CACHE_DIR,
        help="where the default model and caches live (default: %(default)s)",
    )
    ap.add_argument(
        "--max-output-tokens",
        type=int,
        default=32000,
        help="cap on each request's max_tokens (default: %(default)s, what Claude Code asks for); 0: only the "
        "context limit caps it",
    )
    ap.add_argument(
        "--max-body",
        default="32MB",
        help="largest request body accepted; larger ones get a 413 before they are read (default: %(default)s, the "
        "Anthropic API's limit)",
    )
    ap.add_argument("--api-key", default=None, help="if set, require this key (x-api-key or Authorization: Bearer)")
    ap.add_argument(
        "--max-context",
        type=int,
        default=None,
        help="prompt length limit in tokens (default: the model's max_position_embeddings)",
    )
    ap.add_argument(
        "--ping-interval", type=float, default=5.0, help="seconds of silence before an SSE ping (default: %(default)s)"
    )
    ap.add_argument(
        "--prefill-chunk",
        type=int,
        default=512,
        help="most tokens per prefill step (steps are sized to take about --chunk-seconds)",
    )
    ap.add_argument(
        "--chunk-seconds",
        type=float,
        default=1.0,
        help="target time between two looks for a dropped client during prefill (between steps, and on the CPU "
        "also between layers): it frees the worker within about this long (default: %(default)s)",
    )
    ap.add_argument(
        "--checkpoint-seconds",
        type=float,
        default=30.0,
        help="during a long prefill, keep what is done after this many seconds, then after twice as long, and "
        "so on, so a crash loses about half of it at most (default: %(default)s)",
    )
    ap.add_argument(
        "--progress-after",
        type=float,
        default=3.0,
        metavar="SECONDS",
        help="a prefill longer than this streams its progress as a thinking block, which also keeps "
        "Claude Code's stream watchdog from dropping it (default: %(default)s; -1: never)",
    )
    ap.add_argument(
        "--structured-deadline",
        type=float,
        default=60.0,
        help="seconds allowed for a json_schema (structured output) request",
    )
    ap.add_argument(
        "--cache-memory",
        default="20%",
        help="RAM for prefix KV snapshots: bytes (e.g. 8GB) or a percent of RAM (default: %(default)s); 0 disables "
        "the cache",
    )
    ap.add_argument(
        "--cache-disk",
        default="20GB",
        help="disk for persisted snapshots under --cache-dir (default: %(default)s); 0 keeps them in memory only",
    )
    ap.add_argument(
        "--cache-store",
        choices=("blocks", "snapshots"),
        default="blocks",
        help="blocks: KV kept once in token blocks shared by every prompt (models whose layers are all plain "
        "KV caches); snapshots: one whole copy per snapshot (always used for sliding-window and SSM models)",
    )
    ap.add_argument(
        "--cache-block-tokens",
        type=int,
        default=256,
        help="tokens per KV block with --cache-store blocks (default: %(default)s)",
    )
    ap.add_argument(
        "--attention",
        choices=("auto", "numpy", "mlx"),
        default="auto",
        help="auto: on the CPU compute float32 attention with NumPy (MLX's CPU softmax is ~9x slower); mlx: always "
        "mlx-lm's",
    )
    ap.add_argument(
        "--decode",
        choices=("auto", "numpy", "mlx"),
        default="auto",
        help="auto: on the CPU decode float32 Llama models with NumPy (~2x faster than MLX's per-op dispatch "
        "there); mlx: always the model's own forward pass",
    )
    ap.add_argument(
        "--sampling",
        choices=("model", "api"),
        default="model",
        help="for the settings a request leaves unset (Claude Code sends no temperature with thinking on): "
        "model: the model's generation_config.json (temperature, top_p, top_k, min_p, repetition_penalty), "
        "as vLLM does; "
        "api: the Anthropic API's (temperature 1, no truncation)",
    )
    ap.add_argument("--log-level", default="INFO")
    test = ap.add_argument_group("test-only options (never use in production)")
    test.add_argument(
        "--test-forced-replies",
        type=Path,
        default=None,
        metavar="FILE",
        help="TEST ONLY: JSON list of {when, reply} entries decoded by forcing tokens "
        "(see cache_backend/testing/scripted.py)",
    )
    test.add_argument(
        "--test-slow-prefill",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="TEST ONLY: make every forward pass sleep this long per input token, to simulate a slow model",
    )
    return ap


def _context_limit(config: dict[str, Any]) -> int | None:
    for cfg in (config, config.get("text_config") or {}):
        for key in ("max_position_embeddings", "max_sequence_length", "seq_length", "n_positions"):
            v = cfg.get(key)
            if isinstance(v, int) and v > 0:
                return v
    return None


_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}


def parse_size(text: str, *, what: str) -> int:
    """Bytes from `8GB`, `512MiB`, `1000000` or `25%` (of physical RAM)."""
    t = text.strip().upper().replace(" ", "")
    try:
        if t.endswith("%"):
            ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
            return int(ram * float(t[:-1]) / 100)
        num = t.rstrip("KMGTIB")
        return int(float(num) * _UNITS[t[len(num) :]])
    except (ValueError, KeyError):
        raise SystemExit(f"{what}: cannot read {text!r} as a size (examples: 8GB, 512MiB, 25%)") from None


def _model_dir(model_ref: str) -> Path | None:
    """The local folder behind a --model value (for the cache's model fingerprint)."""
    if Path(model_ref).is_dir():
        return Path(model_ref)
    try:
        from mlx_lm.utils import hf_repo_to_path

        return hf_repo_to_path(model_ref)
    except Exception:
        return None


def _served_name(model: str) -> str:
    p = Path(model)
    return p.name if p.exists() else model


def _prefix_cache(args: argparse.Namespace, model: Any, model_ref: str, memory: int, disk: int) -> PrefixCache:
    """The block store where the model's caches can be cut into blocks, whole snapshots otherwise."""
    from mlx_lm.models.cache import make_prompt_cache

    from cache_backend.kv_block_keys import blockable

    model_dir = _model_dir(model_ref)
    if model_dir is None and disk:
        log.warning("cannot locate the files of %s: the KV cache stays in memory only", model_ref)
    disk_dir = args.cache_dir if disk else None
    if args.cache_store == "blocks":
        if blockable(make_prompt_cache(model)):
            from cache_backend.block_cache import BlockCache

            return BlockCache(
                memory, disk_dir=disk_dir, disk_budget=disk, model_dir=model_dir, block_size=args.cache_block_tokens
            )
        log.info("this model's KV cache cannot be cut into blocks (sliding window or SSM layers): whole snapshots")
    from cache_backend.snapshot_cache import SnapshotCache

    return SnapshotCache(memory, disk_dir=disk_dir, disk_budget=disk, model_dir=model_dir)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not 16 <= args.cache_block_tokens <= 8192:
        parser.error(f"--cache-block-tokens {args.cache_block_tokens}: choose 16 to 8192 tokens")
    if argv is None:  # a process of its own: re-run with OpenBLAS preloaded before MLX loads
        from cache_backend.fast_blas import reexec_with_fast_blas

        reexec_with_fast_blas()
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    from cache_backend.fast_blas import blas_in_use, matmul_gflops

    log.info("BLAS: %s; float32 matmul %.0f GFLOP/s", blas_in_use(), matmul_gflops())

    model_ref = args.model
    if not model_ref:
        from cache_backend.default_model import ensure_default_model

        model_ref = str(ensure_default_model(args.cache_dir))
        log.info("no --model given: serving the default model at %s", model_ref)

    from cache_backend.sampling import SamplingDefaults

    sampling = SamplingDefaults()
    if args.sampling == "model":
        try:
            sampling = SamplingDefaults.from_model_dir(_model_dir(model_ref))
        except ValueError as e:
            parser.error(f"--sampling model: {e}")
    log.info("sampling where a request sets none: %s", sampling.describe())

    from mlx_lm import load

    from cache_backend.app import ServerConfig, ServerState, create_app
    from cache_backend.engine import Engine
    from cache_backend.metrics import ServerMetrics
    from cache_backend.prefix_cache import NoCache
    from cache_backend.render import Renderer

    model, tokenizer, config = load(model_ref, return_config=True)
    from cache_backend.cpu_attention import install as install_attention

    log.info("attention: %s", install_attention(model, args.attention))
    from cache_backend.cpu_decode import decoder_for

    decoder = decoder_for(model, args.decode)
    # The server enforces its own context limit; silence transformers' "longer than maximum" warning.
    tokenizer.model_max_length = sys.maxsize
    trained = _context_limit(config)
    limit = args.max_context or trained
    if trained and limit > trained:
        log.warning(
            "context limit raised to %d tokens, beyond the %d this model was trained on: answers to longer "
            "prompts will be poor. For real work pass --model with a long-context model "
            "(e.g. an mlx-community Qwen2.5-Coder build).",
            limit,
            trained,
        )
    renderer = Renderer(tokenizer, context_limit=limit)
    params_hook = None
    if args.test_forced_replies:
        from cache_backend.testing.scripted import load_script, scripted_replies

        script = load_script(args.test_forced_replies)
        log.warning(
            "TEST ONLY: scripted replies from %s are active (%d entries)", args.test_forced_replies, len(script)
        )
        params_hook = scripted_replies(script, renderer.encode, getattr(tokenizer, "eos_token_id", None))
    memory = parse_size(args.cache_memory, what="--cache-memory")
    disk = parse_size(args.cache_disk, what="--cache-disk")
    prefix_cache: PrefixCache = NoCache()
    if memory > 0:
        prefix_cache = _prefix_cache(args, model, model_ref, memory, disk)
    log.info("prefix cache: %s", prefix_cache.describe())
    on_output = renderer.remember_output
    disk_dir = prefix_cache.disk_dir
    if disk_dir is not None:
        from cache_backend.token_log import TokenLog, tokenizer_id

        outputs = TokenLog(disk_dir / "outputs.jsonl")
        for text, tokens in outputs.load():
            renderer.remember_output(text, tokens)

        def on_output(text: str, tokens: list[int]) -> None:
            renderer.remember_output(text, tokens)
            outputs.append(text, tokens)

        # Segment tokens depend on the tokenizer files too, which the model fingerprint omits.
        segments = TokenLog(disk_dir / f"segments-{tokenizer_id(_model_dir(model_ref))}.jsonl", limit=4096)
        for key, tokens in segments.load():
            renderer.remember_segment(key, tokens)
        renderer.on_segment = segments.append

    if args.test_slow_prefill:
        from cache_backend.testing.slow_model import SlowModel

        log.warning("TEST ONLY: every forward pass sleeps %.4fs per input token", args.test_slow_prefill)
        model = SlowModel(model, args.test_slow_prefill)
        decoder = None  # its steps must go through the slowed forward pass
    metrics = ServerMetrics()
    engine = Engine(
        model,
        tokenizer,
        prefix_cache,
        prefill_chunk=args.prefill_chunk,
        chunk_seconds=args.chunk_seconds,
        checkpoint_seconds=args.checkpoint_seconds,
        on_output=on_output,
        metrics=metrics,
        decoder=decoder,
    )
    engine.start()
    name = _served_name(model_ref)
    cfg = ServerConfig(
        model_name=name,
        model_aliases=tuple({model_ref, str(Path(model_ref).resolve()) if Path(model_ref).exists() else model_ref}),
        api_key=args.api_key,
        max_output_tokens=args.max_output_tokens or None,
        max_body_bytes=parse_size(args.max_body, what="--max-body"),
        max_context=limit,
        ping_interval=args.ping_interval,
        structured_deadline_s=args.structured_deadline,
        progress_after_s=args.progress_after,
        sampling=sampling,
        params_hook=params_hook,
    )
    stopped = threading.Event()

    def shutdown() -> None:
        if stopped.is_set():
            return
        stopped.set()
        engine.stop()
        prefix_cache.close()  # let queued snapshot writes finish
        log.info("stopped; snapshots written")

    app = create_app(ServerState(config=cfg, engine=engine, renderer=renderer, metrics=metrics), on_shutdown=shutdown)
    log.info("serving %s on http://%s:%d (context limit %s tokens)", name, args.host, args.port, limit)

    import uvicorn

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            # Before uvicorn waits for open responses: stop the running prefill now (it keeps
            # what it computed) instead of finishing a long prompt nobody may wait for.
            engine.begin_stop()
            super().handle_exit(sig, frame)

    try:
        Server(
            uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level.lower(), access_log=False)
        ).run()
    except KeyboardInterrupt:
        # uvicorn re-raises Ctrl-C once it has shut down; the shutdown hook already wrote the
        # snapshots, so this is a normal stop, not a traceback.
        return 130
    finally:
        shutdown()  # when uvicorn returns without a signal (e.g. the port was taken)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
