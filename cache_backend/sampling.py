"""Sampling settings for what a request leaves unset: the model's own recommendation.

The Anthropic API samples at temperature 1.0 with no truncation when a request names nothing, and
Claude Code names nothing on its main requests (with thinking on it sends no temperature). A
local model's card often asks for something else, and a small one needs it: at temperature 1 the
bundled SmolLM2-135M answers "say hi" with 8,192 tokens of noise, at its card's temperature 0.2
and top_p 0.9 with "Hello! ..." in 23 tokens. So, as vLLM and Ollama do, the server reads the
model folder's `generation_config.json` (`temperature`, `top_p`, `top_k`, and `min_p` and
`repetition_penalty`, which the API has no field for) and uses each value a request does not set
itself; `--sampling api` keeps the API's defaults instead.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

GENERATION_CONFIG = "generation_config.json"


@dataclass(frozen=True)
class SamplingDefaults:
    """What the engine samples with where the request is silent; 0 turns a truncation off."""

    temperature: float = 1.0
    top_p: float = 0.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    source: str = "the Anthropic API's defaults"

    @classmethod
    def from_model_dir(cls, model_dir: Path | None) -> SamplingDefaults:
        """The values in ``model_dir/generation_config.json``; the API's defaults for the rest.

        Raises ValueError naming the file and the key when a value is out of range.
        """
        path = model_dir / GENERATION_CONFIG if model_dir is not None else None
        if path is None or not path.is_file():
            return cls()
        try:
            config = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: not readable JSON ({e})") from e
        if not isinstance(config, dict):
            raise ValueError(f"{path}: expected a JSON object, got {type(config).__name__}")
        found = {
            "temperature": _number(config, "temperature", path, 0.0, 2.0),
            "top_p": _number(config, "top_p", path, 0.0, 1.0),
            "top_k": _count(config, "top_k", path),
            "min_p": _number(config, "min_p", path, 0.0, 1.0),
            "repetition_penalty": _number(config, "repetition_penalty", path, 1.0, 2.0),
        }
        found = {k: v for k, v in found.items() if v is not None}
        if not found:
            return cls()
        return cls(**found, source=str(path))

    def describe(self) -> str:
        parts = [f"temperature {self.temperature:g}"]
        truncations = (("top_p", self.top_p), ("top_k", self.top_k), ("min_p", self.min_p))
        parts += [f"{k} {v:g}" for k, v in truncations if v]
        if self.repetition_penalty != 1.0:
            parts.append(f"repetition_penalty {self.repetition_penalty:g}")
        return f"{', '.join(parts)} (from {self.source})"


def _number(config: dict[str, Any], key: str, path: Path, lo: float, hi: float) -> float | None:
    value = config.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not lo <= value <= hi:
        raise ValueError(f"{path}: {key} must be a number from {lo:g} to {hi:g}, got {value!r}")
    return float(value)


def _count(config: dict[str, Any], key: str, path: Path) -> int | None:
    value = config.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{path}: {key} must be a non-negative integer, got {value!r}")
    return value
