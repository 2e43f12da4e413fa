"""LoRA adapters: settings, target selection and peft's on-disk format, plus the torch side
(through `peft`, the ecosystem's implementation).

An adapter folder is peft's layout, whichever runtime trained it: `adapter_config.json` and
`adapter_model.safetensors` with tensors named `base_model.model.<module>.lora_A.weight`
[rank, in] and `...lora_B.weight` [out, rank], so `PeftModel.from_pretrained` loads ours. The
update is `W + (alpha / rank) * B @ A`; A starts uniform(±1/sqrt(in)) (kaiming-uniform with
a=sqrt(5), as peft and torch.nn.Linear), B at zero, so training starts from the base model.

Targets are one regular expression matched (in full) against module names, as peft matches a
string `target_modules`; our MindSpore Cells carry the same module names as transformers'
models, so one pattern selects the same layers in both runtimes.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from slimport.errors import SlimportError, name_list
from slimport.io.base import atomic_dir

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"

# The targets: attention q/v/o and the SwiGLU gate/up projections; BERT's q/v.
DEFAULT_TARGETS = {
    "llama": r".*\.(q_proj|v_proj|o_proj|gate_proj|up_proj)",
    "mistral": r".*\.(q_proj|v_proj|o_proj|gate_proj|up_proj)",
    "qwen2": r".*\.(q_proj|v_proj|o_proj|gate_proj|up_proj)",
    "bert": r".*\.(query|value)",
}

# Our adapter tensor names -> peft's saved names ({module}: the wrapped layer's module path).
PEFT_NAMES = (
    ("{module}.lora_A.weight", "base_model.model.{module}.lora_A.weight"),
    ("{module}.lora_B.weight", "base_model.model.{module}.lora_B.weight"),
)


@dataclass(frozen=True)
class LoraSettings:
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: str | None = None  # regex over module names; None: DEFAULT_TARGETS of the family

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    def check(self) -> None:
        if self.rank < 1 or not self.alpha > 0 or not 0 <= self.dropout < 1:
            raise SlimportError(
                f"LoRA needs rank >= 1, alpha > 0 and 0 <= dropout < 1 "
                f"(got rank={self.rank}, alpha={self.alpha}, dropout={self.dropout})"
            )


def target_pattern(settings: LoraSettings, model_type: str) -> str:
    if settings.targets:
        try:
            re.compile(settings.targets)
        except re.error as e:
            raise SlimportError(
                f"--targets {settings.targets!r}: not a regular expression ({e})"
            ) from None
        return settings.targets
    if model_type not in DEFAULT_TARGETS:
        raise SlimportError(
            f"no default LoRA targets for model_type={model_type!r}",
            hint="pass --targets REGEX over the model's linear layer names",
        )
    return DEFAULT_TARGETS[model_type]


def match_targets(linears: Iterable[str], pattern: str, where: str) -> list[str]:
    """The linear layers whose module name matches `pattern` in full; none is an error."""
    linears = list(linears)
    hits = [n for n in linears if re.fullmatch(pattern, n)]
    if not hits:
        raise SlimportError(
            f"{where}: LoRA targets {pattern!r} match none of its {len(linears)} linear layers",
            hint="the pattern must match whole module names, e.g. "
            + (repr(".*\\." + linears[0].rsplit(".", 1)[-1]) if linears else "'.*\\.q_proj'")
            + f"; linear layers: {name_list(linears, 6)}",
        )
    return hits


def kaiming_a(rank: int, n_in: int, rng: np.random.Generator) -> np.ndarray:
    """lora_A's initialisation: uniform(±1/sqrt(in)), float32 [rank, in]."""
    bound = 1.0 / math.sqrt(n_in)
    return rng.uniform(-bound, bound, size=(rank, n_in)).astype(np.float32)


# --- peft's on-disk format -------------------------------------------------------------------
def peft_config(settings: LoraSettings, pattern: str, base: str, task: str | None) -> dict:
    """adapter_config.json: the fields peft reads (it fills the rest with its defaults)."""
    return {
        "peft_type": "LORA",
        "task_type": task,
        "base_model_name_or_path": base,
        "r": settings.rank,
        "lora_alpha": settings.alpha,
        "lora_dropout": settings.dropout,
        "target_modules": pattern,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
    }


def _name_rules(reverse: bool) -> list[tuple[re.Pattern, str]]:
    rules = []
    for ours, peft in PEFT_NAMES:
        src, dst = (peft, ours) if reverse else (ours, peft)
        regex = re.escape(src).replace(re.escape("{module}"), "(?P<module>.+)")
        rules.append((re.compile(regex), dst))
    return rules


