"""The model being compressed: a transformers model on the meta device whose submodules get real
memory one at a time, from the checkpoint's tensors, and give it back when done."""

from __future__ import annotations

import torch
from torch import nn

from slimport.arch.layout import CompressLayout, layout_for
from slimport.convert import engine
from slimport.convert.loader import load
from slimport.errors import SlimportError
from slimport.io import pruned_heads
from slimport.io.base import release_freed_memory
from slimport.io.hf import model_class


class Skeleton:
    """A transformers model on the meta device plus lazy access to the checkpoint's tensors."""

    def __init__(self, source) -> None:
        import transformers

        self.source = load(source)
        m = self.source
        self.config = dict(m.config)
        self.model_type = self.config.get("model_type")
        self.layout: CompressLayout = layout_for(self.model_type, str(m.source.path))
        planned = engine.from_hub(m.hub, m.family, "hf", m.cfg)
        self.planned = {p.name: p for p in planned}
        hf_config = transformers.AutoConfig.for_model(**self.config)
        arch = (self.config.get("architectures") or [None])[0]
        try:  # only a known model class: a config may name any attribute of transformers
            cls = model_class(arch)
        except SlimportError as e:
            raise SlimportError(f"{m.source.path}: {e.message}", hint=e.hint) from None
        with torch.device("meta"):  # a head-pruned BERT's layers are narrower: see pruned_heads
            self.model = pruned_heads.apply(cls(hf_config), pruned_heads.pruned_heads(hf_config))
            self.model.eval()
        self.blocks_name, self.blocks = find_blocks(self.model, self.layout)

    def materialize(self, module: nn.Module, prefix: str) -> None:
        """Give a meta submodule real memory: weights from the file, assigned without a second
        copy; non-persistent buffers (rotary tables, position ids) from the model's own init.
        Conv1D layers become the nn.Linear they compute (see `linearize`)."""
        for sub in module.modules():
            persistent = set(sub.state_dict(keep_vars=True))
            if any(n not in persistent for n, _ in sub.named_buffers(recurse=False)):
                sub.to_empty(device="cpu", recurse=False)
                self.model._init_weights(sub)
        state = {}
        for name, t in module.state_dict(keep_vars=True).items():
            full = join(prefix, name)
            p = self.planned.get(full) or self._tied(full)
            if p is None:
                continue  # a buffer the checkpoint does not carry (position ids)
            value = p.compute()
            if tuple(value.shape) != tuple(t.shape):
                raise SlimportError(
                    f"tensor {full!r}: checkpoint {list(value.shape)}, model {list(t.shape)}"
                )
            check_finite(full, value)
            state[name] = value.to(t.dtype)
        module.load_state_dict(state, strict=False, assign=True)
        left = [n for n, t in module.state_dict(keep_vars=True).items() if t.is_meta]
        if left:
            raise SlimportError(
                f"the checkpoint has no tensor for {', '.join(join(prefix, n) for n in left[:5])}"
            )
        linearize(module)

    def _tied(self, name: str):
        tied = getattr(self.model, "_tied_weights_keys", None) or {}
        if isinstance(tied, dict) and name in tied:
            return self.planned.get(tied[name])
        return None

    def tied_head(self) -> dict[str, str]:
        """{head weight: embedding weight} when the checkpoint ties them, else {}."""
        return tied_head(self.model, self.config.get("tie_word_embeddings", False))

    def free(self, module: nn.Module) -> None:
        module.to("meta")
        release_freed_memory()  # hand the block's pages back to the OS, or RSS only grows

    def close(self) -> None:
        self.source.source.close()


def tied_head(model: nn.Module, tie: bool) -> dict[str, str]:
    tied = getattr(model, "_tied_weights_keys", None) or {}
    return dict(tied) if isinstance(tied, dict) and tie else {}


def find_blocks(model: nn.Module, layout: CompressLayout) -> tuple[str, nn.ModuleList]:
    """The family's block list, named in its layout (`layers` is `model.layers`)."""
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and (
            name == layout.blocks or name.endswith("." + layout.blocks)
        ):
            return name, mod
    raise SlimportError(
        f"{type(model).__name__} has no block list {layout.blocks!r}",
        hint="the family's CompressLayout in slimport/arch/layout.py names it",
    )


# transformers' Conv1D (GPT-2) is a Linear with its weight stored [in, out]
CONV1D = "Conv1D"
FROM_CONV1D = "_slimport_from_conv1d"


def linearize(module: nn.Module, only: set[str] | None = None) -> None:
    """Replace every transformers Conv1D in `module` by the nn.Linear it computes (weight.T).

    Compression then sees only nn.Linear: compressed-tensors quantizes nn.Linear modules and
    stores their weight [out, in], which is also how every runtime lays out a quantized GPT-2
    (vLLM's GPT-2 transposes only float `.weight` tensors). The new Linear remembers its origin
    so a float one is written back in Conv1D's [in, out] layout. `only`: just these names."""
    for name, sub in list(module.named_modules()):
        if (
            type(sub).__name__ != CONV1D
            or sub.weight.is_meta
            or (only is not None and name not in only)
        ):
            continue
        lin = nn.Linear(sub.nx, sub.nf, bias=sub.bias is not None, device="meta")
        lin.weight = nn.Parameter(sub.weight.detach().T.contiguous(), requires_grad=False)
        if sub.bias is not None:
            lin.bias = nn.Parameter(sub.bias.detach(), requires_grad=False)
        setattr(lin, FROM_CONV1D, True)
        set_module(module, name, lin)


def join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def set_module(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def finite(t: torch.Tensor) -> bool:
    # a sum is finite whenever every element is (barring overflow, then checked in full): 10x cheaper
    return bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all())


def check_finite(name: str, t: torch.Tensor) -> None:
    if t.is_floating_point() and not finite(t):
        raise SlimportError(
            f"tensor {name!r} holds NaN or Inf values",
            hint="the checkpoint is damaged; re-export it",
        )
