"""LoRA for our MindSpore Cells: `LoraDense` wraps an `nn.Dense` as peft's LoraLayer wraps a
torch Linear (`y = W x + b + (alpha / rank) * B A dropout(x)`), targets picked by the same
regex over the same module names, merge-and-unload, and adapters read and written in peft's
layout (compress/lora.py), so the two runtimes exchange adapters bit for bit.

Parameter names: the wrapped layer keeps its own (`...q_proj.weight`), the adapter's are
`...q_proj.lora_A.weight` / `...lora_B.weight`, peft's saved names minus `base_model.model.`.
"""

from __future__ import annotations

import time
from pathlib import Path

import mindspore as ms
import numpy as np
from mindspore import nn

from slimport.compress import lora
from slimport.errors import SlimportError, name_list


class LoraDense(nn.Cell):
    """`base` (an nn.Dense, frozen) plus the low-rank update B @ A, scaled by alpha / rank."""

    def __init__(self, base: nn.Dense, rank: int, scaling: float, dropout: float, a: np.ndarray):
        super().__init__()
        module = base.weight.name.removesuffix(".weight")
        names = [(p, p.name) for p in base.get_parameters()]
        self.base = base
        self.lora_A = nn.Dense(base.in_channels, rank, has_bias=False, weight_init=ms.Tensor(a))
        self.lora_B = nn.Dense(rank, base.out_channels, has_bias=False, weight_init="zeros")
        self.dropout = nn.Dropout(p=dropout) if dropout else None
        self.scaling = float(scaling)
        # nn.Cell prefixes the attribute name to its children's parameters: keep the checkpoint
        # names of the base layer, give the adapter peft's
        for p, name in names:
            p.name = name
        self.lora_A.weight.name = module + ".lora_A.weight"
        self.lora_B.weight.name = module + ".lora_B.weight"
        self.module = module
        for p in base.get_parameters():
            p.requires_grad = False

    def construct(self, x):
        h = self.dropout(x) if self.dropout is not None else x
        return self.base(x) + self.lora_B(self.lora_A(h)) * self.scaling

    def merged(self) -> nn.Dense:
        """The base layer with `scaling * B @ A` folded into its weight (float32)."""
        w = self.base.weight.asnumpy().astype(np.float32)
        delta = self.lora_B.weight.asnumpy() @ self.lora_A.weight.asnumpy()
        self.base.weight.set_data(ms.Tensor(w + self.scaling * delta, self.base.weight.dtype))
        return self.base


def _dense_layers(net: nn.Cell) -> list[tuple[nn.Cell, str, nn.Dense]]:
    """(parent, attribute, layer) of every nn.Dense, in module order."""
    return [
        (parent, attr, child)
        for _, parent in net.cells_and_names()
        for attr, child in parent.name_cells().items()
        if isinstance(child, nn.Dense) and not isinstance(parent, LoraDense)
    ]


def _set_child(parent: nn.Cell, attr: str, cell: nn.Cell) -> None:
    names = [(p, p.name) for p in cell.get_parameters()]
    setattr(parent, attr, cell)
    for p, name in names:  # undo the attribute prefix setattr adds
        p.name = name


def add_lora(net: nn.Cell, settings: lora.LoraSettings, seed: int = 0) -> list[str]:
    """Wrap the Dense layers matching the settings' targets in LoraDense, freeze everything
    else; lora_A drawn from numpy as compress.lora.add_lora draws it. Returns the modules."""
    settings.check()
    pattern = lora.target_pattern(settings, net.config.get("model_type"))
    layers = _dense_layers(net)
    by_name = {
        d.weight.name.removesuffix(".weight"): (parent, attr, d) for parent, attr, d in layers
    }
    targets = lora.match_targets(list(by_name), pattern, type(net).__name__)
    for p in net.get_parameters():
        p.requires_grad = False
    rng = np.random.default_rng(seed)
    for name in targets:
        parent, attr, dense = by_name[name]
        a = lora.kaiming_a(settings.rank, dense.in_channels, rng)
        cell = LoraDense(dense, settings.rank, settings.scaling, settings.dropout, a)
        _set_child(parent, attr, cell)
    return targets