def rename(names: Iterable[str], to_peft: bool) -> dict[str, str]:
    """Our adapter tensor names -> peft's (or back): {old: new}; an unknown name is an error."""
    rules, out = _name_rules(reverse=not to_peft), {}
    for name in names:
        for regex, template in rules:
            if m := regex.fullmatch(name):
                out[name] = template.format(module=m["module"])
                break
        else:
            raise SlimportError(
                f"adapter tensor {name!r} is not a LoRA A/B weight",
                hint="expected: " + ", ".join(pair[not to_peft] for pair in PEFT_NAMES),
            )
    return out


def write_adapter(
    folder: str | Path, tensors: dict[str, np.ndarray], config: dict, extra: dict | None = None
) -> Path:
    """Save an adapter ({our name: float32 array}) in peft's layout, atomically; `extra`:
    {file name: text} written beside it (a training report)."""
    from safetensors.numpy import save_file

    folder = Path(folder)
    names = rename(tensors, to_peft=True)
    with atomic_dir(folder, overwrite=True) as tmp:
        save_file(
            {names[k]: np.ascontiguousarray(v) for k, v in tensors.items()},
            str(tmp / ADAPTER_WEIGHTS),
            metadata={"format": "pt"},
        )
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        for name, text in (extra or {}).items():
            (tmp / name).write_text(text)
    return folder


def read_adapter(folder: str | Path) -> tuple[dict[str, np.ndarray], dict]:
    """({our name: array}, adapter_config) of a peft LoRA folder."""
    from safetensors.numpy import load_file

    folder = Path(folder)
    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        if not (folder / name).is_file():
            raise SlimportError(f"{folder}: not a LoRA adapter folder (no {name})")
    config = json.loads((folder / ADAPTER_CONFIG).read_text())
    if config.get("peft_type") != "LORA":
        raise SlimportError(f"{folder}: a {config.get('peft_type')} adapter; only LoRA is read")
    tensors = load_file(str(folder / ADAPTER_WEIGHTS))
    names = rename(tensors, to_peft=False)
    return {names[k]: v for k, v in tensors.items()}, config


def settings_of(config: dict) -> LoraSettings:
    return LoraSettings(
        int(config["r"]), float(config["lora_alpha"]), float(config.get("lora_dropout", 0.0)),
        config["target_modules"] if isinstance(config["target_modules"], str) else None,
    )  # fmt: skip


# --- torch, through peft ---------------------------------------------------------------------
def torch_linears(model: torch.nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]


def add_lora(model: torch.nn.Module, settings: LoraSettings, seed: int = 0):
    """`model` wrapped by peft with LoRA on the matching Linear layers (the rest frozen).

    lora_A is drawn from numpy (seeded), not torch's generator, so the MindSpore runtime starts
    from the same adapter given the same seed."""
    import peft

    settings.check()
    pattern = target_pattern(settings, model.config.model_type)
    targets = match_targets(torch_linears(model), pattern, type(model).__name__)
    config = peft.LoraConfig(
        r=settings.rank, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
        target_modules=pattern, bias="none",
    )  # fmt: skip
    net = peft.get_peft_model(model, config)
    rng = np.random.default_rng(seed)
    modules = dict(net.base_model.model.named_modules())
    with torch.no_grad():
        for name in targets:  # in module order, as the MindSpore side draws them
            layer = modules[name]
            a = layer.lora_A["default"].weight
            a.copy_(torch.from_numpy(kaiming_a(a.shape[0], a.shape[1], rng)))
    return net


def lora_tensors(net) -> dict[str, np.ndarray]:
    """{our name: float32 array} of a peft model's adapter."""
    import peft

    state = peft.get_peft_model_state_dict(net)
    names = rename(state, to_peft=False)
    return {names[k]: v.detach().float().numpy().copy() for k, v in state.items()}


def save_lora(net, folder: str | Path, settings: LoraSettings, base: str) -> Path:
    """Write a peft model's adapter in peft's layout (what `save_pretrained` writes, atomically)."""
    pattern = target_pattern(settings, net.base_model.model.config.model_type)
    return write_adapter(
        folder, lora_tensors(net), peft_config(settings, pattern, base, "CAUSAL_LM")
    )


def merge_and_unload(net) -> torch.nn.Module:
    """The base model with `W + scaling * B @ A` folded into each target (peft's merge)."""
    return net.merge_and_unload()
