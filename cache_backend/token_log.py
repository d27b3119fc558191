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

One JSON line per entry with a CRC-32 of its key and tokens, appended; compacted when it holds
twice its limit. Lines that are torn, not UTF-8, not JSON or fail their checksum are dropped with
one warning per file (and the file rewritten without them), so damage costs a re-tokenization,
never a wrong token and never a failed start.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import zlib
from pathlib import Path

from cache_backend import files

log = logging.getLogger("cache_backend.token_log")


_TOKENIZER_FILES = (
    "tokenizer*",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab*",
    "merges.txt",
    "*.model",
    "chat_template*",
)


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
        self._broken = False  # set after a failed write: warned once, then the log is memory-only

    def load(self) -> list[tuple[str, list[int]]]:
        """The newest `limit` entries, oldest first. Damaged lines are dropped from the file."""
        try:
            if self.path.is_symlink() or (self.path.exists() and not self.path.is_file()):
                raise IsADirectoryError("not a regular file")
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return []
        except OSError as e:
            log.warning(f"{self.path.name}: unusable ({e}); removing it, its tokens will be computed again")
            files.remove(self.path, log)
            return []
        entries: dict[str, list[int]] = {}
        bad: list[str] = []
        for n, line in enumerate(raw.split(b"\n"), 1):
            if not line.strip():
                continue
            try:
                key, tokens = _parse_line(line)
            except (ValueError, KeyError, TypeError, RecursionError) as e:
                bad.append(f"line {n}: {e}")
                continue
            entries.pop(key, None)
            entries[key] = tokens
        keep = list(entries.items())[-self.limit :]
        self._lines = len(entries)
        if bad or (raw and not raw.endswith(b"\n")):
            if bad:
                log.warning(
                    f"{self.path.name}: dropped {len(bad)} damaged line(s) ({bad[0]}"
                    f"{', ...' if len(bad) > 1 else ''}); their tokens will be computed again"
                )
            self._rewrite(keep)  # so a torn last line never swallows the next append
        return keep

    def append(self, key: str, tokens: list[int]) -> None:
        if self._broken:
            return
        try:
            line = _line(key, tokens).encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate in generated text: not worth a line
            return
        try:
            with self.path.open("ab") as f:
                f.write(line)
            self._lines += 1
            if self._lines > 2 * self.limit:
                self._compact()
        except OSError as e:
            self._broken = True
            log.warning(f"{self.path.name}: cannot write ({e}); what the renderer learns stays in memory only")

    def _compact(self) -> None:
        self._rewrite(self.load())

    def _rewrite(self, keep: list[tuple[str, list[int]]]) -> None:
        tmp = self.path.with_suffix(".tmp")
        try:
            with tmp.open("w", encoding="utf-8") as f:
                f.writelines(_line(key, tokens) for key, tokens in keep)
            os.replace(tmp, self.path)
        except OSError as e:
            log.warning(f"{self.path.name}: cannot rewrite ({e})")
            return
        self._lines = len(keep)


def _checksum(key: str, tokens: list[int]) -> int:
    return zlib.crc32(json.dumps([key, tokens], ensure_ascii=False).encode("utf-8", "surrogatepass"))


def _line(key: str, tokens: list[int]) -> str:
    return json.dumps({"key": key, "tokens": tokens, "crc": _checksum(key, tokens)}, ensure_ascii=False) + "\n"


def _parse_line(line: bytes) -> tuple[str, list[int]]:
    item = json.loads(line.decode("utf-8"))
    key, tokens, crc = item["key"], item["tokens"], item["crc"]
    if not isinstance(key, str) or not isinstance(tokens, list) or not all(type(t) is int and t >= 0 for t in tokens):
        raise ValueError("wrong types")
    if crc != _checksum(key, tokens):
        raise ValueError("checksum mismatch")
    return key, tokens
