#!/usr/bin/env python3
"""Raw model speed of the server's engine: prefill and decode tokens/s at 1k, 8k, 20k+ tokens.

Runs the server's own Engine (the single MLX worker, chunked prefill, the decode loop) with no
prefix cache, on the tiny benchmark models and on the bundled default model, once per attention
implementation (``--attention numpy mlx``: see ``cache_backend/cpu_attention.py``) and decode
step (``--decoder numpy mlx``: see ``cache_backend/cpu_decode.py``; MLX attention runs with MLX
decode only), with the BLAS the server would preload. Prints a table and writes JSON with the machine it ran on. The
default model at 20k tokens takes several minutes on a 2-core CPU.

    .venv/bin/python scripts/bench_backend.py [--sizes 1000 8000 25000] [--default-sizes 1000 8000 20000]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import queue
import shutil
import sys
import tempfile
import time
from pathlib import Path

from tqdm import tqdm

from cache_backend.engine import Engine
from cache_backend.files import default_cache_dir
from cache_backend.jobs import Failed, Finished, GenerationParams, Job, Started
from cache_backend.prompt import RenderedPrompt
from ccwarm.harness import REPO


def measure(engine: Engine, n_prompt: int, n_decode: int, seed: int) -> dict[str, float]:
    """One request of `n_prompt` random tokens; prefill and decode timed from the engine's events."""
    import numpy as np

    tokens = np.random.default_rng(seed).integers(100, 40000, n_prompt).tolist()
    prompt = RenderedPrompt(tokens=tokens, prefix_end=0, message_ends=(), generation_start=n_prompt)
    events: queue.Queue = queue.Queue()
    params = GenerationParams(max_tokens=n_decode, temperature=0.0)
    t0 = time.perf_counter()
    engine.submit(Job(prompt=prompt, params=params, sink=events.put))
    first = None
    while True:
        ev = events.get()
        if isinstance(ev, dict) and first is None:
            first = time.perf_counter()
        if isinstance(ev, Failed):
            raise RuntimeError(ev.message)
        if isinstance(ev, Finished):
            end = time.perf_counter()
            ttft = ev.ttft_s or (first - t0 if first else end - t0)
            decoded = max(ev.output_tokens - 1, 1)
            return {
                "prompt_tokens": n_prompt,
                "ttft_s": ttft,
                "prefill_tok_s": n_prompt / ttft,
                "decode_tok_s": decoded / max(end - t0 - ttft, 1e-9),
                "output_tokens": ev.output_tokens,
            }
        if isinstance(ev, Started):
            continue


def bench_model(name: str, model_dir: str, sizes: list[int], n_decode: int, attention: str, decoder: str) -> list[dict]:
    from mlx_lm import load

    from cache_backend.cpu_attention import install
    from cache_backend.cpu_decode import decoder_for

    model, tokenizer = load(model_dir)
    attention = install(model, attention)
    numpy_decoder = decoder_for(model, decoder)
    engine = Engine(model, tokenizer, prefill_chunk=512, decoder=numpy_decoder)
    engine.start()
    rows = []
    try:
        measure(engine, 64, 4, seed=0)  # warm-up: first-call costs are not prefill speed
        for n in tqdm(sizes, desc=name, unit="prompt"):
            row = measure(engine, n, n_decode, seed=n)
            row["model"] = name
            row["attention"] = attention.split()[0]
            row["decoder"] = "numpy" if numpy_decoder is not None else "mlx"
            rows.append(row)
    finally:
        engine.stop()
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 8000, 25000])
    ap.add_argument("--default-sizes", type=int, nargs="*", default=[1000, 8000, 20000])
    ap.add_argument(
        "--attention",
        nargs="+",
        choices=("auto", "numpy", "mlx"),
        default=["numpy", "mlx"],
        help="attention implementations to run side by side (default: both)",
    )
    ap.add_argument(
        "--mlx-default-sizes",
        type=int,
        nargs="*",
        default=[1000, 8000],
        help="default-model sizes for --attention mlx (its CPU attention makes 20k take an hour)",
    )
    ap.add_argument(
        "--decoder",
        nargs="+",
        choices=("numpy", "mlx"),
        default=["numpy", "mlx"],
        help="decode steps to run side by side with NumPy attention (default: both)",
    )
    ap.add_argument("--decode", type=int, default=32, help="tokens to decode per request")
    ap.add_argument("--cache-dir", type=Path, default=default_cache_dir())
    ap.add_argument("--json", type=Path, default=REPO / "artifacts" / "bench_backend.json")
    args = ap.parse_args()
    from cache_backend.fast_blas import blas_in_use, matmul_gflops, reexec_with_fast_blas

    reexec_with_fast_blas()  # the server does the same: measure what it runs
    blas = f"{blas_in_use()}; float32 matmul {matmul_gflops():.0f} GFLOP/s"
    print(f"BLAS: {blas}")

    from cache_backend.testing.tiny_model import make_tiny_model

    work = Path(tempfile.mkdtemp(prefix="ccwarm-bench-backend-"))
    models = {
        "tiny (1 layer, hidden 64; tests)": str(make_tiny_model(work / "tiny", seed=0)),
        "tiny (1 layer, hidden 512; cache bench)": str(
            make_tiny_model(work / "tiny512", seed=0, hidden_size=512, intermediate_size=2048)
        ),
    }
    rows = []
    runs = [(a, d) for a in args.attention for d in args.decoder if a != "mlx" or d == "mlx"]
    try:
        for attention, decoder in runs:
            for name, path in models.items():
                rows += bench_model(name, path, args.sizes, args.decode, attention, decoder)
            if args.default_sizes:
                from cache_backend.default_model import ensure_default_model

                rows += bench_model(
                    "SmolLM2-135M (default)",
                    str(ensure_default_model(args.cache_dir)),
                    args.mlx_default_sizes if attention == "mlx" else args.default_sizes,
                    args.decode,
                    attention,
                    decoder,
                )
    finally:
        shutil.rmtree(work, ignore_errors=True)  # only the tiny models live there

    print(
        f"\n{'model':<42}{'attention':>10}{'decoder':>8}{'prompt':>8}{'TTFT s':>9}{'prefill tok/s':>15}"
        f"{'decode tok/s':>14}"
    )
    for r in rows:
        print(
            f"{r['model']:<42}{r['attention']:>10}{r['decoder']:>8}{r['prompt_tokens']:>8}{r['ttft_s']:>9.2f}"
            f"{r['prefill_tok_s']:>15.0f}{r['decode_tok_s']:>14.1f}"
        )
    machine = {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "blas": blas,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"machine": machine, "rows": rows}, indent=2))
    print(f"\nmachine: {machine}\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