def lora_layers(net: nn.Cell) -> list[tuple[nn.Cell, str, LoraDense]]:
    return [
        (parent, attr, child)
        for _, parent in net.cells_and_names()
        for attr, child in parent.name_cells().items()
        if isinstance(child, LoraDense)
    ]


def param_groups(net: nn.Cell, weight_decay: float) -> list[dict]:
    """AdamW groups: the LoRA matrices without weight decay, other trainable ones with it."""
    adapter = {id(p) for _, _, cell in lora_layers(net) for p in cell.lora_A.get_parameters()}
    adapter |= {id(p) for _, _, cell in lora_layers(net) for p in cell.lora_B.get_parameters()}
    params = net.trainable_params()
    return [
        {"params": [p for p in params if id(p) in adapter], "weight_decay": 0.0},
        {"params": [p for p in params if id(p) not in adapter], "weight_decay": weight_decay},
    ]


def lora_tensors(net: nn.Cell) -> dict[str, np.ndarray]:
    """{our name: float32 array} of the adapter (peft's names minus `base_model.model.`)."""
    out = {}
    for _, _, cell in lora_layers(net):
        for p in (cell.lora_A.weight, cell.lora_B.weight):
            out[p.name] = p.asnumpy().astype(np.float32)
    if not out:
        raise SlimportError(f"{type(net).__name__} has no LoRA layers", hint="add_lora first")
    return out


def save_adapter(net: nn.Cell, folder: str | Path, settings: lora.LoraSettings, base: str) -> Path:
    """The adapter in peft's layout (`PeftModel.from_pretrained` loads it onto the torch model)."""
    pattern = lora.target_pattern(settings, net.config.get("model_type"))
    config = lora.peft_config(settings, pattern, base, "CAUSAL_LM")
    return lora.write_adapter(folder, lora_tensors(net), config)


def load_adapter(net: nn.Cell, folder: str | Path) -> lora.LoraSettings:
    """Add LoRA as the adapter's config says and load its tensors (peft's or ours) exactly."""
    tensors, config = lora.read_adapter(folder)
    settings = lora.settings_of(config)
    if settings.targets is None:  # a list of module-name suffixes, as peft also accepts
        suffixes = "|".join(map(str, config["target_modules"]))
        settings = lora.LoraSettings(
            settings.rank, settings.alpha, settings.dropout, f".*\\.({suffixes})"
        )
    add_lora(net, settings)
    params = {p.name: p for p in net.get_parameters()}
    missing = sorted(set(lora_tensors(net)) - set(tensors))
    unknown = sorted(set(tensors) - set(params))
    if missing or unknown:
        raise SlimportError(
            f"{folder}: the adapter does not fit {type(net).__name__}: "
            + (f"no tensor for {name_list(missing)}. " if missing else "")
            + (f"no layer for {name_list(unknown)}." if unknown else ""),
            hint="load the adapter onto the model it was trained for",
        )
    for name, value in tensors.items():
        if tuple(params[name].shape) != value.shape:
            raise SlimportError(
                f"{folder}: {name} is {list(value.shape)}, the model expects {list(params[name].shape)}"
            )
        params[name].set_data(ms.Tensor(value))
    return settings


def merge_and_unload(net: nn.Cell) -> nn.Cell:
    """Fold every adapter into its base layer and put the plain Dense back (peft's merge)."""
    for parent, attr, cell in lora_layers(net):
        _set_child(parent, attr, cell.merged())
    # graph mode caches the compiled graph per Cell (keyed by its creation time): a new time
    # makes the next call compile the merged network instead of rerunning the LoRA one
    for _, cell in net.cells_and_names():
        object.__setattr__(cell, "_create_time", time.time_ns())
    return net
