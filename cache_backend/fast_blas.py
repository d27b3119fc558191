"""Run MLX's float32 matmuls on OpenBLAS on Linux, by re-executing the server with ``LD_PRELOAD``.

Why this exists: on Linux the ``mlx-cpu`` wheel links a bundled *reference* BLAS (netlib
``libblas``), so every float32 matmul runs at 2-3 GFLOP/s on a 2-core x86-64 machine. MLX calls
it by the plain names ``cblas_sgemm``/``sgemm_`` (and the LAPACK ``*_`` routines), so a preloaded
OpenBLAS that exports those names takes the calls over: 40-130 GFLOP/s on the same machine, and
float32 prefill of the default model goes from ~8 to ~60-80 tokens/s. float16/bfloat16 and
quantized matmuls are MLX's own kernels and do not change.

What it does: :func:`reexec_with_fast_blas`, called first thing in the server's ``main`` (before
MLX is imported), replaces the process once with the same command line and ``LD_PRELOAD`` set
to the library :func:`find_openblas` picks: the OpenBLAS of the PyPI package ``ngsolve-openblas``
(x86-64 only) or else a system ``libopenblas.so.0``. Most OpenBLAS builds on PyPI do not fit:
``scipy-openblas32/64`` and NumPy's copy prefix their symbols (``scipy_cblas_sgemm``), and
``cmeel-openblas`` is built for AVX-512 only (SIGILL elsewhere). ``ngsolve-openblas`` needs
``libgfortran.so.5`` without shipping it; when the system has none, the copy that ``mlx-cpu``
bundles (under a hashed name) is linked as ``libgfortran.so.5`` into a folder of the cache dir
that goes on ``LD_LIBRARY_PATH``.

How to turn it off: ``CCWARM_FAST_BLAS=0``. The child carries ``CCWARM_BLAS_PRELOADED`` so it
never re-executes again; :func:`blas_in_use` reads ``/proc/self/maps`` to say what really got
loaded (a preload that fails to load is only a warning from the dynamic loader).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from functools import cache
from pathlib import Path

from cache_backend.files import default_cache_dir

OPT_OUT_ENV = "CCWARM_FAST_BLAS"
MARKER_ENV = "CCWARM_BLAS_PRELOADED"
PACKAGE = "ngsolve-openblas"  # import name ngsolve_openblas; do not import it (it dlopens the lib)
_MODULE = "ngsolve_openblas"
_GFORTRAN = "libgfortran.so.5"
_LDCONFIG_ARCH = {"x86_64": "x86-64", "aarch64": "AArch64"}


@cache
def _ldconfig_listing() -> str:
    exe = shutil.which("ldconfig") or next(
        (p for p in ("/sbin/ldconfig", "/usr/sbin/ldconfig") if os.path.exists(p)), None
    )
    if exe is None:
        return ""
    try:
        return subprocess.run([exe, "-p"], capture_output=True, text=True, timeout=5).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def _ldconfig(soname: str) -> Path | None:
    """Where the dynamic loader's cache says ``soname`` is, for this machine's architecture."""
    arch = _LDCONFIG_ARCH.get(platform.machine(), "")
    for line in _ldconfig_listing().splitlines():
        name, _, rest = line.strip().partition(" ")
        flags, _, path = rest.partition("=>")
        if name == soname and arch in flags and Path(path.strip()).is_file():
            return Path(path.strip())
    return None


def _system_openblas() -> Path | None:
    found = _ldconfig("libopenblas.so.0")
    if found:
        return found
    multiarch = f"/usr/lib/{platform.machine()}-linux-gnu"
    for p in (
        f"{multiarch}/libopenblas.so.0",
        f"{multiarch}/openblas-pthread/libopenblas.so.0",
        "/usr/lib64/libopenblas.so.0",
        "/usr/lib/libopenblas.so.0",
    ):
        if Path(p).is_file():
            return Path(p)
    return None


def _packaged_openblas() -> Path | None:
    spec = importlib.util.find_spec(_MODULE)  # a top-level name: finds it without importing it
    for d in (spec.submodule_search_locations or []) if spec else []:
        libs = sorted(Path(d).glob("libopenblas*.so*"))
        if libs:
            return libs[0]
    return None


def _cache_dir() -> Path:
    return default_cache_dir()


def _bundled_gfortran() -> Path | None:
    """mlx-cpu's own copy of libgfortran (auditwheel gave it a hashed name), if it has one."""
    try:
        libs = Path(str(importlib.metadata.distribution("mlx-cpu").locate_file("mlx_cpu.libs")))
    except importlib.metadata.PackageNotFoundError:
        return None
    found = sorted(libs.glob("libgfortran-*.so.5*"))
    return found[0] if found else None


def _needs_fortran_bridge(lib: Path) -> bool:
    return lib == _packaged_openblas() and _ldconfig(_GFORTRAN) is None


