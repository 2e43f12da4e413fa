"""One handler per modifier (modifiers.py): what the algorithm does to one calibrated block.

The pipeline collects, in one pass of the float block, the union of what the recipe's handlers
declare they need (`Needs`), then calls the handlers in the recipe's order on a `BlockWork`.
Registering a handler is all an algorithm takes: `@handles(MyConfig, needs=...)`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from slimport.arch.layout import CompressLayout
from slimport.compress.capture import Batch, Needs, Run, Stats, input_hooks
from slimport.compress.modifiers import (
    AWQConfig,
    GPTQConfig,
    Modifier,
    RTNConfig,
    SmoothQuantConfig,
    StaticInputsConfig,
)
from slimport.compress.quant import gptq as G
from slimport.compress.quant import primitives as P
from slimport.compress.quant.awq import awq_clip, awq_scales
from slimport.compress.quant.config import QuantizationConfig
from slimport.compress.quant.modules import QuantLinear
from slimport.compress.quant.observers import make_observer, mse_weight_qparams
from slimport.compress.quant.scaling import fold_scales
from slimport.compress.quant.smoothquant import smooth_scales
from slimport.compress.skeleton import set_module
from slimport.errors import SlimportError


@dataclass
class BlockWork:
    """One block under compression, as the handlers see it."""

    block: nn.Module
    linears: dict[str, nn.Linear]  # float Linears not yet rounded, by name inside the block
    stats: dict[str, Stats]
    inputs: list[Batch]
    config: QuantizationConfig
    layout: CompressLayout
    rows: dict[str, dict]  # the report row of each Linear
    run: Run
    later: list[Modifier] = field(default_factory=list)  # the modifiers after this one
    masks: dict[str, torch.Tensor] = field(default_factory=dict)  # pruned weights (True), by name

    def pairs(self):
        """(producer module, consumer names, their shared input Stats) of the layout's smoothing
        pairs present here and not yet rounded."""
        mods = dict(self.block.named_modules())
        for producer, consumers in self.layout.smoothing:
            if producer not in mods or not all(c in self.linears for c in consumers):
                continue
            prod, first = mods[producer], self.linears[consumers[0]]
            if isinstance(prod, nn.Linear) and prod.out_features != first.in_features:
                continue  # grouped-query attention: v has fewer rows than o has columns
            yield producer, prod, consumers, self.stats[consumers[0]]

    def weights(self, name: str):
        """The weight scheme of the block's Linear `name` (the recipe's, or its override)."""
        return self.config.weights_for(self.rows[name]["module"])

    def fold(self, producer: str, prod: nn.Module, consumers, s: torch.Tensor, t0: float) -> None:
        """Fold the scales s between a producer and its consumers; their statistics follow."""
        fold_scales(prod, [self.linears[c] for c in consumers], s)
        for st in {id(self.stats[c]): self.stats[c] for c in consumers}.values():
            st.rescale(s)
        for c in consumers:
            self.rows[c]["seconds"] += time.perf_counter() - t0
            self.rows[c]["scaled_by"] = producer


@dataclass(frozen=True)
class Handler:
    apply: Callable[[Modifier, BlockWork], None]
    needs: Callable[[Modifier], Needs]


HANDLERS: dict[type[Modifier], Handler] = {}


def handles(cls: type[Modifier], needs: Callable[[Modifier], Needs] = lambda m: Needs()):
    def register(fn: Callable[[Modifier, BlockWork], None]):
        HANDLERS[cls] = Handler(fn, needs)
        return fn

    return register


def handler_for(m: Modifier) -> Handler:
    if type(m) not in HANDLERS:
        raise SlimportError(f"modifier {m.name!r} has no registered handler")
    return HANDLERS[type(m)]


# ---------------------------------------------------------------- scale migration


@handles(SmoothQuantConfig, needs=lambda m: Needs(absmax=True))
def smoothquant(m: SmoothQuantConfig, work: BlockWork) -> None:
    # every pair, up_proj -> down_proj included: SwiGLU's product carries the largest
    # activation outliers of a Llama block, and they reach down_proj's input
    for producer, prod, consumers, st in work.pairs():
        t0 = time.perf_counter()
        s = smooth_scales(st.absmax, [work.linears[c].weight for c in consumers], m.alpha)
        work.fold(producer, prod, consumers, s, t0)


@handles(AWQConfig, needs=lambda m: Needs(sample=m.max_tokens))
def awq(m: AWQConfig, work: BlockWork) -> None:
    for producer, prod, consumers, st in work.pairs():
        t0 = time.perf_counter()
        weights = [work.linears[c].weight for c in consumers]
        # consumers of one input share its scales: searched for the first one's scheme
        s = awq_scales(torch.cat(st.sample), weights, work.weights(consumers[0]), grid=m.grid)
        work.fold(producer, prod, consumers, s, t0)
    clip = m.clip if m.clip is not None else not any(x.error_feedback for x in work.later)
    if clip:
        for n, lin in work.linears.items():
            if any(n == p or n.endswith("." + p) for p in work.layout.no_clip):
                continue
            t0 = time.perf_counter()
            with torch.no_grad():
                sample = torch.cat(work.stats[n].sample)
                lin.weight.copy_(awq_clip(lin.weight, sample, work.weights(n)))
            work.rows[n]["seconds"] += time.perf_counter() - t0
    for st in work.stats.values():
        st.sample = []  # the token sample is spent: off the working set before the rounding


# ---------------------------------------------------------------- rounding


@handles(RTNConfig)
def rtn(m: RTNConfig, work: BlockWork) -> None:
    for n in list(work.linears):
        _round(work, [n], work.stats[n], None, last=True)


@handles(GPTQConfig, needs=lambda m: Needs(hessian=True))
def gptq(m: GPTQConfig, work: BlockWork) -> None:
    # Linears fed one input share its Hessian; GPTQ quantizes those of one scheme as one stacked
    # matrix (see gptq()), except per-tensor, whose scale spans one Linear only
    shared: dict[int, list[str]] = {}
    for n in work.linears:
        shared.setdefault(id(work.stats[n]), []).append(n)
    for names in shared.values():
        parts: dict = {}
        for n in names:
            w = work.weights(n)
            parts.setdefault(w if w.granularity != "tensor" else n, []).append(n)
        for i, part in enumerate(parts.values()):
            _round(work, part, work.stats[part[0]], m, last=i == len(parts) - 1)


def _round(work: BlockWork, names: list[str], st: Stats, g: GPTQConfig | None, last: bool) -> None:
    """Quantize the Linears `names` (sharing the input statistics `st`) into QuantLinears, in
    place in the block; the float Linears are let go as soon as their replacement exists."""
    config, linears, rows = work.config, work.linears, work.rows
    args = work.weights(names[0])  # one scheme for the stacked part
    t0 = time.perf_counter()
    ws = [linears[n].weight.detach().float() for n in names]
    sizes = [w.shape[0] for w in ws]
    if g is not None:
        # the last user of the Hessian hands it over: GPTQ works in its memory
        H = st.hessian if last else st.hessian.value()
        if last:
            st.hessian = None
        mask = None
        if any(n in work.masks for n in names):  # pruned before: those weights stay zero
            mask = torch.cat([
                work.masks.get(n, torch.zeros(w.shape, dtype=torch.bool))
                for n, w in zip(names, ws, strict=True)
            ])  # fmt: skip
        q, scale, zero, loss = G.gptq(
            ws, H, args, damp=g.damp, block_size=g.block_size, act_order=g.act_order,
            weight_observer=config.weight_observer, mask=mask,
        )  # fmt: skip
        # own storage per Linear (views of one tensor would be saved as shared memory); the
        # integers as int8 at once, a quarter of the float copy
        split = [[p.clone() for p in t.split(sizes)] for t in (scale, zero, loss)]
        ints = [p.to(torch.int8) for p in q.split(sizes)]
        del q
        parts = list(zip(ints, *split, strict=True))
    else:
        parts = []
        for w in ws:
            if config.weight_observer == "mse":
                scale, zero = mse_weight_qparams(w, args)
                parts.append((P.quantize_tensor(w, args, scale, zero), scale, zero, None))
            else:
                parts.append((*P.rtn(w, args), None))
    seconds = (time.perf_counter() - t0) / len(names)
    for n, w, (q, scale, zero, row_loss) in zip(names, ws, parts, strict=True):
        P.check_scale(f"{rows[n]['module']}.weight", scale)
        t0 = time.perf_counter()
        ql = QuantLinear.from_linear(linears.pop(n), q, scale, zero, args, config.inputs)
        set_module(work.block, n, ql)
        rows[n]["seconds"] += seconds + time.perf_counter() - t0
        rows[n]["weight_rel_err"] = float((ql.weight - w).norm() / w.norm().clamp_min(1e-12))
        if n in work.masks:  # stored zeros: the pruned weights, and kept ones rounded to 0
            rows[n]["zeros"] = float((ql.weight == 0).float().mean())
        if row_loss is not None:  # GPTQ's objective tr(dW H dW^T) per row: mean output MSE x 2
            rows[n]["output_err"] = float(row_loss.sum()) / max(1, q.shape[0])


# ---------------------------------------------------------------- activations


@handles(StaticInputsConfig)
def static_inputs(m: StaticInputsConfig, work: BlockWork) -> None:
    """Each QuantLinear's input range, observed on what the quantized block feeds it."""
    config = work.config
    qls = {n: q for n, q in work.block.named_modules() if isinstance(q, QuantLinear)}
    obs = {
        n: make_observer(
            config.observer, config.inputs, seed=config.seed, **config.observer_options
        )
        for n in qls
    }

    def make(n, q, token_rows):
        def hook(module, args):
            obs[n].update(token_rows(args[0].detach()))

        return hook

    with input_hooks(work.block, work.inputs, qls, make):
        work.run(work.block, work.inputs)
    for n, q in qls.items():
        scale, zero = obs[n].qparams()
        P.check_scale(f"{work.rows.get(n, {}).get('module', n)} input", scale)
        q.set_input_qparams(scale, zero)
        if n in work.rows:
            work.rows[n]["input_scale"] = float(q.input_scale)
