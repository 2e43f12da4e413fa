"""Model families and how to recognise them."""

from __future__ import annotations

import re

from slimport.arch import bert, gpt2, llama
from slimport.arch.rules import Family, fill
from slimport.errors import SlimportError

FAMILIES: tuple[Family, ...] = (
    llama.FAMILY,
    bert.FAMILY,
    bert.ROBERTA,
    bert.DISTILBERT,
    gpt2.FAMILY,
)


def register(family: Family) -> None:
    """Add a family (used by the family modules imported below)."""
    global FAMILIES
    FAMILIES = (*FAMILIES, family)


def family_for(model_type: str | None, where: str = "config") -> Family:
    for f in FAMILIES:
        if model_type in f.model_types:
            return f
    known = sorted(t for f in FAMILIES for t in f.model_types)
    raise SlimportError(
        f"unknown architecture model_type={model_type!r} in {where}",
        hint=f"supported model types: {', '.join(known)}",
    )


# Size fields of every family's config and their sane upper bound: a positive int each, checked
# before planning (heads 0 divides by zero, 10^9 layers loops forever, "12" is a string).
SIZE_FIELDS = {
    **dict.fromkeys(("num_hidden_layers", "n_layer", "n_layers"), 1 << 12),
    **dict.fromkeys(("num_attention_heads", "num_key_value_heads", "n_head", "n_heads"), 1 << 12),
    **dict.fromkeys(("hidden_size", "n_embd", "dim", "head_dim"), 1 << 18),
    **dict.fromkeys(("intermediate_size", "n_inner", "hidden_dim"), 1 << 20),
    **dict.fromkeys(("vocab_size", "max_position_embeddings", "n_positions"), 1 << 24),
    "type_vocab_size": 1 << 16,
}
OPTIONAL = ("head_dim", "n_inner")  # null means "derive it"
# what `architectures` may name: model classes (BertModel, LlamaForCausalLM, GPT2LMHeadModel),
# never an arbitrary attribute of transformers that a quantizer or loader would then call
MODEL_CLASS = re.compile(r"[A-Z][A-Za-z0-9]*(Model|For[A-Z][A-Za-z]*)")


def check_sizes(config: dict, where: str) -> None:
    """Every size field present is a positive int within SIZE_FIELDS' bound; `architectures`
    names model classes."""
    names = config.get("architectures")
    if names is not None and (
        not isinstance(names, list)
        or not all(isinstance(n, str) and MODEL_CLASS.fullmatch(n) for n in names)
    ):
        raise SlimportError(
            f"{where}: config field architectures={names!r} must list model class names",
            hint='e.g. ["LlamaForCausalLM"]; the config.json is damaged or crafted',
        )
    for key, limit in SIZE_FIELDS.items():
        if key not in config or (key in OPTIONAL and config[key] is None):
            continue
        v = config[key]
        if not isinstance(v, int) or isinstance(v, bool) or not 0 < v <= limit:
            raise SlimportError(
                f"{where}: config field {key}={v!r} must be a positive integer <= {limit}",
                hint="the config.json is damaged or belongs to another kind of model",
            )


def resolve(config: dict | None, where: str) -> tuple[Family, dict]:
    """Family and normalised config for a checkpoint's config dict, its size fields checked."""
    if not config:
        raise SlimportError(
            f"{where}: no model config found (config.json beside the weights)",
            hint="put the model's config.json next to the checkpoint or pass --config FILE",
        )
    if not isinstance(config, dict):
        raise SlimportError(
            f"{where}: the model config is a JSON {type(config).__name__}, not an object"
        )
    family = family_for(config.get("model_type"), where)
    check_sizes(config, where)
    try:
        cfg = family.normalize(config)
    except KeyError as e:
        raise SlimportError(f"{where}: config lacks required key {e}") from None
    except (TypeError, ValueError, ArithmeticError, AttributeError) as e:
        raise SlimportError(
            f"{where}: config has a field of the wrong type or value ({e})"
        ) from None
    check_sizes(cfg, where)
    return family, cfg


def guess_config(partial: dict, shapes: dict[str, tuple[int, ...]], where: str) -> dict:
    """A config for a checkpoint that has none (an exported ONNX graph): the family, model type
    and class whose hub tensors match `shapes` best, with the keys `partial` (read from the
    graph) lacks taken from the tensor shapes (vocabulary, positions, type vocabulary, ...)."""
    best = _best_fit([(f, c) for f in FAMILIES for c in f.candidates(partial)], shapes)
    if best is None:
        raise SlimportError(f"{where}: no model family matches the tensors of the graph",
                            hint="pass the model's config.json with --config FILE")  # fmt: skip
    return best


def fit_config(config: dict, shapes: dict[str, tuple[int, ...]], where: str) -> dict:
    """A given config.json fitted to an exported graph, which holds only the parameters its
    outputs use: optimum's feature-extraction BERT keeps no pooler although config.json's
    BertModel has one. Only the family's class variants of the same model type are tried
    (pooler on/off, bare model or head); every key the config sets otherwise stays."""
    family = family_for(config.get("model_type"), where)
    same = [c for c in family.candidates(config) if c.get("model_type") == config["model_type"]]
    return _best_fit([(family, config)] + [(family, c) for c in same], shapes) or config


def _best_fit(candidates, shapes: dict[str, tuple[int, ...]]) -> dict | None:
    """The candidate config whose hub tensors match `shapes` best (the first of equals)."""
    best, best_score = None, None
    for family, cand in candidates:
        try:
            cfg = _unified(family, cand, shapes)
            expected = family.hub_tensors(family.normalize(cfg))
        except (KeyError, ValueError, TypeError, ZeroDivisionError, SlimportError):
            continue
        hit = sum(expected.get(n) == tuple(s) for n, s in shapes.items())
        score = 2 * hit - len(expected) - len(shapes)
        if best_score is None or score > best_score:
            best, best_score = cfg, score
    return best


def _unified(family: Family, cand: dict, shapes: dict[str, tuple[int, ...]]) -> dict:
    """`cand` plus the config keys the family's hub shapes read off the tensors; derived keys
    (ones `normalize` computes, such as kv_dim) are not config keys and stay out."""
    cfg = dict(cand)
    norm = family.normalize(cfg)
    for t in family.hub:
        try:
            if t.when is not None and not t.when(norm):
                continue
            name = fill(t.name, norm, 0)
        except (KeyError, IndexError, ValueError):
            continue
        if name not in shapes or len(shapes[name]) != len(t.shape):
            continue
        for dim, size in zip(t.shape, shapes[name], strict=True):
            if isinstance(dim, str) and dim not in cfg:
                probe = family.normalize({**cfg, dim: -1})
                if probe.get(dim) == -1:  # a key normalize keeps: a real config key
                    cfg[dim] = int(size)
    return cfg
