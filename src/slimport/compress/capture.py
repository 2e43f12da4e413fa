"""Calibration data at block boundaries: capture block 0's inputs, run a block, and collect what
the algorithms asked for about each Linear's input (channel absmax, a token sample, the Hessian)
with forward hooks, on real tokens only."""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from slimport.compress.quant.gptq import Hessian
from slimport.compress.skeleton import finite, join
from slimport.errors import SlimportError


@dataclass
class Stats:
    """What the algorithms need to know about one Linear's input."""

    absmax: torch.Tensor | None = None
    sqnorm: torch.Tensor | None = None  # sum over tokens of x_j^2 per input channel (Wanda)
    hessian: object | None = None
    sample: list[torch.Tensor] = field(default_factory=list)
    sampled: int = 0

    def rescale(self, s: torch.Tensor) -> None:
        """The Linear's input is now x / s: keep the statistics in step."""
        if self.absmax is not None:
            self.absmax = self.absmax / s
        if self.sqnorm is not None:
            self.sqnorm = self.sqnorm / s.square()
        if self.sample:
            self.sample = [x / s for x in self.sample]
        if self.hessian is not None:
            self.hessian.scale_inputs(s)


@dataclass(frozen=True)
class Needs:
    """What one calibration pass collects per Linear input (the union over a recipe's handlers)."""

    absmax: bool = False
    hessian: bool = False
    sample: int | None = None  # a token budget per Linear input
    sqnorm: bool = False

    def __or__(self, other: Needs) -> Needs:
        budgets = [b for b in (self.sample, other.sample) if b is not None]
        return Needs(
            self.absmax or other.absmax,
            self.hessian or other.hessian,
            max(budgets) if budgets else None,
            self.sqnorm or other.sqnorm,
        )

    def __bool__(self) -> bool:
        return self.absmax or self.hessian or self.sqnorm or self.sample is not None


@dataclass
class Batch:
    """One calibration batch at a block boundary: the hidden state plus the other call arguments."""

    hidden: torch.Tensor
    args: tuple
    kwargs: dict
    tokens: torch.Tensor | None = None  # [batch, seq] bool, False at padding


Run = Callable[[nn.Module, list[Batch]], list[torch.Tensor]]


class _Stop(Exception):
    pass


class _Catcher(nn.Module):
    def __init__(self, store: list) -> None:
        super().__init__()
        self.store = store

    def forward(self, hidden, *args, **kwargs):
        self.store.append(Batch(hidden, args, kwargs))
        raise _Stop


def capture_inputs(
    model: nn.Module,
    blocks: nn.ModuleList,
    batches: list[dict],
    materialize: Callable[[nn.Module, str], None] | None = None,
    free: Callable[[nn.Module], None] | None = None,
) -> list[Batch]:
    """Block-0 inputs for each calibration batch: run the model until its first block.

    With `materialize`, modules outside the blocks get memory only when the forward reaches them
    (and are freed after), so a head that runs after the blocks (lm_head) is never loaded here."""
    first = blocks[0]
    loaded: list[nn.Module] = []

    def on_call(name):
        def hook(module, args, kwargs=None):
            if any(p.is_meta for p in module.parameters()) or any(
                b.is_meta for b in module.buffers()
            ):
                materialize(module, name)
                loaded.append(module)

        return hook

    outside = outside_blocks(model, blocks) if materialize else []
    hooks = [m.register_forward_pre_hook(on_call(n)) for n, m in outside]
    store: list[Batch] = []
    blocks[0] = _Catcher(store)
    try:
        with torch.no_grad():
            for b in batches:
                with contextlib.suppress(_Stop):
                    model(**b, **no_cache(model))
                store[-1].tokens = token_mask(b.get("attention_mask"))
    finally:
        blocks[0] = first
        for h in hooks:
            h.remove()
    for mod in loaded:
        free(mod)
    return store


def token_mask(mask) -> torch.Tensor | None:
    """Real-token positions of a [batch, seq] attention mask; None when nothing is padded."""
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2 or bool(mask.all()):
        return None
    return mask.bool()


@contextlib.contextmanager
def real_tokens(module: nn.Module, inputs: list[Batch]):
    """Yields `rows(x)`: a Linear's input as [tokens, features] without the padding positions of
    the batch `module` is running. Padding is not data: its hidden states would widen activation
    ranges and bias Hessians (in MiniLM's block 0 it moved an input range by 55%)."""
    masks = {id(b.hidden): b.tokens for b in inputs}
    current: list[torch.Tensor | None] = [None]

    def hook(_, args, kwargs):
        if args and id(args[0]) in masks:
            current[0] = masks[id(args[0])]
        else:  # the whole model run on a calibration batch (the tail after the blocks)
            current[0] = token_mask(kwargs.get("attention_mask"))

    def rows(x: torch.Tensor) -> torch.Tensor:
        m = current[0]
        if m is not None and x.dim() == 3 and x.shape[:2] == m.shape:
            return x[m]
        return x.reshape(-1, x.shape[-1])

    handle = module.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield rows
    finally:
        handle.remove()


