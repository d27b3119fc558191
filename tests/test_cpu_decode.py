"""cache_backend.cpu_decode: a NumPy decode step gives the logits and greedy tokens of the model's
own forward pass (grouped-query heads, both RoPE layouts, across a cache reallocation), appends
to the cache exactly as mlx-lm does, never writes into a buffer that a stored copy shares, and
leaves the models it does not cover to MLX; through a real server, ``--decode numpy`` and
``--decode mlx`` answer the same. No timing is asserted here: ``scripts/bench_backend.py
--decoder numpy mlx`` measures the speed."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import anthropic
import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx_lm import load
from mlx_lm.models.cache import make_prompt_cache
from server_helpers import ServerProcess

from cache_backend import cpu_decode, kv_arrays
from cache_backend.testing.tiny_model import make_tiny_model

# Float32 rounding: the two sum in a different order. The tiny model's logits have a spread of
# ~4 (see tiny_model.py), and differ by ~1e-4; keys and values by less.
TOLERANCE = 5e-4


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Three layers, 4 query heads sharing 2 KV heads: every path of the step is exercised.
    return make_tiny_model(tmp_path_factory.mktemp("decode-model"), seed=3, num_layers=3)


def _prompt(n: int, seed: int = 0) -> list[int]:
    return np.random.default_rng(seed).integers(10, 200, n).tolist()


def _greedy(model, prompt: list[int], steps: int, decoder=None) -> tuple[list[int], list[np.ndarray], list]:
    """Greedy tokens and each step's logits, fed one token at a time after a prefill."""
    cache = make_prompt_cache(model)
    logits = model(mx.array(prompt)[None], cache=cache)[:, -1, :]
    tokens, seen = [], []
    for _ in range(steps):
        seen.append(np.array(logits[0]))
        tokens.append(int(mx.argmax(logits, axis=-1).item()))
        if decoder is not None:
            assert decoder.covers(cache)
            logits = decoder(tokens[-1], cache)
        else:
            logits = model(mx.array([[tokens[-1]]]), cache=cache)[:, -1, :]
    return tokens, seen, cache


def _agree(model, prompt: list[int], steps: int) -> None:
    ours, ours_logits, ours_cache = _greedy(model, prompt, steps, cpu_decode.NumpyDecoder(model))
    theirs, theirs_logits, theirs_cache = _greedy(model, prompt, steps)
    assert ours == theirs
    assert max(float(np.abs(a - b).max()) for a, b in zip(ours_logits, theirs_logits, strict=True)) < TOLERANCE
    for a, b in zip(ours_cache, theirs_cache, strict=True):
        assert a.offset == b.offset == len(prompt) + steps
        k_ours, k_theirs = np.array(a.keys[..., : a.offset, :]), np.array(b.keys[..., : b.offset, :])
        assert np.abs(k_ours - k_theirs).max() < TOLERANCE


def test_matches_the_models_forward_token_for_token(model_dir: Path) -> None:
    model, _ = load(str(model_dir))
    assert cpu_decode.decoder_for(model, "auto") is not None
    # 250 + 40: mlx-lm's KVCache reallocates at 256 positions, in the middle of the decode.
    _agree(model, _prompt(250), 40)


def test_interleaved_rope_layout(model_dir: Path, tmp_path: Path) -> None:
    traditional = tmp_path / "traditional"
    shutil.copytree(model_dir, traditional)
    config = json.loads((traditional / "config.json").read_text())
    config["rope_traditional"] = True
    (traditional / "config.json").write_text(json.dumps(config))
    model, _ = load(str(traditional))
    assert model.model.layers[0].self_attn.rope.traditional
    _agree(model, _prompt(30, seed=1), 20)


def test_a_buffer_shared_with_a_stored_copy_is_never_written(model_dir: Path) -> None:
    """Snapshots may hold the very arrays of a restored cache: a step must leave them as they were."""
    model, _ = load(str(model_dir))
    decoder = cpu_decode.NumpyDecoder(model)
    cache = make_prompt_cache(model)
    mx.eval(model(mx.array(_prompt(40))[None], cache=cache))
    kv_arrays.reserve(cache, 100)  # room to spare: a step could write in place if it were careless
    # Other arrays over the same buffers (a reshape is a view), as a restored snapshot's are.
    stored = [(c.keys.reshape(-1), c.values.reshape(-1)) for c in cache]
    mx.eval(stored)
    before = [(np.array(k), np.array(v)) for k, v in stored]
    for tok in (5, 6, 7):
        decoder(tok, cache)
    for (k, v), (k0, v0) in zip(stored, before, strict=True):
        assert np.array_equal(np.array(k), k0) and np.array_equal(np.array(v), v0)
    assert cache[0].offset == 43


def test_what_it_does_not_cover_goes_to_mlx(model_dir: Path) -> None:
    model, _ = load(str(model_dir))
    assert not cpu_decode.NumpyDecoder(model).covers(make_prompt_cache(model))  # empty: nothing to extend
    assert cpu_decode.decoder_for(model, "mlx") is None
    with pytest.raises(ValueError, match="--decode must be one of"):
        cpu_decode.decoder_for(model, "fast")
    nn.quantize(model, group_size=32, bits=4)
    assert cpu_decode.decoder_for(model, "auto") is None
    with pytest.raises(ValueError, match="quantized"):
        cpu_decode.decoder_for(model, "numpy")


def test_server_answers_the_same_with_either_decoder(model_dir: Path, tmp_path: Path) -> None:
    body = {
        "model": "claude-test",
        "max_tokens": 48,
        "messages": [{"role": "user", "content": "Tell me about the sea."}],
        "extra_body": {"temperature": 0.0},
    }
    answers = {}
    for mode in ("numpy", "mlx"):
        (tmp_path / mode).mkdir()
        srv = ServerProcess(model_dir, tmp_path / mode / "server.log", "--decode", mode)
        try:
            client = anthropic.Anthropic(base_url=srv.url, api_key="x", max_retries=0, timeout=60)
            msg = client.messages.create(**body)
            answers[mode] = (msg.content[0].text, msg.usage.output_tokens)
        finally:
            srv.stop()
        assert f"decode: {mode}" in (tmp_path / mode / "server.log").read_text()
    assert answers["numpy"] == answers["mlx"]
    assert answers["numpy"][1] > 10
