"""Fixtures shared across test modules: one tiny random-weight model per test session."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """Two layers, unlike the 1-layer default: with one layer the KV of a distant token barely
    moves the output, and cache-correctness tests must notice a wrong restore."""
    from cache_backend.testing.tiny_model import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny-model"), seed=0, num_layers=2)
