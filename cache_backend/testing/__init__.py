"""TEST ONLY: scaffolding for the server, never on the request path of a production server.

- `tiny_model.py`: small random-weight models with a real tokenizer (tests and benchmarks);
- `scripted.py`: scripted replies and mid-stream failures (`--test-forced-replies`), hooked in
  through `ServerConfig.params_hook`;
- `slow_model.py`: a model wrapper that makes every forward pass slow (`--test-slow-prefill`).

The server imports these only when a `--test-*` flag asks for them.
"""
