"""The op inventory of a model's real forward: the transformers model is built on the meta
device (no weights read or allocated), exported with `torch.export` at B x S, and every ATen op
of the graph counted with the modules it occurs in (the node's `nn_module_stack`)."""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field

import torch

from slimport.arch.layout import is_causal_lm
from slimport.errors import SlimportError

# graph bookkeeping, not computation: no target needs a kernel for these
IGNORED = {"_assert_tensor_metadata", "_assert_scalar", "sym_size", "sym_constrain_range_for_size"}


@dataclass
class OpUse:
    op: str  # ATen overload packet name, e.g. "linear", "scaled_dot_product_attention"
    count: int = 0
    modules: Counter = field(default_factory=Counter)  # module class -> count
    paths: list[str] = field(default_factory=list)  # a few module paths where it occurs


def hf_config(config: dict):
    """A transformers config object from a config.json dict."""
    from transformers import AutoConfig

    fields = {k: v for k, v in config.items() if k != "model_type"}
    try:
        return AutoConfig.for_model(config.get("model_type"), **fields)
    except (ValueError, KeyError) as e:
        raise SlimportError(f"transformers has no config for model_type={config.get('model_type')!r} ({e})") from None  # fmt: skip


def meta_model(config) -> torch.nn.Module:
    """The transformers model of `config` (its first architecture) with meta tensors."""
    import transformers

    arch = (getattr(config, "architectures", None) or [""])[0]
    cls = getattr(transformers, arch, None) if arch else None
    if cls is None:
        causal = is_causal_lm({"architectures": [arch], "model_type": config.model_type})
        cls = transformers.AutoModelForCausalLM if causal else transformers.AutoModel
    with torch.device("meta"):
        model = cls.from_config(config) if hasattr(cls, "from_config") else cls._from_config(config)
    return model.eval()


def example_inputs(model: torch.nn.Module, batch: int, seq: int) -> dict:
    ids = torch.zeros(batch, seq, dtype=torch.long, device="meta")
    kw = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if getattr(model.config, "is_decoder", False) or "use_cache" in model.config.to_dict():
        kw["use_cache"] = False  # the prefill graph; the KV cache is counted in memory.py
    return kw


def op_inventory(model: torch.nn.Module, batch: int = 1, seq: int = 16) -> list[OpUse]:
    """Every ATen op of `model`'s exported forward at batch x seq, most frequent first."""
    try:
        exported = torch.export.export(model, (), example_inputs(model, batch, seq), strict=False)
    except Exception as e:  # torch.export's failures are many types; all mean "no graph"
        raise SlimportError(
            f"torch.export could not trace {type(model).__name__} ({type(e).__name__}: {str(e)[:300]})",
            hint="the op inventory needs a model torch.export can trace",
        ) from None
    uses: dict[str, OpUse] = defaultdict(lambda: OpUse(""))
    for node in exported.graph.nodes:
        if node.op != "call_function" or not hasattr(node.target, "_schema"):
            continue  # Python getitem and friends: no kernel
        name = node.target._schema.name.split("::")[-1]
        if name in IGNORED:
            continue
        use = uses[name]
        use.op, use.count = name, use.count + 1
        stack = list((node.meta.get("nn_module_stack") or {}).values())
        path, cls = stack[-1] if stack else ("", "")
        use.modules[cls.rsplit(".", 1)[-1]] += 1
        if path not in use.paths and len(use.paths) < 3:
            use.paths.append(path or "(top level)")
    return sorted(uses.values(), key=lambda u: (-u.count, u.op))
