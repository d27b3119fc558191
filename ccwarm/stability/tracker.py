"""Per-conversation tracking: group requests by conversation, diff each with the previous one,
count what broke the prefix. `StabilityTracker` is what the addon and capture_diff use."""

from __future__ import annotations

import threading
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ccwarm import payload
from ccwarm.redact import Redactor
from ccwarm.stability.changes import RequestDiff
from ccwarm.stability.compare import Comparer, Layout
from ccwarm.stability.report import summary_markdown, write_summary

SCHEMA_VERSION = 1


@dataclass
class Observation:
    """One request seen by the tracker and what changed since the previous one of its conversation."""

    key: str
    identity: payload.RequestIdentity
    index: int  # 1-based position within the conversation
    label: str | None
    previous_label: str | None
    diff: RequestDiff | None  # None for the first request of a conversation
    elapsed_ms: float
    size: int | None = None

    @property
    def broken(self) -> bool:
        return self.diff is not None and self.diff.broken

    def summary_line(self) -> str:
        if self.diff is None:
            return "first request of the conversation"
        return self.diff.summary_line()

    def to_dict(self) -> dict[str, Any]:
        diff = self.diff.to_dict() if self.diff else {"prefix_breaks": [], "growth": [], "json_only": []}
        return {
            "index": self.index,
            "label": self.label,
            "compared_to": self.previous_label,
            "first": self.diff is None,
            "size": self.size,
            **diff,
            "summary": self.summary_line(),
        }


@dataclass
class ConversationStats:
    key: str
    session_id: str | None
    agent_id: str | None
    kind: str
    requests: int = 0
    compared: int = 0
    requests_with_breaks: int = 0
    prefix_breaks: int = 0
    growth: int = 0
    json_only: int = 0
    changed_blocks: Counter = field(default_factory=Counter)  # block -> requests where it broke the prefix
    json_only_blocks: Counter = field(default_factory=Counter)
    history: list[dict[str, Any]] = field(default_factory=list)
    recent_breaks: deque = field(default_factory=lambda: deque(maxlen=20))

    def ranked_blocks(self) -> list[dict[str, Any]]:
        return [
            {
                "block": b,
                "changed": n,
                "requests": self.requests,
                "text": f"{b} changed in {n} of {self.requests} requests",
            }
            for b, n in sorted(self.changed_blocks.items(), key=lambda kv: (-kv[1], kv[0]))
        ]

    def to_dict(self, *, with_history: bool) -> dict[str, Any]:
        out: dict[str, Any] = {
            "key": self.key,
            "session_id": self.session_id,
            "agent_id": self.agent_id,
            "kind": self.kind,
            "counts": {
                "requests": self.requests,
                "compared": self.compared,
                "requests_with_prefix_breaks": self.requests_with_breaks,
                "prefix_breaks": self.prefix_breaks,
                "growth": self.growth,
                "json_only": self.json_only,
            },
            "volatile_blocks": self.ranked_blocks(),
            "json_only_blocks": [{"block": b, "changed": n} for b, n in self.json_only_blocks.most_common()],
        }
        if with_history:
            out["requests"] = list(self.history)
        else:
            out["recent_breaks"] = list(self.recent_breaks)
        return out


class StabilityTracker:
    """Consecutive-request diffs per conversation, with counters for a summary. Thread-safe."""

    def __init__(self, *, max_conversations: int = 128, keep_history: bool = False) -> None:
        self.max_conversations = max_conversations
        self.keep_history = keep_history
        self._previous: OrderedDict[str, tuple[Mapping[str, Any], Layout, str | None]] = OrderedDict()
        self._stats: OrderedDict[str, ConversationStats] = OrderedDict()
        self._lock = threading.RLock()

    def observe(
        self,
        body: Mapping[str, Any],
        headers: Mapping[str, str] | None = None,
        *,
        label: str | None = None,
        size: int | None = None,
        extra: Mapping[str, Any] | None = None,
        dropped: Iterable[Mapping[str, Any] | str] = (),
    ) -> Observation:
        """Compare `body` with the previous request of its conversation and count what changed.

        `dropped`: what a proxy removed from the body before (see `payload.identify`). `extra` is merged into
        the kept history record (`keep_history=True`), e.g. a request's source.
        """
        started = time.perf_counter()
        ident = payload.identify(body, headers, dropped=dropped)
        key = ident.conversation_key
        with self._lock:
            prev = self._previous.pop(key, None)
            diff = None
            layout = None
            if prev is not None:
                comparer = Comparer(prev[0], body, prev[1])
                diff = RequestDiff(comparer.run())
                layout = comparer.layout
            self._previous[key] = (body, layout or Layout(body), label)
            while len(self._previous) > self.max_conversations:
                self._previous.popitem(last=False)
            stats = self._stats.get(key)
            if stats is None:
                stats = self._stats[key] = ConversationStats(key, ident.session_id, ident.agent_id, str(ident.kind))
            stats.requests += 1
            obs = Observation(
                key,
                ident,
                stats.requests,
                label,
                prev[2] if prev else None,
                diff,
                (time.perf_counter() - started) * 1000,
                size,
            )
            if diff is not None:
                stats.compared += 1
                breaks = diff.prefix_breaks
                if breaks:
                    stats.requests_with_breaks += 1
                    stats.recent_breaks.append(
                        {"index": obs.index, "label": label, "breaks": [c.to_dict() for c in breaks]}
                    )
                stats.prefix_breaks += len(breaks)
                stats.growth += len(diff.growth)
                stats.json_only += len(diff.json_only)
                stats.changed_blocks.update({c.block for c in breaks})
                stats.json_only_blocks.update({c.block for c in diff.json_only})
            if self.keep_history:
                stats.history.append({**obs.to_dict(), **(extra or {})})
            self._stats.move_to_end(key)
            while len(self._stats) > max(self.max_conversations * 8, 1024):
                self._stats.popitem(last=False)
        return obs

    def conversations(self) -> list[ConversationStats]:
        with self._lock:
            return list(self._stats.values())

    def summary(self) -> dict[str, Any]:
        with self._lock:
            convs = list(self._stats.values())
            overall: Counter = Counter()
            spread: Counter = Counter()
            for c in convs:
                overall.update(c.changed_blocks)
                spread.update(set(c.changed_blocks))
            return {
                "schema_version": SCHEMA_VERSION,
                "totals": {
                    "conversations": len(convs),
                    "requests": sum(c.requests for c in convs),
                    "compared": sum(c.compared for c in convs),
                    "requests_with_prefix_breaks": sum(c.requests_with_breaks for c in convs),
                    "prefix_breaks": sum(c.prefix_breaks for c in convs),
                    "json_only": sum(c.json_only for c in convs),
                },
                "volatile_blocks": [
                    {"block": b, "changed": n, "conversations": spread[b]}
                    for b, n in sorted(overall.items(), key=lambda kv: (-kv[1], kv[0]))
                ],
                "conversations": [c.to_dict(with_history=self.keep_history) for c in convs],
            }

    def markdown(self, summary: Mapping[str, Any] | None = None) -> str:
        return summary_markdown(summary or self.summary())

    def write(self, path: str | Path, redactor: Redactor | None = None) -> list[Path]:
        """Write the summary as JSON and Markdown: `x.json` + `x.md` (or both next to a path without either suffix)."""
        return write_summary(self.summary(), path, redactor)
