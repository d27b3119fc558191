"""The model's own outputs (text -> the exact tokens it generated), kept across restarts.

The renderer renders an earlier assistant turn with the tokens the model generated for it, not
a fresh tokenization of its text (sampling does not always pick the canonical split), so the
prompt + output snapshot of the previous turn is a prefix of the next prompt. That memory must
survive a restart just like the snapshots on disk, or the first warm turn after a restart would
miss from the previous answer on. One JSON line per output, compacted when it grows.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

log = logging.getLogger("ccwarm.output_log")


class OutputLog:
    def __init__(self, path: Path, limit: int = 512) -> None:
        self.path = path
        self.limit = limit
        self._lines = 0

    def load(self) -> list[tuple[str, list[int]]]:
        """The newest `limit` outputs, oldest first; unreadable lines are skipped."""
        entries: dict[str, list[int]] = {}
        try:
            with self.path.open(encoding="utf-8") as f:
                for n, line in enumerate(f, 1):
                    try:
                        item = json.loads(line)
                        text, tokens = item["text"], item["tokens"]
                        if not isinstance(text, str) or not all(isinstance(t, int) for t in tokens):
                            raise ValueError("wrong types")
                    except (ValueError, KeyError, TypeError) as e:
                        log.warning(f"{self.path.name}:{n}: skipping unreadable line ({e})")
                        continue
                    entries.pop(text, None)
                    entries[text] = tokens
        except FileNotFoundError:
            return []
        self._lines = len(entries)
        return list(entries.items())[-self.limit :]

    def append(self, text: str, tokens: list[int]) -> None:
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps({"text": text, "tokens": tokens}, ensure_ascii=False) + "\n")
        self._lines += 1
        if self._lines > 2 * self.limit:
            self._compact()

    def _compact(self) -> None:
        keep = self.load()
        tmp = self.path.with_suffix(".tmp")
        with tmp.open("w", encoding="utf-8") as f:
            for text, tokens in keep:
                f.write(json.dumps({"text": text, "tokens": tokens}, ensure_ascii=False) + "\n")
        os.replace(tmp, self.path)
        self._lines = len(keep)
