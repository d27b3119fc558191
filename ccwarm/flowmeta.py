"""What the addons record on a mitmproxy flow, under names every reader shares.

normalize records what it removed from a request under `NORMALIZE_KEY`
(`{"dropped": [{"where", "reason", "text"}, ...]}`); stability records its diff of the request
under `STABILITY_KEY`. The stability addon, its content view, `capture_diff` and the e2e read
them back with `dropped()`, and pass that to `payload.identify(..., dropped=...)`, so a request's
identity is decided one way everywhere, also after normalize took its billing block out.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

NORMALIZE_KEY = "ccwarm.normalize"
STABILITY_KEY = "ccwarm.stability"


def dropped(metadata: Mapping[str, Any]) -> list[dict[str, Any]]:
    """normalize's records of what it removed from this flow's request (empty when nothing)."""
    entry = metadata.get(NORMALIZE_KEY)
    records = entry.get("dropped") if isinstance(entry, Mapping) else None
    return [dict(d) for d in records or () if isinstance(d, Mapping)]
