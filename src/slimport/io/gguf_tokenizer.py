"""GGUF's embedded tokenizer (`tokenizer.ggml.*` metadata) <-> Hugging Face tokenizer files.

Reading reuses transformers' own GGUF tokenizer builder, so the HF files we write tokenize exactly
like `AutoTokenizer.from_pretrained(dir, gguf_file=...)`; writing follows llama.cpp's
convert_hf_to_gguf (BPE vocab as token strings + merges, added tokens typed CONTROL/USER_DEFINED).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from slimport.errors import SlimportError
from slimport.io import gguf_pretokenizers as pretokenizers

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


def _pre_tokenizer_name(path: Path, pre: dict | None) -> str:
    """Name llama.cpp gives the pre-tokenizer of a byte-level BPE tokenizer.json: by the hash of
    its token ids for a probe text, as convert_hf_to_gguf does; else by the pre-tokenizer's shape
    (a vocabulary of its own behind a known regex); else `default`, with a warning."""
    import hashlib

    from tokenizers import Tokenizer

    ids = Tokenizer.from_file(str(path)).encode(pretokenizers.PROBE, add_special_tokens=True).ids
    digest = hashlib.sha256(str(ids).encode()).hexdigest()
    if digest in pretokenizers.BY_HASH:
        return pretokenizers.BY_HASH[digest]
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
    import warnings

    warnings.warn(
        f"{path}: pre-tokenizer not recognised (probe hash {digest}); writing "
        "tokenizer.ggml.pre = default, which llama.cpp may tokenize differently",
        stacklevel=3,
    )
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
        K.PRE: _pre_tokenizer_name(path, tj.get("pre_tokenizer")),
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
