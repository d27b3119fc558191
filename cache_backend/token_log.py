"""Token ids the renderer knows, kept across restarts next to the snapshots they belong to.

Two things the renderer learns must survive a restart just like the snapshots on disk:
- the model's own outputs (text -> the exact tokens it generated): an earlier assistant turn is
  rendered with those tokens, not a fresh tokenization of its text (sampling does not always pick
  the canonical split), so the prompt + output snapshot of the previous turn stays a prefix of the
  next prompt. Without them the first warm turn after a restart would miss from the previous
  answer on.
- rendered segments (hash of template, tools and messages so far -> tokens): tokenizing ~90 KB of
  system prompt and tool schemas takes ~0.1 s, which would otherwise be the largest part of the
  first warm turn after a restart.

One JSON line per entry, appended; compacted when it holds twice its limit. Unreadable lines are
skipped with a warning, so a torn write costs a re-tokenization, never a wrong token.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

log = logging.getLogger("cache_backend.token_log")


_TOKENIZER_FILES = ("tokenizer*", "special_tokens_map.json", "added_tokens.json", "vocab*", "merges.txt", "*.model",
                    "chat_template*")


def tokenizer_id(model_dir: Path) -> str:
    """A short hash of the files that decide how text becomes tokens (and the chat template)."""
    h = hashlib.sha256()
    for path in sorted({p for pattern in _TOKENIZER_FILES for p in model_dir.glob(pattern) if p.is_file()}):
        h.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()[:16]


class TokenLog:
    """A persistent `key -> token ids` map, newest `limit` entries kept."""

    def __init__(self, path: Path, limit: int = 512) -> None:
        self.path = path
        self.limit = limit
        self._lines = 0

    def load(self) -> list[tuple[str, list[int]]]:
        """The newest `limit` entries, oldest first."""
        entries: dict[str, list[int]] = {}
        try:
            with self.path.open(encoding="utf-8") as f:
                for n, line in enumerate(f, 1):
                    try:
                        item = json.loads(line)
                        key, tokens = item["key"], item["tokens"]
                        if not isinstance(key, str) or not isinstance(tokens, list) or not all(type(t) is int for t in tokens):
                            raise ValueError("wrong types")
                    except (ValueError, KeyError, TypeError) as e:
                        log.warning(f"{self.path.name}:{n}: skipping unreadable line ({e})")
                        continue
                    entries.pop(key, None)
                    entries[key] = tokens
        except FileNotFoundError:
            return []
        self._lines = len(entries)
        return list(entries.items())[-self.limit :]

    def append(self, key: str, tokens: list[int]) -> None:
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps({"key": key, "tokens": tokens}, ensure_ascii=False) + "\n")
        self._lines += 1
        if self._lines > 2 * self.limit:
            self._compact()

    def _compact(self) -> None:
        keep = self.load()
        tmp = self.path.with_suffix(".tmp")
        with tmp.open("w", encoding="utf-8") as f:
            for key, tokens in keep:
                f.write(json.dumps({"key": key, "tokens": tokens}, ensure_ascii=False) + "\n")
        os.replace(tmp, self.path)
        self._lines = len(keep)