@contextlib.contextmanager
def input_hooks(block: nn.Module, inputs: list[Batch], modules: dict[str, nn.Module], make):
    """Forward pre-hooks `make(name, module, rows)` on `modules`, removed on exit; `rows` is
    `real_tokens`' view of the input."""
    with real_tokens(block, inputs) as rows:
        hooks = [m.register_forward_pre_hook(make(n, m, rows)) for n, m in modules.items()]
        try:
            yield hooks
        finally:
            for h in hooks:
                h.remove()


def outside_blocks(model: nn.Module, blocks: nn.ModuleList) -> list[tuple[str, nn.Module]]:
    """The largest submodules that neither are nor contain the blocks (embeddings, norms, heads)."""
    out = []

    def walk(prefix: str, mod: nn.Module) -> None:
        for n, child in mod.named_children():
            name = join(prefix, n)
            if child is blocks:
                continue
            if any(m is blocks for m in child.modules()):
                walk(name, child)
            else:
                out.append((name, child))

    walk("", model)
    return out


def run_block(block: nn.Module, inputs: list[Batch]) -> list[torch.Tensor]:
    outs = []
    with torch.no_grad():
        for b in inputs:
            out = block(b.hidden, *b.args, **b.kwargs)
            outs.append(out[0] if isinstance(out, tuple) else out)
    return outs


def no_cache(model: nn.Module) -> dict:
    return (
        {"use_cache": False} if "use_cache" in inspect.signature(model.forward).parameters else {}
    )


def collect(
    block: nn.Module,
    linears: dict[str, nn.Linear],
    inputs: list[Batch],
    needs: Needs,
    seed: int,
    run: Run,
) -> dict[str, Stats]:
    """One pass of the float block collecting `needs` for every Linear input.

    Linears fed the very same tensor (q/k/v, gate/up) share one Stats: one Hessian, not three."""
    stats = {n: Stats() for n in linears}
    if not needs:
        return stats
    budget = needs.sample
    total = (
        sum(
            b.hidden.shape[0] * b.hidden.shape[1] if b.tokens is None else int(b.tokens.sum())
            for b in inputs
        )
        if inputs and inputs[0].hidden.dim() == 3
        else None
    )
    gen = torch.Generator().manual_seed(seed)
    # `seen` holds the tensors themselves for the length of one forward: compared by identity and
    # kept alive, so a later input can never reuse a freed one's address and be mistaken for it.
    seen: dict[int, tuple[torch.Tensor, str]] = {}

    # the Linears not yet seen in this batch's forward: once none is left, the rest of the block
    # (the last Linear itself, e.g. down_proj, and the residual) computes nothing collect needs
    pending: set[str] = set()
    stop_early = run is run_block

    def make(n, m, token_rows):
        if needs.hessian:
            stats[n].hessian = Hessian(m.in_features)

        def hook(module, args):
            pending.discard(n)
            owner = seen.setdefault(id(args[0]), (args[0], n))[1]
            if owner != n:
                stats[n] = stats[owner]
                _stop_if_done()
                return
            st = stats[n]
            x = token_rows(args[0].detach()).float()
            if not finite(x):
                raise SlimportError(
                    f"module {n!r}: NaN/Inf in its calibration activations",
                    hint="check the weights before this layer",
                )
            if needs.absmax:
                a = x.abs().amax(0)
                st.absmax = a if st.absmax is None else torch.maximum(st.absmax, a)
            if needs.sqnorm:
                q = x.square().sum(0)
                st.sqnorm = q if st.sqnorm is None else st.sqnorm + q
            if needs.hessian:
                st.hessian.add(x)
            if budget is not None:
                keep = x
                if total and total > budget:  # an even share of the budget from every batch
                    k = max(1, round(budget * x.shape[0] / total))
                    keep = x[torch.randperm(x.shape[0], generator=gen)[:k]]
                st.sample.append(keep.clone())
            _stop_if_done()

        return hook

    def _stop_if_done():
        if stop_early and not pending:
            raise _Stop

    def start(*_):
        seen.clear()
        pending.update(linears)

    with input_hooks(block, inputs, linears, make):
        clear = block.register_forward_pre_hook(start)
        try:
            if stop_early:
                with torch.no_grad():
                    for b in inputs:
                        with contextlib.suppress(_Stop):
                            block(b.hidden, *b.args, **b.kwargs)
            else:
                run(block, inputs)
        finally:
            clear.remove()
    return stats
