"""What goes into the engine and what comes out: a `Job` (a rendered prompt, its `GenerationParams`
and a sink) and the events the sink receives (`Started`, `Progress`, content block dicts, then
`Finished` or `Failed`). Plain data, so the HTTP layer and tests need not import the worker.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from cache_backend.output import StopReason
from cache_backend.prompt import RenderedPrompt
from cache_backend.toolcalls import ToolCallSyntax


@dataclass(frozen=True)
class GenerationParams:
    max_tokens: int
    context_cut: bool = False  # max_tokens was lowered to fit the context limit
    temperature: float = 1.0
    top_p: float = 0.0  # 0: no truncation
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0  # 1: off
    stop_sequences: tuple[str, ...] = ()
    tool_syntax: ToolCallSyntax | None = None
    json_schema: dict[str, Any] | None = None
    deadline_s: float | None = None  # wall-clock budget for the whole job once it starts
    # Fed through the model as if sampled, before sampling starts (a forced tool-call opening, a
    # JSON opening). Any iterable: one that raises fails the job there (tests inject faults so).
    forced_tokens: Iterable[int] = ()


@dataclass(frozen=True)
class Started:
    """The worker picked the job up; the prefix cache restored `n_restored` of `prompt_tokens`."""

    prompt_tokens: int
    n_restored: int


@dataclass(frozen=True)
class Progress:
    """Prefill progress: `done` of `total` prompt tokens are in the cache (restored ones included)."""

    done: int
    total: int
    tokens_per_s: float

    @property
    def eta_s(self) -> float | None:
        return (self.total - self.done) / self.tokens_per_s if self.tokens_per_s > 0 else None


@dataclass(frozen=True)
class Finished:
    stop_reason: StopReason
    stop_sequence: str | None
    prompt_tokens: int
    n_restored: int
    output_tokens: int
    ttft_s: float | None
    blocks: list[dict[str, Any]]


@dataclass(frozen=True)
class Failed:
    message: str
    error_type: str = "api_error"  # Anthropic error type; "overloaded_error" tells clients to retry


Event = Started | Progress | Finished | Failed | dict  # dicts are wire-shaped content block events


@dataclass
class Job:
    prompt: RenderedPrompt
    params: GenerationParams
    sink: Callable[[Event], None]
    request_id: str = ""
    cancel: threading.Event = field(default_factory=threading.Event)
    created: float = field(default_factory=time.monotonic)
    prefilled: int = 0  # progress, for logs: prompt tokens fed so far (restored ones excluded)
    generated: int = 0  # output tokens so far
    restored: int = 0
    resumed: bool = False
    started: float | None = None  # when the worker picked it up
    ttft_s: float | None = None
