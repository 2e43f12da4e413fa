"""GGUF metadata <-> Hugging Face config and tokenizer, for the Llama family (llama, mistral, qwen2).

GGUF keeps the model config as `{arch}.*` keys and the tokenizer as `tokenizer.ggml.*` keys
(llama.cpp's names, see gguf-py `Keys`). Mistral is written as `llama` by llama.cpp, so it reads
back as a Llama config (same tensors, same numerics). Reading the embedded tokenizer reuses
transformers' own GGUF tokenizer builder, so the HF files we write tokenize exactly like
`AutoTokenizer.from_pretrained(dir, gguf_file=...)`; writing one follows llama.cpp's
convert_hf_to_gguf (BPE vocab as token strings + merges, added tokens typed CONTROL/USER_DEFINED).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path

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


# --- tokenizer: GGUF -> HF files -------------------------------------------------------------

_HF_SPECIAL = {"bos_token": "bos_token_id", "eos_token": "eos_token_id", "unk_token": "unknown_token_id",
               "pad_token": "padding_token_id"}  # fmt: skip


def has_tokenizer(meta: dict) -> bool:
    return "tokenizer.ggml.tokens" in meta and "tokenizer.ggml.model" in meta


def write_hf_tokenizer(meta: dict, folder: Path, where: str = "GGUF") -> list[str]:
    """Write tokenizer.json, tokenizer_config.json, ... built from the GGUF tokenizer into `folder`.

    Mirrors transformers' `get_gguf_tokenizer` + `convert_gguf_tokenizer` (what
    `AutoTokenizer.from_pretrained(dir, gguf_file=...)` runs) on metadata we already parsed.
    """
    try:
        from transformers.integrations.gguf import GGUF_TOKENIZER_MAPPING, convert_gguf_tokenizer
    except ImportError:  # transformers 4.x kept them here
        from transformers.integrations.ggml import GGUF_TOKENIZER_MAPPING, convert_gguf_tokenizer
    from transformers import PreTrainedTokenizerFast

    grouped = {
        group: {
            name: _plain(meta[f"tokenizer.{key}"])
            for key, name in renames.items()
            if f"tokenizer.{key}" in meta
        }
        for group, renames in GGUF_TOKENIZER_MAPPING.items()
    }
    tokenizer, tokenizer_config = grouped["tokenizer"], grouped["tokenizer_config"]
    if tokenizer.get("tokenizer_type") == "llama":
        tokenizer_config.setdefault(
            "add_bos_token", True
        )  # llama.cpp's default for sentencepiece vocabularies
    tokens = tokenizer["tokens"]
    for name, key in _HF_SPECIAL.items():
        token_id = meta.get(f"tokenizer.ggml.{key}")
        tokenizer_config[name] = (
            tokens[token_id] if token_id is not None and 0 <= token_id < len(tokens) else None
        )
    try:
        backend, extra = convert_gguf_tokenizer(meta["general.architecture"], tokenizer)
    except (ValueError, KeyError, NotImplementedError) as e:
        raise SlimportError(
            f"{where}: cannot rebuild its tokenizer with transformers ({e})"
        ) from None
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, **tokenizer_config, **extra)
    before = {p.name for p in folder.iterdir()}
    tok.save_pretrained(folder)
    return sorted(p.name for p in folder.iterdir() if p.name not in before)


def _plain(value):
    """Lazy GGUF arrays -> lists (transformers' builders index and zip them)."""
    return list(value) if isinstance(value, Sequence) and not isinstance(value, str) else value


# --- tokenizer: HF folder -> GGUF metadata ---------------------------------------------------

# tokenizer.json pre-tokenizer -> llama.cpp `tokenizer.ggml.pre` (the ones Llama-family models use)
_PRE_SPLITS = {
    "qwen2": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
    "llama-bpe": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
}


def _looks_special(token: str) -> bool:
    """llama.cpp's does_token_look_special: added tokens that ought to be CONTROL."""
    return (
        token in ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
        or (token.startswith("<|") and token.endswith("|>"))
        or (token.startswith("<\uff5c") and token.endswith("\uff5c>"))
        or (token.startswith("<unused") and token.endswith(">"))
    )


def _pre_tokenizer_name(pre: dict | None) -> str:
    """Name llama.cpp gives the pre-tokenizer of a byte-level BPE tokenizer.json."""
    steps = (pre or {}).get("pretokenizers") or ([pre] if pre else [])
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits"):
        return "smollm"
    if kinds and kinds[0] == "Split":
        pattern = (steps[0].get("pattern") or {}).get("Regex")
        for name, regex in _PRE_SPLITS.items():
            if pattern == regex:
                return name
    return "default"


def gguf_tokenizer_from_hf(folder: Path, vocab_size: int) -> tuple[dict, dict]:
    """`tokenizer.ggml.*` metadata for a byte-level BPE tokenizer.json in `folder`, as
    (values, GGUF array element type names). Returns ({}, {}) when there is no such tokenizer."""
    import gguf

    path = folder / "tokenizer.json"
    if not path.is_file():
        return {}, {}
    try:
        tj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise SlimportError(f"{path}: cannot read tokenizer ({e})") from None
    model = tj.get("model") or {}
    if (
        model.get("type") != "BPE"
        or model.get("byte_fallback")
        or (tj.get("decoder") or {}).get("type") != "ByteLevel"
    ):
        import warnings

        warnings.warn(
            f"{path}: only byte-level BPE tokenizers are embedded into GGUF; writing no tokenizer",
            stacklevel=2,
        )
        return {}, {}
    reverse = {i: t for t, i in model["vocab"].items()}
    added = {a["id"]: a for a in tj.get("added_tokens", [])}
    top = max([*reverse, *added], default=-1)
    if top >= vocab_size:
        raise SlimportError(
            f"{path}: token id {top} is outside the model's vocab_size {vocab_size}"
        )
    tokens, types = [], []
    for i in range(vocab_size):
        if i in added:
            tok = added[i]["content"]
            special = added[i].get("special") or _looks_special(tok)
            types.append(gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED)
        elif i in reverse:
            tok = reverse[i]
            types.append(gguf.TokenType.NORMAL)
        else:
            tok = f"[PAD{i}]"
            types.append(gguf.TokenType.UNUSED)
        tokens.append(tok)
    special = gguf.SpecialVocab(folder, load_merges=True, n_vocab=vocab_size)
    _add_special_flags(path, special)
    K = gguf.Keys.Tokenizer
    meta = {
        K.MODEL: "gpt2",
        K.PRE: _pre_tokenizer_name(tj.get("pre_tokenizer")),
        K.LIST: tokens,
        K.TOKEN_TYPE: [int(t) for t in types],
        K.MERGES: special.merges,
    }
    for typ, tid in special.special_token_ids.items():
        key = getattr(K, f"{typ.upper()}_ID", None)
        if key is not None:
            meta[key] = tid
    for typ, flag in special.add_special_token.items():
        key = getattr(K, f"ADD_{typ.upper()}", None)
        if key is not None:
            meta[key] = bool(flag)
    if isinstance(special.chat_template, str):
        meta[K.CHAT_TEMPLATE] = special.chat_template
    return {k: v for k, v in meta.items() if v != []}, {K.TOKEN_TYPE: "INT32"}


def _add_special_flags(path: Path, special) -> None:
    """add_bos/add_eos as the tokenizer really behaves, when tokenizer_config.json does not say
    (llama.cpp's defaults differ from it by vocabulary type)."""
    from tokenizers import Tokenizer

    ids = Tokenizer.from_file(str(path)).encode("a", add_special_tokens=True).ids
    for typ, at in (("bos", 0), ("eos", -1)):
        tid = special.special_token_ids.get(typ)
        if typ not in special.add_special_token and tid is not None:
            special.add_special_token[typ] = bool(ids) and ids[at] == tid


def name_from_hf(cfg: dict) -> str | None:
    """A readable general.name from an HF config's _name_or_path (a hub id or a folder)."""
    name = cfg.get("_name_or_path") or ""
    name = re.split(r"[/\\]", name.rstrip("/\\"))[-1]
    return name or None