def fortran_runtime_dir() -> Path | None:
    """A folder of the cache dir holding ``libgfortran.so.5``, linked to mlx-cpu's copy; or None.

    The bundled copy has a hashed file name and soname (``libgfortran-<hash>.so.5.0.0``), so the
    loader cannot find it by the name OpenBLAS asks for; a symlink by the plain name can. Its
    own dependency (``libquadmath-<hash>``) is linked beside it, because ``$ORIGIN`` of a library
    opened through a symlink is the symlink's folder.
    """
    gfortran = _bundled_gfortran()
    if gfortran is None:
        return None
    links = {_GFORTRAN: gfortran, **{p.name: p for p in gfortran.parent.glob("libquadmath-*.so*")}}
    out = _cache_dir() / "fortran-runtime"
    try:
        out.mkdir(parents=True, exist_ok=True)
        for name, target in links.items():
            link = out / name
            if link.is_symlink() and Path(os.readlink(link)) == target:
                continue
            tmp = out / f".{name}.{os.getpid()}"
            tmp.unlink(missing_ok=True)
            tmp.symlink_to(target)
            os.replace(tmp, link)  # atomic: a concurrent start sees the old or the new link
    except OSError:
        return None
    return out


def find_openblas() -> Path | None:
    """The OpenBLAS to preload: the ``ngsolve-openblas`` package's, else the system's, else None.

    Only on Linux (macOS MLX uses Accelerate). The packaged one counts only if a
    ``libgfortran.so.5`` can be had for it (see :func:`fortran_runtime_dir`).
    """
    if not sys.platform.startswith("linux"):
        return None
    packaged = _packaged_openblas()
    if packaged and (_ldconfig(_GFORTRAN) or _bundled_gfortran()):
        return packaged
    return _system_openblas()


def _preloaded(lib: Path) -> bool:
    entries = os.environ.get("LD_PRELOAD", "").replace(":", " ").split()
    return any(e in (str(lib), lib.name) for e in entries)


def reexec_with_fast_blas(argv: Sequence[str] | None = None) -> None:
    """Replace this process by the same command with OpenBLAS preloaded; return if not needed.

    ``argv`` is the whole command line, interpreter first (default ``sys.orig_argv``, which
    keeps ``-m cache_backend`` and interpreter options). Call it before anything imports MLX
    and only in a process's entry point: it never returns when it re-executes. Returns without
    doing anything off Linux, with ``CCWARM_FAST_BLAS=0``, in the re-executed child (marker
    ``CCWARM_BLAS_PRELOADED``), when ``LD_PRELOAD`` already names the library, or when none is
    found.
    """
    if not sys.platform.startswith("linux") or os.environ.get(MARKER_ENV):
        return
    if os.environ.get(OPT_OUT_ENV, "1").strip().lower() in ("0", "false", "no", "off"):
        return
    lib = find_openblas()
    if lib is None or _preloaded(lib) or any(c in str(lib) for c in ": "):
        return
    env = dict(os.environ)
    env["LD_PRELOAD"] = ":".join(filter(None, [str(lib), env.get("LD_PRELOAD", "")]))
    env[MARKER_ENV] = str(lib)
    if _needs_fortran_bridge(lib):
        runtime = fortran_runtime_dir()
        if runtime is None:
            return
        env["LD_LIBRARY_PATH"] = ":".join(filter(None, [str(runtime), env.get("LD_LIBRARY_PATH", "")]))
    args = list(argv if argv is not None else sys.orig_argv)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, args, env)


def blas_in_use() -> str:
    """The OpenBLAS file mapped into this process, or a note that MLX's bundled BLAS is in use."""
    if not sys.platform.startswith("linux"):
        return "platform BLAS (not Linux)"
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return "unknown"
    paths = {f[5] for f in (line.split(maxsplit=5) for line in maps.splitlines()) if len(f) == 6}
    # NumPy maps its own libscipy_openblas64_ (prefixed symbols, not used by MLX): skip it.
    fast = sorted(p for p in paths if "libopenblas" in Path(p).name)
    return fast[0] if fast else "mlx-cpu's bundled reference BLAS (slow float32 matmul)"


def matmul_gflops(n: int = 1024, budget_s: float = 0.4) -> float:
    """float32 ``mx.matmul`` speed in GFLOP/s on the default device, in well under a second.

    Times an n/2 matmul first; if that already took a noticeable part of the budget (a slow
    BLAS) its figure is returned, else the best of up to three n x n matmuls.
    """
    import mlx.core as mx

    def once(m: int) -> float:
        a = mx.random.normal((m, m), dtype=mx.float32)
        b = mx.random.normal((m, m), dtype=mx.float32)
        mx.eval(a, b)
        t = time.perf_counter()
        mx.eval(a @ b)
        return 2 * m**3 / max(time.perf_counter() - t, 1e-9) / 1e9

    start = time.perf_counter()
    once(max(n // 4, 1))  # warm-up: thread pools, allocator
    best = once(max(n // 2, 1))
    for _ in range(3):
        spent = time.perf_counter() - start
        if spent + 2 * n**3 / (best * 1e9) > budget_s:
            break
        best = max(best, once(n))
    return best
