"""A long prefill shown to the client as a thinking block: progress text, and a live stream.

Why: Claude Code drops a stream after 300 s without an SSE *event* (its SDK discards `ping`),
and retries; a 12k-token prompt on a CPU prefills longer than that. Every content event resets
its watchdog, so while a prefill runs longer than `after_s`, the stream carries a `thinking`
block whose deltas say how far it is (`12,288 of 20,000 prompt tokens, 38 tok/s, about 3m20s
left`). A thinking block, because the renderer drops thinking from the prompt: when the client
sends this turn back, the progress text costs no token and moves no cached prefix.

The block is index 0; the answer's own blocks follow it, so their indices shift by one.
"""

from __future__ import annotations

from typing import Any

from cache_backend.jobs import Progress


def _duration(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def progress_text(p: Progress) -> str:
    line = f"{p.done:,} of {p.total:,} prompt tokens, {p.tokens_per_s:,.0f} tok/s"
    eta = p.eta_s
    if eta is not None:
        line += f", about {_duration(eta)} left"
    return line


class ProgressBlock:
    """Turns prefill Progress events into thinking-block SSE events, and shifts later indices."""

    def __init__(self, after_s: float = 3.0, every_s: float = 5.0) -> None:
        self.after_s = after_s
        self.every_s = every_s
        self.open = False
        self.shift = 0  # added to the index of every answer block
        self._started_at: float | None = None
        self._last = 0.0
        self._restored = 0

    def started(self, now: float, restored: int) -> None:
        self._started_at, self._restored = now, restored

    def on_progress(self, p: Progress, now: float) -> list[dict[str, Any]]:
        """Events to send for this progress report (often none)."""
        if self._started_at is None or now - self._started_at < self.after_s:
            return []
        out: list[dict[str, Any]] = []
        if not self.open:
            self.open, self.shift = True, 1
            out.append(
                {
                    "type": "content_block_start",
                    "index": 0,
                    "content_block": {"type": "thinking", "thinking": "", "signature": ""},
                }
            )
            head = "Prefilling the prompt on the local server"
            if self._restored:
                head += f" ({self._restored:,} tokens restored from its cache)"
            out.append(_delta(head + ".\n"))
        elif now - self._last < self.every_s:
            return out
        self._last = now
        out.append(_delta(progress_text(p) + "\n"))
        return out

    def close(self) -> list[dict[str, Any]]:
        """Events that end the block (before the answer's first block, or the message end)."""
        if not self.open:
            return []
        self.open = False
        return [
            {
                "type": "content_block_delta",
                "index": 0,
                "delta": {"type": "signature_delta", "signature": "ccwarm-progress"},
            },
            {"type": "content_block_stop", "index": 0},
        ]

    def shifted(self, event: dict[str, Any]) -> dict[str, Any]:
        if self.shift and "index" in event:
            return {**event, "index": event["index"] + self.shift}
        return event


def _delta(text: str) -> dict[str, Any]:
    return {"type": "content_block_delta", "index": 0, "delta": {"type": "thinking_delta", "thinking": text}}
