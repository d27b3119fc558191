#!/usr/bin/env python3
"""Write a tiny seeded random-weight mlx-lm model (SmolLM2 tokenizer, tool-aware ChatML) to DIR.

Usage: .venv/bin/python scripts/make_tiny_model.py DIR [--seed N] [--layers N] [--hidden N] ...
Tests and benchmarks use it because the real model is far too slow on CPU for 20k-token prompts.
"""

from cache_backend.testing.tiny_model import main

if __name__ == "__main__":
    raise SystemExit(main())
