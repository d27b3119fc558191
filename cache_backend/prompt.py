"""`RenderedPrompt`: what the renderer hands the engine and the snapshot store.

Why its own module: the engine and the snapshot store need the prompt's tokens and boundaries,
not the renderer (and through it the request validation and the error types).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RenderedPrompt:
    """Token ids of a prompt plus the places a prefix cache may snapshot.

    - `tokens[:prefix_end]` is system + tools (0 when the template puts nothing before the
      first message that can be separated);
    - `message_ends[i]` is the end of chat message i's segment (chat messages, after mapping:
      a user turn with tool results becomes several);
    - `tokens[generation_start:]` is the generation prompt (plus an assistant prefill, if any).
    `segmented` is False when the template is not append-only for this conversation and the
    prompt had to be tokenized in one piece (then only `generation_start` is meaningful).
    """

    tokens: list[int]
    prefix_end: int
    message_ends: tuple[int, ...]
    generation_start: int
    segmented: bool = True
    placeholders: int = 0

    @property
    def boundaries(self) -> tuple[int, ...]:
        """Sorted distinct snapshot positions strictly inside (0, len(tokens)]."""
        pts = {self.prefix_end, *self.message_ends, self.generation_start, len(self.tokens)}
        return tuple(sorted(p for p in pts if 0 < p <= len(self.tokens)))

    def __len__(self) -> int:
        return len(self.tokens)
