"""Incremental detokenization whose pieces join to exactly `tokenizer.decode(all_tokens)`.

Why not mlx-lm's streaming detokenizers: they trim the leading space of the first token, so a
reply the model began with " Hello" came back as "Hello"; rendered back as the assistant turn
it then tokenized differently and the prefix cache lost the whole turn. Here each step decodes
a short window of recent tokens twice (with and without the new token) and emits the
difference, holding back text while it ends in an incomplete UTF-8 sequence.
"""

from __future__ import annotations

from typing import Any


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Any) -> None:
        self._tok = tokenizer
        self._ids: list[int] = []
        self._prefix = 0  # window start
        self._read = 0  # tokens already turned into emitted text

    def _decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def add(self, token: int) -> str:
        """Text that token completes ("" while a multi-byte character is still partial)."""
        self._ids.append(token)
        before = self._decode(self._ids[self._prefix : self._read])
        after = self._decode(self._ids[self._prefix :])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self._prefix, self._read = self._read, len(self._ids)
            return after[len(before) :]
        return ""

    def finish(self) -> str:
        """Whatever is still held back."""
        before = self._decode(self._ids[self._prefix : self._read])
        after = self._decode(self._ids[self._prefix :])
        self._prefix = self._read = len(self._ids)
        return after[len(before) :] if after.startswith(before) else ""
