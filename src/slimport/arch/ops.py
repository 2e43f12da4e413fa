"""Small invertible tensor operations that rule tables are built from.

Every op maps a list of tensors to a list of tensors (most are one-to-one) in the hub -> dialect
direction (`forward`) and back (`inverse`), so dialect -> hub -> dialect is bit-exact by
construction and testable for every table. Ops run on "meta" tensors too, which is how the
planner learns every output shape and dtype before reading a byte.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch

from slimport.errors import SlimportError

Tensors = list[torch.Tensor]


class Op:
    """An invertible step of a rule. `arity_in` tensors go into `forward`, `arity_out` come out;
    None (both) means "any number, each mapped on its own" (Cast). Rules check their chains
    against these counts when a table is defined, so a miscounted rule never reaches a file."""

    arity_in: int | None = 1
    arity_out: int | None = 1
    # forward moves or copies whole rows (dim 0) and works for any trailing shape, so it lays out
    # a quantized Linear's integers, scales and zero points as it lays out the weight
    rowwise: ClassVar[bool] = False

    def outputs(self, n: int) -> int:
        """How many tensors `forward` returns for `n` inputs; ValueError if it cannot take `n`."""
        if self.arity_in is not None and n != self.arity_in:
            raise ValueError(f"{self.describe()} takes {self.arity_in} tensor(s), not {n}")
        return n if self.arity_out is None else self.arity_out

    def forward(self, ts: Tensors, cfg: dict) -> Tensors:
        raise NotImplementedError

    def inverse(self, ts: Tensors, cfg: dict) -> Tensors:
        raise NotImplementedError

    def describe(self, inverse: bool = False) -> str:
        return type(self).__name__ + ("^-1" if inverse else "")


class Unary(Op):
    """A one-tensor op (arity 1 -> 1): subclasses define `apply` and `unapply` on that tensor."""

    def apply(self, t: torch.Tensor, cfg: dict) -> torch.Tensor:
        raise NotImplementedError

    def unapply(self, t: torch.Tensor, cfg: dict) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, ts, cfg):
        (t,) = ts
        return [self.apply(t, cfg)]

    def inverse(self, ts, cfg):
        (t,) = ts
        return [self.unapply(t, cfg)]


@dataclass(frozen=True)
class Transpose(Unary):
    """Swap two axes (Keras kernels and GPT-2 Conv1D are [in, out]; nn.Linear is [out, in])."""

    dims: tuple[int, int] = (0, 1)

    def apply(self, t, cfg):
        return t.transpose(*self.dims).contiguous()

    unapply = apply

    def describe(self, inverse=False):
        return f"Transpose{self.dims}"


@dataclass(frozen=True)
class PermuteRope(Unary):
    """Rotate-half (HF) rows -> interleaved (Meta, llama.cpp, llama2.c) rows of q or k.

    `heads` names the config key with the head count of this projection, so GQA's k uses
    num_key_value_heads. Works for weights [heads*head_dim, in] and biases [heads*head_dim].
    """

    heads: str
    rowwise: ClassVar[bool] = True

    def _n(self, t: torch.Tensor, cfg: dict) -> int:
        n = int(cfg[self.heads])
        if t.shape[0] % (2 * n):
            raise SlimportError(
                f"cannot permute RoPE rows: dim 0 of shape {tuple(t.shape)} is not divisible "
                f"by 2 x {self.heads}={n}",
                hint="check num_attention_heads / num_key_value_heads in the config",
            )
        return n

    def apply(self, t, cfg):
        n = self._n(t, cfg)
        t = t.reshape(n, 2, t.shape[0] // n // 2, *t.shape[1:]).swapaxes(1, 2)
        return t.reshape(-1, *t.shape[3:]).contiguous()

    def unapply(self, t, cfg):
        n = self._n(t, cfg)
        t = t.reshape(n, t.shape[0] // n // 2, 2, *t.shape[1:]).swapaxes(1, 2)
        return t.reshape(-1, *t.shape[3:]).contiguous()

    def describe(self, inverse=False):
        return f"PermuteRope({self.heads})" + ("^-1" if inverse else "")


@dataclass(frozen=True)
class Concat(Op):
    """Fuse several hub tensors into one dialect tensor (qkv, gate_up); inverse splits.

    `sizes(cfg)` gives the split sizes along `dim`, so the inverse needs no hub shapes.
    """

    dim: int
    sizes: Callable[[dict], list[int]]
    parts: int = 3

    @property
    def arity_in(self):  # type: ignore[override]
        return self.parts

    def forward(self, ts, cfg):
        return [torch.cat(ts, dim=self.dim)]

    def inverse(self, ts, cfg):
        (t,) = ts
        sizes = list(self.sizes(cfg))
        if sum(sizes) != t.shape[self.dim]:
            raise SlimportError(
                f"cannot split fused tensor of shape {tuple(t.shape)} into {sizes} along dim "
                f"{self.dim}: the config disagrees with the checkpoint"
            )
        return [p.contiguous() for p in torch.split(t, sizes, dim=self.dim)]

    def describe(self, inverse=False):
        return ("Split" if inverse else "Concat") + f"(dim={self.dim})"


@dataclass(frozen=True)
class Tie(Op):
    """One hub tensor written twice by a dialect (e.g. GGUF GPT-2 duplicates the embedding as
    output.weight); the inverse checks that both copies are equal and keeps one."""

    arity_out = 2
    rowwise: ClassVar[bool] = True

    def forward(self, ts, cfg):
        (t,) = ts
        return [t, t.clone()]

    def inverse(self, ts, cfg):
        a, b = ts
        if a.device.type != "meta" and not torch.equal(a, b):
            raise SlimportError(
                "tied tensors differ: the checkpoint stores an output projection that is not "
                "a copy of the embedding, but the config says they are tied",
                hint="set tie_word_embeddings=false in the config",
            )
        return [a]


@dataclass(frozen=True)
class Cast(Op):
    """Change a floating dtype (only added by an explicit --dtype; never silent)."""

    arity_in = arity_out = None  # appended to any rule, a Tie's two outputs included
    dtype: torch.dtype
    source: torch.dtype | None = None  # what to cast back to on inverse

    def forward(self, ts, cfg):
        return [t.to(self.dtype) if t.is_floating_point() else t for t in ts]

    def inverse(self, ts, cfg):
        if self.source is None:
            return ts
        return [t.to(self.source) if t.is_floating_point() else t for t in ts]

    def describe(self, inverse=False):
        return f"Cast({str(self.dtype).removeprefix('torch.')})"


@dataclass(frozen=True)
class Unsqueeze(Unary):
    """Add an axis of size 1 (TF GPT-2 Conv1D biases are [1, out]); the inverse removes it."""

    dim: int = 0

    def apply(self, t, cfg):
        return t.unsqueeze(self.dim)

    def unapply(self, t, cfg):
        if t.dim() <= self.dim or t.shape[self.dim] != 1:
            raise SlimportError(f"expected a size-1 axis {self.dim}, got shape {tuple(t.shape)}")
        return t.squeeze(self.dim)

    def describe(self, inverse=False):
        return ("Squeeze" if inverse else "Unsqueeze") + f"({self.dim})"


@dataclass(frozen=True)
class At(Op):
    """Apply a one-to-one op to the tensor at `index` only, e.g. after a Tie, transpose the
    copy that a dialect stores as a Keras kernel while the embedding keeps its layout."""

    index: int
    op: Op
    arity_in = arity_out = None  # as many as it gets (more than `index`)

    def outputs(self, n: int) -> int:
        if n <= self.index:
            raise ValueError(f"{self.describe()} needs more than {self.index} tensor(s), not {n}")
        if self.op.outputs(1) != 1:
            raise ValueError(f"{self.describe()}: At applies one-to-one ops only")
        return n

    def forward(self, ts, cfg):
        ts = list(ts)
        ts[self.index] = self.op.forward([ts[self.index]], cfg)[0]
        return ts

    def inverse(self, ts, cfg):
        ts = list(ts)
        ts[self.index] = self.op.inverse([ts[self.index]], cfg)[0]
        return ts

    def describe(self, inverse=False):
        return f"{self.op.describe(inverse)}@{self.index}"


def chain_outputs(ops, n: int) -> int:
    """How many tensors the chain `ops` returns for `n` inputs (hub->dialect); ValueError if an
    op cannot take what the one before it gives."""
    for op in ops:
        n = op.outputs(n)
    return n


def run_ops(
    ops, ts: Tensors, cfg: dict, inverse: bool, names: tuple[tuple[str, ...], ...] = ()
) -> Tensors:
    """Apply an op chain hub->dialect (inverse=False) or dialect->hub (inverse=True).

    `names` = (input names, output names) of the rule, so a failing op says which tensor it
    failed on: the planner runs every chain on meta tensors first, so shape errors surface
    there, before a byte is read or written.
    """
    chain = reversed(ops) if inverse else ops
    for op in chain:
        try:
            ts = op.inverse(ts, cfg) if inverse else op.forward(ts, cfg)
        except (SlimportError, RuntimeError, ValueError, IndexError) as e:
            raise _named(e, op.describe(inverse), ts, names) from None
    return ts


def _named(e: Exception, op: str, ts: Tensors, names: tuple[tuple[str, ...], ...]) -> SlimportError:
    shapes = ", ".join(str(tuple(t.shape)) for t in ts)
    where = " -> ".join(", ".join(n) for n in names) or "tensor(s)"
    message = e.message if isinstance(e, SlimportError) else str(e).split("\n")[0]
    hint = e.hint if isinstance(e, SlimportError) else None
    return SlimportError(f"{where}: {op} failed on shape(s) {shapes}: {message}", hint=hint)
