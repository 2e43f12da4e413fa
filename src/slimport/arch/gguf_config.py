"""GGUF metadata <-> Hugging Face config, for the Llama family (llama, mistral, qwen2).

GGUF keeps the model config as `{arch}.*` keys (llama.cpp's names, see gguf-py `Keys`). Mistral is
written as `llama` by llama.cpp, so it reads back as a Llama config (same tensors, same numerics).
The tokenizer (`tokenizer.ggml.*` keys) is format I/O: slimport.io.gguf_tokenizer.
"""

from __future__ import annotations

from slimport.errors import SlimportError

# general.architecture -> (model_type, HF class)
_ARCH = {"llama": ("llama", "LlamaForCausalLM"), "qwen2": ("qwen2", "Qwen2ForCausalLM")}
# HF special token name -> GGUF key suffix (tokenizer.ggml.<suffix>)
_SPECIAL_IDS = {"bos": "bos_token_id", "eos": "eos_token_id", "pad": "padding_token_id"}


def config_from_gguf(meta: dict) -> dict:
    """HF config.json dict from GGUF metadata (plus `__tensors__`: the file's tensor names)."""
    arch = meta.get("general.architecture")
    if arch not in _ARCH:
        raise SlimportError(
            f"GGUF general.architecture {arch!r} is not a Llama-family layout slimport reads",
            hint="supported GGUF architectures: " + ", ".join(_ARCH),
        )
    model_type, cls = _ARCH[arch]
    tensors = set(meta.get("__tensors__", ()))

    def get(key: str, default=SlimportError):
        value = meta.get(f"{arch}.{key}", default)
        if value is SlimportError:
            raise SlimportError(
                f"GGUF metadata lacks {arch}.{key}",
                hint="the file was not written by llama.cpp's converter; pass --config config.json",
            )
        return value

    hidden, heads = int(get("embedding_length")), int(get("attention.head_count"))
    vocab = meta.get(f"{arch}.vocab_size")
    if vocab is None and "tokenizer.ggml.tokens" in meta:
        vocab = len(meta["tokenizer.ggml.tokens"])
    if vocab is None:
        raise SlimportError(
            f"GGUF metadata has neither {arch}.vocab_size nor tokenizer.ggml.tokens",
            hint="pass --config",
        )
    cfg = {
        "architectures": [cls],
        "model_type": model_type,
        "hidden_size": hidden,
        "intermediate_size": int(get("feed_forward_length")),
        "num_hidden_layers": int(get("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(get("attention.head_count_kv", heads)),
        "max_position_embeddings": int(get("context_length", 2048)),
        "rms_norm_eps": float(get("attention.layer_norm_rms_epsilon")),
        "rope_theta": float(get("rope.freq_base", 10000.0)),
        "vocab_size": int(vocab),
        "hidden_act": "silu",
        "tie_word_embeddings": "output.weight" not in tensors,
    }
    rope_dim = get("rope.dimension_count", None)
    head_dim = (
        get("attention.key_length", None)
        or (rope_dim if arch == "llama" else None)
        or hidden // heads
    )
    if rope_dim is not None and rope_dim != head_dim:
        raise SlimportError(
            f"GGUF {arch}.rope.dimension_count={rope_dim} differs from the head size {head_dim}: "
            "partial rotary embeddings have no Hugging Face Llama/Qwen2 equivalent"
        )
    if arch == "llama" or head_dim != hidden // heads:
        cfg["head_dim"] = int(head_dim)
    if arch == "llama":
        cfg["attention_bias"] = "blk.0.attn_q.bias" in tensors
        cfg["mlp_bias"] = "blk.0.ffn_up.bias" in tensors
    scaling = _rope_scaling_from_gguf(arch, meta)
    if scaling:
        cfg["rope_scaling"] = scaling
    for name, key in _SPECIAL_IDS.items():
        if f"tokenizer.ggml.{key}" in meta:
            cfg[f"{name}_token_id"] = int(meta[f"tokenizer.ggml.{key}"])
    types = meta.get("gguf_types", {})
    cfg["torch_dtype"] = (
        "bfloat16" if "BF16" in types else "float16" if "F16" in types else "float32"
    )
    return cfg


def _rope_scaling_from_gguf(arch: str, meta: dict) -> dict | None:
    kind = meta.get(f"{arch}.rope.scaling.type")
    factor = meta.get(f"{arch}.rope.scaling.factor") or meta.get(f"{arch}.rope.scale_linear")
    if kind is None and factor is not None:
        kind = "linear"  # old files only wrote rope.scale_linear
    if kind in (None, "none") or factor is None:
        return None
    if kind not in ("linear", "yarn"):
        raise SlimportError(
            f"GGUF {arch}.rope.scaling.type={kind!r} is not supported",
            hint="supported: linear, yarn",
        )
    out = {"rope_type": kind, "factor": float(factor)}
    if kind == "yarn" and f"{arch}.rope.scaling.original_context_length" in meta:
        out["original_max_position_embeddings"] = int(
            meta[f"{arch}.rope.scaling.original_context_length"]
        )
    return out


def config_to_gguf(cfg: dict) -> dict:
    """GGUF metadata (`general.architecture`, `{arch}.*`, special token ids) from a normalised HF config.

    Python ints become UINT32 and floats FLOAT32 when written, as llama.cpp writes these keys.
    """
    mt = cfg["model_type"]
    arch = "qwen2" if mt == "qwen2" else "llama"  # llama.cpp writes Mistral as llama
    rope = cfg.get("rope_parameters") or {}
    theta = rope.get("rope_theta", cfg.get("rope_theta", 10000.0))
    hidden, heads, head_dim = cfg["hidden_size"], cfg["num_attention_heads"], cfg["head_dim"]
    meta = {
        "general.architecture": arch,
        f"{arch}.block_count": cfg["num_hidden_layers"],
        f"{arch}.context_length": cfg.get("max_position_embeddings", 2048),
        f"{arch}.embedding_length": hidden,
        f"{arch}.feed_forward_length": cfg["intermediate_size"],
        f"{arch}.attention.head_count": heads,
        f"{arch}.attention.head_count_kv": cfg["num_key_value_heads"],
        f"{arch}.rope.freq_base": float(theta),
        f"{arch}.attention.layer_norm_rms_epsilon": float(cfg["rms_norm_eps"]),
        f"{arch}.rope.dimension_count": head_dim,
        f"{arch}.vocab_size": cfg["vocab_size"],
    }
    if head_dim != hidden // heads:
        meta[f"{arch}.attention.key_length"] = meta[f"{arch}.attention.value_length"] = head_dim
    if cfg.get("hidden_act", "silu") != "silu":
        raise SlimportError(
            f"hidden_act={cfg['hidden_act']!r}: llama.cpp's {arch} graph only runs SiLU"
        )
    kind = (
        rope.get("rope_type")
        or (cfg.get("rope_scaling") or {}).get("rope_type")
        or (cfg.get("rope_scaling") or {}).get("type")
    )
    if kind not in (None, "default"):
        scaling = {**(cfg.get("rope_scaling") or {}), **rope}
        if kind not in ("linear", "yarn"):
            raise SlimportError(
                f"rope type {kind!r} cannot be written to GGUF by slimport",
                hint="supported: default, linear, yarn",
            )
        meta[f"{arch}.rope.scaling.type"] = kind
        meta[f"{arch}.rope.scaling.factor"] = float(scaling["factor"])
        if "original_max_position_embeddings" in scaling:
            meta[f"{arch}.rope.scaling.original_context_length"] = int(
                scaling["original_max_position_embeddings"]
            )
    for name, key in _SPECIAL_IDS.items():
        value = cfg.get(f"{name}_token_id")
        if isinstance(value, list):  # several eos ids (llama 3): GGUF has one
            value = value[0] if value else None
        if isinstance(value, int) and value >= 0:
            meta[f"tokenizer.ggml.{key}"] = value
    return meta
