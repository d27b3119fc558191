"""The package as pip installs it: the addons come with it, and the checkout's script shims load
them under a real mitmdump (the README's `mitmdump -s addons/normalize.py`)."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from ccwarm.harness import REPO


@pytest.mark.timeout(300)
def test_the_wheel_carries_the_addons_and_the_server(tmp_path: Path) -> None:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "-q",
            "-w",
            str(tmp_path),
            str(REPO),
        ],
        check=True,
        stdin=subprocess.DEVNULL,
    )
    wheel = next(tmp_path.glob("ccwarm-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    for module in (
        "ccwarm/addons/normalize.py",
        "ccwarm/addons/stability.py",
        "ccwarm/stability/compare.py",
        "cache_backend/engine.py",
    ):
        assert module in names, sorted(n for n in names if n.endswith(".py"))
    assert not any(n.startswith(("tests/", "scripts/", "addons/")) for n in names)


def test_the_script_shims_load_the_installed_addons() -> None:
    """mitmproxy loads `-s` scripts by path and looks for a module-level `addons` list."""
    import runpy

    for name, cls in (("normalize", "Normalize"), ("stability", "Stability")):
        module = runpy.run_path(str(REPO / "addons" / f"{name}.py"))
        (addon,) = module["addons"]
        assert type(addon).__module__ == f"ccwarm.addons.{name}" and type(addon).__name__ == cls
