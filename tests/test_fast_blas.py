"""cache_backend.fast_blas: the packaged OpenBLAS is found, a re-executed process really has it
loaded (in /proc/self/maps, not just named in LD_PRELOAD), the opt-out works, and MLX's float32
matmul gives the same numbers on either BLAS. No timing is asserted: the machine may be busy."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from cache_backend import fast_blas

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux only (LD_PRELOAD)")

REPO = Path(__file__).resolve().parent.parent

# Re-executes itself through fast_blas, then reports what it got and a float32 matmul result.
CHILD = textwrap.dedent("""
    import json, os, sys
    from cache_backend import fast_blas
    fast_blas.reexec_with_fast_blas()
    import mlx.core as mx
    a = mx.random.normal((300, 200), key=mx.random.key(1))
    b = mx.random.normal((200, 250), key=mx.random.key(2))
    maps = open("/proc/self/maps").read()
    print(json.dumps({
        "ld_preload": os.environ.get("LD_PRELOAD", ""),
        "marker": os.environ.get(fast_blas.MARKER_ENV),
        "maps": sorted({l.split(maxsplit=5)[5] for l in maps.splitlines() if len(l.split()) == 6}),
        "blas": fast_blas.blas_in_use(),
        "gflops": fast_blas.matmul_gflops(256),
        "product": (a @ b).tolist(),
    }))
""")


def _run_child(tmp_path: Path, **env: str) -> dict:
    full = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", fast_blas.MARKER_ENV, fast_blas.OPT_OUT_ENV)}
    full.update(CCWARM_CACHE_DIR=str(tmp_path / "cache"), **env)
    out = subprocess.run(
        [sys.executable, "-c", CHILD, str(REPO)], env=full, capture_output=True, text=True, timeout=120, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def openblas() -> Path:
    lib = fast_blas.find_openblas()
    if lib is None:
        pytest.skip(f"no OpenBLAS: {fast_blas.PACKAGE} is x86-64 only and no system libopenblas.so.0")
    return lib


def test_finds_the_packaged_library(openblas: Path):
    import importlib.util

    if importlib.util.find_spec("ngsolve_openblas") is None:
        pytest.skip(f"{fast_blas.PACKAGE} is not installed here (not x86-64?)")
    assert openblas.is_file()
    assert openblas.parent.name == "ngsolve_openblas"
    assert openblas.name.startswith("libopenblas")


def test_fortran_runtime_dir_links_plain_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    if fast_blas._bundled_gfortran() is None:
        pytest.skip("this mlx-cpu bundles no libgfortran")
    monkeypatch.setenv("CCWARM_CACHE_DIR", str(tmp_path))
    d = fast_blas.fortran_runtime_dir()
    assert d is not None and d.is_relative_to(tmp_path)
    assert (d / "libgfortran.so.5").resolve() == fast_blas._bundled_gfortran().resolve()
    assert fast_blas.fortran_runtime_dir() == d  # idempotent


def test_reexec_preloads_and_opt_out_does_not(tmp_path: Path, openblas: Path):
    fast = _run_child(tmp_path)
    real = os.path.realpath(openblas)
    assert fast["marker"] == str(openblas)
    assert fast["ld_preload"].split(":")[0] == str(openblas)
    assert real in fast["maps"], "LD_PRELOAD was set but the dynamic loader did not load the library"
    assert fast["blas"] == real
    assert fast["gflops"] > 0

    slow = _run_child(tmp_path, CCWARM_FAST_BLAS="0")
    assert slow["marker"] is None and str(openblas) not in slow["ld_preload"]
    assert real not in slow["maps"]
    assert "reference" in slow["blas"]
    assert slow["gflops"] > 0

    # Same numbers either way (float32 sums in another order: close, not bit-equal).
    import numpy as np

    np.testing.assert_allclose(np.array(fast["product"]), np.array(slow["product"]), rtol=1e-4, atol=1e-4)


def test_reexec_is_a_no_op_when_already_preloaded(monkeypatch: pytest.MonkeyPatch, openblas: Path):
    def no_exec(*args: object) -> None:
        raise AssertionError("must not re-execute")

    monkeypatch.setattr(os, "execve", no_exec)
    monkeypatch.delenv(fast_blas.OPT_OUT_ENV, raising=False)
    monkeypatch.setenv(fast_blas.MARKER_ENV, str(openblas))
    fast_blas.reexec_with_fast_blas(["python"])
    monkeypatch.delenv(fast_blas.MARKER_ENV)
    monkeypatch.setenv("LD_PRELOAD", str(openblas))
    fast_blas.reexec_with_fast_blas(["python"])
    monkeypatch.setenv("LD_PRELOAD", "")
    monkeypatch.setenv(fast_blas.OPT_OUT_ENV, "0")
    fast_blas.reexec_with_fast_blas(["python"])
