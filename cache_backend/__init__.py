"""cache_backend: an Anthropic Messages API server on mlx-lm (run `python -m cache_backend`)."""
