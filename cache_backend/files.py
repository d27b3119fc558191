"""File chores shared by the disk tier and the token logs."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path


def default_cache_dir() -> Path:
    """Where the server keeps its model, snapshots and helper libraries: `$CCWARM_CACHE_DIR`, or
    `~/.cache/ccwarm`."""
    return Path(os.environ.get("CCWARM_CACHE_DIR", "~/.cache/ccwarm")).expanduser()


def remove(path: Path, log: logging.Logger) -> None:
    """Remove a file, a symlink (not its target) or a directory; a failure is logged, not raised:
    a cache entry that cannot be removed must not stop the server."""
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
    except OSError as e:
        log.warning(f"could not remove {path}: {e}")
