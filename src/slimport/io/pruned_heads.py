"""BERT-family folders whose attention heads were removed: `pruned_heads` in config.json.

transformers 4 wrote and read this: config.json lists the removed heads per layer
(`{"0": [1, 5], ...}`), the query/key/value rows and the output projection's columns of those
heads are gone from the weights, and `from_pretrained` shrinks each layer before loading them.
transformers 5 dropped the feature (its BERT sizes every layer's attention from the config
alone and refuses the smaller tensors), but its attention code still runs any head count
(heads are views of head size over the projection's width). So slimport keeps the format:
the folders `slimport prune --structured heads` writes load in plain transformers 4, and
`from_pretrained` here loads them under transformers 5 by resizing the four Linears of every
pruned layer, exactly as transformers 4 did, before loading the weights.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from slimport.errors import SlimportError

# model_type -> the attention's names inside a layer (self-attention, its output projection)
FAMILIES = {
    "bert": ("attention.self", "attention.output.dense"),
    "roberta": ("attention.self", "attention.output.dense"),
}


def pruned_heads(config) -> dict[int, list[int]]:
    """The removed heads per layer, as ints ({} when none); JSON stores the layers as strings."""
    raw = getattr(config, "pruned_heads", None) or {}
    return {int(k): sorted(int(h) for h in v) for k, v in raw.items() if v}


def apply(model: nn.Module, removed: dict[int, list[int]]) -> nn.Module:
    """Shrink `model`'s attention to the heads `removed` leaves (uninitialised weights: load a
    state dict after). The kept heads stay in their original order, as transformers 4 kept them."""
    kind = model.config.model_type
    if not removed:
        return model
    if kind not in FAMILIES:
        raise SlimportError(
            f"{kind}: `pruned_heads` is read for " + ", ".join(FAMILIES) + " only",
            hint="remove `pruned_heads` from config.json if the weights are full size",
        )
    attn_name, out_name = FAMILIES[kind]
    layers = next(m for n, m in model.named_modules() if n.endswith("encoder.layer"))
    h = model.config.num_attention_heads
    d = model.config.hidden_size // h
    for i, heads in removed.items():
        if not 0 <= i < len(layers) or not set(heads) <= set(range(h)) or len(heads) >= h:
            raise SlimportError(
                f"config.json: pruned_heads {{{i}: {heads}}} does not fit {len(layers)} layers "
                f"of {h} heads (at least one head must stay)",
                hint="the folder's config does not belong to its weights",
            )
        block = layers[i]
        attn, out = block.get_submodule(attn_name), block.get_submodule(out_name)
        width = (h - len(heads)) * d
        for name in ("query", "key", "value"):
            old = getattr(attn, name)
            setattr(attn, name, nn.Linear(old.in_features, width, dtype=old.weight.dtype))
        parent = block.get_submodule(out_name.rsplit(".", 1)[0])
        parent.dense = nn.Linear(width, out.out_features, dtype=out.weight.dtype)
        attn.num_attention_heads, attn.all_head_size = h - len(heads), width
    return model


def _state_dict(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    index = folder / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (folder / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise SlimportError(
            f"{folder}: a pruned-heads folder without model.safetensors",
            hint="slimport reads pruned-heads folders from safetensors weights",
        )
    sd: dict[str, torch.Tensor] = {}
    for f in files:
        sd.update(load_file(folder / f))
    return sd


def from_pretrained(cls, folder: str | Path, dtype: torch.dtype | None = None, **config_kw):
    """`cls.from_pretrained(folder, dtype=..., **config_kw)`, also for folders with
    `pruned_heads` (see the module docstring)."""
    import transformers

    folder = Path(folder)
    config = transformers.AutoConfig.from_pretrained(folder, **config_kw)
    removed = pruned_heads(config)
    if not removed:
        kw = {"dtype": dtype} if dtype is not None else {}
        return cls.from_pretrained(folder, **kw, **config_kw)
    model = apply(
        cls.from_config(config) if cls.__name__.startswith("Auto") else cls(config), removed
    )
    sd = _state_dict(folder)
    shapes = model.state_dict()
    wrong = [k for k, t in sd.items() if k in shapes and t.shape != shapes[k].shape]
    result = None if wrong else model.load_state_dict(sd, strict=False)
    missing = [k for k in result.missing_keys if not _is_tied(model, k)] if result else []
    if wrong or missing or result.unexpected_keys:
        what = (
            f"{wrong[0]} is {list(sd[wrong[0]].shape)}, the config says {list(shapes[wrong[0]].shape)}"
            if wrong
            else f"missing {missing[:3]}, unexpected {result.unexpected_keys[:3]}"
        )
        raise SlimportError(
            f"{folder}: the weights do not fit the pruned-heads config: {what}",
            hint="the folder's config.json does not belong to its weights",
        )
    return model.to(dtype or torch.float32).eval()


def _is_tied(model: nn.Module, name: str) -> bool:
    """Whether parameter `name` shares its tensor with another (an output head tied to the
    embedding: saved once)."""
    params = dict(model.named_parameters(remove_duplicate=False))
    p = params.get(name)
    return p is not None and any(q is p for n, q in params.items() if n != name)
