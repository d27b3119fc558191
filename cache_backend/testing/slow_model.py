"""TEST ONLY: a model wrapper that makes every forward pass cost time per token.

Tests of cancellation, resumable prefill and queueing need a prefill slow enough to interrupt,
on a tiny model that is really fast. Hooked in only by `--test-slow-prefill`; the engine sees an
ordinary model (the sleep counts as compute, so adaptive chunking reacts to it as to a slow CPU).
"""

from __future__ import annotations

import time
from typing import Any


class SlowModel:
    """Delegates everything to `model`; each call first sleeps `seconds_per_token` x input tokens."""

    def __init__(self, model: Any, seconds_per_token: float) -> None:
        self._model = model
        self._seconds_per_token = seconds_per_token

    def __call__(self, inputs: Any, *args: Any, **kwargs: Any) -> Any:
        time.sleep(self._seconds_per_token * int(inputs.shape[-1]))
        return self._model(inputs, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._model, name)
