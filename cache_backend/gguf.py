"""GGUF -> mlx-lm: read a GGUF file's metadata, rebuild its tokenizer, convert its weights.

Why by hand rather than by a library: GGUF keeps the Q/K projection rows permuted for GGML's rope
layout, mixes bit widths (8-bit embedding, 4-bit elsewhere) without saying so in a form mlx-lm
reads, and carries its tokenizer as raw metadata instead of a ``tokenizer.json``. Each of those has
to be undone here, or the model loads fine and answers garbage.

Why the metadata and tokenizer helpers are public: the tiny random-weight test model reuses the
real tokenizer so that token counts match the real model's, and it must get it from the GGUF
*metadata* alone (the first megabyte or so of the file), without paying for a full conversion.
Reading the header is pure Python: it needs neither the tensors nor MLX.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, BinaryIO

if TYPE_CHECKING:  # imported lazily at run time: reading metadata must not need tokenizers
    from tokenizers import Tokenizer


# --------------------------------------------------------------------------------------------
# GGUF metadata (pure Python: reading the header must not need the tensors or MLX)
# --------------------------------------------------------------------------------------------

_GGUF_SCALARS: dict[int, str] = {
    0: "B",
    1: "b",
    2: "H",
    3: "h",
    4: "I",
    5: "i",
    6: "f",
    7: "?",
    10: "Q",
    11: "q",
    12: "d",
}
_GGUF_STRING = 8
_GGUF_ARRAY = 9


class _Reader:
    def __init__(self, f: BinaryIO | IO[bytes]):
        self.f = f

    def read(self, n: int) -> bytes:
        b = self.f.read(n)
        if len(b) != n:
            raise ValueError("truncated GGUF header")
        return b

    def u32(self) -> int:
        return struct.unpack("<I", self.read(4))[0]

    def u64(self) -> int:
        return struct.unpack("<Q", self.read(8))[0]

    def string(self) -> str:
        return self.read(self.u64()).decode("utf-8", errors="surrogateescape")

    def value(self, vtype: int) -> Any:
        if vtype == _GGUF_STRING:
            return self.string()
        if vtype == _GGUF_ARRAY:
            itype, count = self.u32(), self.u64()
            if itype == _GGUF_STRING:
                return [self.string() for _ in range(count)]
            if itype in _GGUF_SCALARS:
                fmt = _GGUF_SCALARS[itype]
                size = struct.calcsize(fmt)
                return list(struct.unpack(f"<{count}{fmt}", self.read(size * count)))
            return [self.value(itype) for _ in range(count)]
        if vtype in _GGUF_SCALARS:
            fmt = _GGUF_SCALARS[vtype]
            return struct.unpack(f"<{fmt}", self.read(struct.calcsize(fmt)))[0]
        raise ValueError(f"unknown GGUF value type {vtype}")


def read_gguf_metadata(f: BinaryIO | IO[bytes]) -> dict[str, Any]:
    """Read the key/value metadata at the start of a GGUF stream (v2 or v3), leaving the tensors."""
    r = _Reader(f)
    if r.read(4) != b"GGUF":
        raise ValueError("not a GGUF file")
    version = r.u32()
    if version < 2:
        raise ValueError(f"GGUF version {version} is not supported (need 2 or 3)")
    _tensor_count, kv_count = r.u64(), r.u64()
    meta: dict[str, Any] = {}
    for _ in range(kv_count):
        key = r.string()
        meta[key] = r.value(r.u32())
    return meta


def plain(v: Any) -> Any:
    # Metadata from mx.load(..., return_metadata=True) arrives as mx.array scalars/vectors;
    # metadata from read_gguf_metadata is already plain. Accept both.
    if hasattr(v, "tolist"):
        return v.tolist()
    return v


# --------------------------------------------------------------------------------------------
# Tokenizer from GGUF metadata
# --------------------------------------------------------------------------------------------

_GGUF_TOKEN_CONTROL = 3


def gguf_tokenizer(metadata: Mapping[str, Any]) -> Tokenizer:
    """Build a ``tokenizers.Tokenizer`` (byte-level BPE) from GGUF tokenizer metadata.

    Control tokens (type 3, e.g. ``<|im_start|>``) become special added tokens so that ChatML
    markers in a rendered prompt encode as single ids, as they do for the original model.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    kind = plain(metadata.get("tokenizer.ggml.model"))
    if kind != "gpt2":
        raise ValueError(f"only byte-level BPE ('gpt2') GGUF tokenizers are supported, got {kind!r}")
    tokens = list(plain(metadata["tokenizer.ggml.tokens"]))
    merges = [tuple(m.split(" ", 1)) for m in plain(metadata["tokenizer.ggml.merges"])]
    types = list(plain(metadata.get("tokenizer.ggml.token_type", [1] * len(tokens))))
    vocab = {t: i for i, t in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise ValueError("GGUF vocabulary has duplicate tokens")

    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    pre = plain(metadata.get("tokenizer.ggml.pre", "default"))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in ("smollm", "starcoder", "refact"):
        # llama.cpp's pre-tokenizer for these splits every digit on its own before the GPT-2
        # regex; the Hugging Face tokenizer.json of SmolLM2 does the same with Digits.
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    elif pre in ("default", "gpt2", "gpt-2"):
        tok.pre_tokenizer = byte_level
    else:
        raise ValueError(f"unsupported GGUF pre-tokenizer {pre!r}")
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    special = [
        AddedToken(t, special=True, normalized=False, single_word=False, lstrip=False, rstrip=False)
        for t, ty in zip(tokens, types)
        if ty == _GGUF_TOKEN_CONTROL
    ]
    tok.add_special_tokens(special)
    return tok


def _token(metadata: Mapping[str, Any], key: str) -> str | None:
    idx = metadata.get(f"tokenizer.ggml.{key}_token_id")
    if idx is None:
        return None
    return plain(metadata["tokenizer.ggml.tokens"])[int(plain(idx))]


def write_tokenizer_files(
    metadata: Mapping[str, Any],
    out_dir: Path,
    *,
    chat_template: str | None = None,
    model_max_length: int | None = None,
) -> None:
    """Write ``tokenizer.json``, ``tokenizer_config.json`` and ``special_tokens_map.json``.

    ``chat_template`` defaults to the GGUF's own ``tokenizer.chat_template``. The eos token is
    the GGUF's (``<|im_end|>`` for SmolLM2), which is what ends an assistant turn in ChatML.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok = gguf_tokenizer(metadata)
    (out_dir / "tokenizer.json").write_text(tok.to_str(pretty=True), encoding="utf-8")

    tokens = plain(metadata["tokenizer.ggml.tokens"])
    types = plain(metadata.get("tokenizer.ggml.token_type", [1] * len(tokens)))
    if chat_template is None:
        chat_template = plain(metadata.get("tokenizer.chat_template"))
    if model_max_length is None:
        arch = plain(metadata.get("general.architecture", "llama"))
        model_max_length = int(plain(metadata.get(f"{arch}.context_length", 8192)))
    special = {
        "bos_token": _token(metadata, "bos"),
        "eos_token": _token(metadata, "eos"),
        "unk_token": _token(metadata, "unknown"),
        "pad_token": _token(metadata, "padding"),
    }
    special = {k: v for k, v in special.items() if v is not None}
    # Hugging Face's SmolLM2 config lists the ChatML markers as additional special tokens.
    additional = [t for t in ("<|im_start|>", "<|im_end|>") if t in tokens]
    config: dict[str, Any] = {
        "add_bos_token": bool(plain(metadata.get("tokenizer.ggml.add_bos_token", False))),
        "add_eos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": {
            str(i): {
                "content": t,
                "lstrip": False,
                "normalized": False,
                "rstrip": False,
                "single_word": False,
                "special": True,
            }
            for i, (t, ty) in enumerate(zip(tokens, types))
            if ty == _GGUF_TOKEN_CONTROL
        },
        "additional_special_tokens": additional,
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,
        # The generic fast tokenizer loads tokenizer.json as is; a model-specific class could
        # rebuild parts of the pipeline from its own defaults.
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special,
    }
    if chat_template:
        config["chat_template"] = chat_template
    write_json(out_dir / "tokenizer_config.json", config)
    write_json(
        out_dir / "special_tokens_map.json",
        {**special, "additional_special_tokens": additional},
    )


def write_json(path: Path, obj: Any) -> None:
    # Fixed formatting so that the same input gives the same bytes (tests compare files).
    path.write_text(json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")


# --------------------------------------------------------------------------------------------
# Weights: GGUF -> mlx-lm llama
# --------------------------------------------------------------------------------------------

_BLOCK_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


def _hf_module(gguf_module: str) -> str:
    if gguf_module in _TOP_NAMES:
        return _TOP_NAMES[gguf_module]
    parts = gguf_module.split(".")
    if len(parts) == 3 and parts[0] == "blk" and parts[2] in _BLOCK_NAMES:
        return f"model.layers.{parts[1]}.{_BLOCK_NAMES[parts[2]]}"
    raise ValueError(f"unexpected GGUF tensor {gguf_module!r}")


def llama_config_from_gguf(metadata: Mapping[str, Any]) -> dict[str, Any]:
    """The mlx-lm/Hugging Face ``config.json`` fields of a llama-architecture GGUF."""
    arch = plain(metadata["general.architecture"])
    if arch != "llama":
        raise ValueError(f"only llama-architecture GGUF files are supported, got {arch!r}")

    def g(key: str, default: Any = None) -> Any:
        v = metadata.get(f"llama.{key}", default)
        if v is None:
            raise KeyError(f"GGUF metadata lacks llama.{key}")
        return plain(v)

    hidden = int(g("embedding_length"))
    heads = int(g("attention.head_count"))
    n_vocab = len(plain(metadata["tokenizer.ggml.tokens"]))
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": int(g("feed_forward_length")),
        "num_hidden_layers": int(g("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(g("attention.head_count_kv", heads)),
        "head_dim": int(g("rope.dimension_count", hidden // heads)),
        "rms_norm_eps": float(g("attention.layer_norm_rms_epsilon")),
        "rope_theta": float(g("rope.freq_base", 10000.0)),
        "max_position_embeddings": int(g("context_length")),
        "vocab_size": int(g("vocab_size", n_vocab)),
        "bos_token_id": int(plain(metadata.get("tokenizer.ggml.bos_token_id", 1))),
        "eos_token_id": int(plain(metadata.get("tokenizer.ggml.eos_token_id", 2))),
        "pad_token_id": int(plain(metadata.get("tokenizer.ggml.padding_token_id", 2))),
        "tie_word_embeddings": True,  # set from the tensors in convert_gguf
        "attention_bias": False,
        "mlp_bias": False,
        "hidden_act": "silu",
        "rope_traditional": False,
    }


def unpermute_rows(x: Any, n_heads: int) -> Any:
    # GGUF converters permute Q/K rows per head from HF's "rotate half" layout to GGML's
    # interleaved-pairs rope layout; this is the inverse. Applied alike to packed weights,
    # scales and biases, because quantization groups run along the columns, not the rows.
    r = x.shape[0]
    return x.reshape(n_heads, r // n_heads // 2, 2, *x.shape[1:]).swapaxes(1, 2).reshape(x.shape)


def _in_dims(hf_module: str, config: Mapping[str, Any]) -> int:
    if hf_module.endswith("o_proj"):
        return config["num_attention_heads"] * config["head_dim"]
    if hf_module.endswith("down_proj"):
        return config["intermediate_size"]
    return config["hidden_size"]


def convert_gguf(
    gguf_path: Path,
    out_dir: Path,
    *,
    dequantize: bool,
    progress: bool = True,
) -> dict[str, Any]:
    """Convert a llama GGUF into an mlx-lm model directory ``out_dir``; returns its config."""
    import mlx.core as mx
    from tqdm import tqdm

    weights, metadata = mx.load(str(gguf_path), return_metadata=True)
    config = llama_config_from_gguf(metadata)
    quant_default: dict[str, int] | None = None
    quant_overrides: dict[str, dict[str, int]] = {}
    out: dict[str, Any] = {}

    modules = sorted({k.rsplit(".", 1)[0] for k in weights})
    for gmod in tqdm(modules, desc="converting SmolLM2 tensors", unit="tensor", disable=not progress):
        hmod = _hf_module(gmod)
        w = weights[f"{gmod}.weight"]
        scales = weights.get(f"{gmod}.scales")
        biases = weights.get(f"{gmod}.biases")
        n_perm = None
        if hmod.endswith("q_proj"):
            n_perm = config["num_attention_heads"]
        elif hmod.endswith("k_proj"):
            n_perm = config["num_key_value_heads"]

        if scales is None:
            # Norms (float32) or an unquantized matrix.
            w = w.astype(mx.float32)
            if n_perm:
                w = unpermute_rows(w, n_perm)
            out[f"{hmod}.weight"] = w
            continue

        # The GGUF does not say which block type each tensor had in a form mx.load keeps, so the
        # bit width and group size come from the shapes: packed uint32 columns * 32 bits over
        # the true input width gives the bits; input width over scale columns gives the group.
        in_dims = _in_dims(hmod, config)
        bits = w.shape[-1] * 32 // in_dims
        group_size = in_dims // scales.shape[-1]
        if bits * in_dims != w.shape[-1] * 32 or group_size * scales.shape[-1] != in_dims:
            raise ValueError(f"{gmod}: shapes {w.shape}/{scales.shape} do not fit {in_dims} inputs")
        # float16 scales would make MLX run the whole model in float16, which is slow on CPU
        # and no more exact: widen them (lossless).
        scales = scales.astype(mx.float32)
        biases = biases.astype(mx.float32) if biases is not None else mx.zeros_like(scales)
        if n_perm:
            w, scales, biases = (unpermute_rows(a, n_perm) for a in (w, scales, biases))
        if dequantize:
            out[f"{hmod}.weight"] = mx.dequantize(w, scales, biases, group_size=group_size, bits=bits)
        else:
            out[f"{hmod}.weight"] = w
            out[f"{hmod}.scales"] = scales
            out[f"{hmod}.biases"] = biases
            q = {"group_size": group_size, "bits": bits}
            if quant_default is None and hmod != "model.embed_tokens":
                quant_default = q
            quant_overrides[hmod] = q
        mx.eval(out)  # keep peak memory at one tensor's worth of temporaries

    config["tie_word_embeddings"] = "lm_head.weight" not in out
    if not dequantize:
        quant_default = quant_default or {"group_size": 32, "bits": 4}
        quant: dict[str, Any] = dict(quant_default)
        # mlx-lm looks up each module path in this dict first; name only the exceptions (the
        # 8-bit embedding), the rest take the default.
        for mod, q in sorted(quant_overrides.items()):
            if q != quant_default:
                quant[mod] = q
        config["quantization"] = quant
        config["quantization_config"] = quant
    config["torch_dtype"] = "float32"

    out_dir.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(out_dir / "model.safetensors"), out, metadata={"format": "mlx"})
    write_json(out_dir / "config.json", config)
    write_json(
        out_dir / "generation_config.json",
        {
            "bos_token_id": config["bos_token_id"],
            "eos_token_id": config["eos_token_id"],
            "pad_token_id": config["pad_token_id"],
        },
    )
    plain_meta = {k: v for k, v in metadata.items()}
    write_tokenizer_files(plain_meta, out_dir, model_max_length=config["max_position_embeddings"])
    return config
