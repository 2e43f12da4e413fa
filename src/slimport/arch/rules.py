"""Rule tables as data: hub tensors a family has, and how each dialect names and lays them out."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

from slimport.arch.ops import Op, chain_outputs

Cond = Callable[[dict], bool]
LAYER = "{layer}"


@dataclass(frozen=True)
class HubTensor:
    """A tensor of the hub (Hugging Face) layout: name pattern, expected shape, presence rule.

    Shape entries are ints or keys of the normalised config (e.g. "hidden_size", "kv_dim").
    """

    name: str
    shape: tuple[int | str, ...]
    when: Cond | None = None

    def expected_shape(self, cfg: dict) -> tuple[int, ...]:
        return tuple(d if isinstance(d, int) else int(cfg[d]) for d in self.shape)


@dataclass(frozen=True)
class Rule:
    """hub names -> dialect names through `ops` (applied in order hub->dialect).

    The op chain must turn len(hub) tensors into len(dialect) ones (Concat n->1, Tie 1->2, ...):
    checked here, so a miscounted table fails when its module is imported.
    """

    hub: tuple[str, ...]
    dialect: tuple[str, ...]
    ops: tuple[Op, ...] = ()
    when: Cond | None = None

    def __post_init__(self) -> None:
        chain = " -> ".join(op.describe() for op in self.ops) or "no ops"
        try:
            n = chain_outputs(self.ops, len(self.hub))
        except ValueError as e:
            raise ValueError(f"rule {self.hub} -> {self.dialect}: {e}") from None
        if n != len(self.dialect):
            raise ValueError(
                f"rule {self.hub} -> {self.dialect}: {chain} turns {len(self.hub)} tensor(s) "
                f"into {n}, but the rule names {len(self.dialect)}"
            )


def rule(
    hub: str | tuple[str, ...], dialect: str | tuple[str, ...], *ops: Op, when: Cond | None = None
) -> Rule:
    """Shorthand used by the family tables: `rule("a.weight", "b.kernel", Transpose())`."""

    def as_tuple(x):
        return (x,) if isinstance(x, str) else tuple(x)

    return Rule(as_tuple(hub), as_tuple(dialect), tuple(ops), when)


# weight suffix -> bias suffix, as each dialect spells the pair (Keras: kernel:0 or weight:0 with
# bias:0, LayerNorm gamma:0 with beta:0; MindSpore LayerNorm gamma with beta; the rest weight, bias)
_BIAS_OF = (("kernel:0", "bias:0"), ("gamma:0", "beta:0"), ("weight:0", "bias:0"),
            ("gamma", "beta"), ("weight", "bias"))  # fmt: skip


def bias_of(weight: str) -> str:
    """The name of the bias stored beside `weight` (`x.weight` -> `x.bias`, `x/kernel:0` ->
    `x/bias:0`, `x.gamma` -> `x.beta`), for tables that name weights only."""
    for w, b in _BIAS_OF:
        if weight.endswith(w):
            return weight.removesuffix(w) + b
    raise ValueError(f"{weight!r} does not end like a weight: {', '.join(w for w, _ in _BIAS_OF)}")


def all_of(*conds: Cond | None) -> Cond | None:
    """A condition that holds when every given one does (None: always)."""
    conds = tuple(c for c in conds if c is not None)
    return (lambda c: all(f(c) for f in conds)) if conds else None


@dataclass(frozen=True)
class Kind:
    """One row of a family's name table, as gguf-py's TensorNameMap keeps them: a hub weight, its
    shape and presence, whether a bias sits beside it (named by `bias_of`; True, False or a
    condition), and its name in each of the family's dialects (a column each; None: the dialect
    has no place for it). Families subclass it with the facts their dialects lay tensors out by.
    """

    hub: str
    shape: tuple[int | str, ...]
    names: tuple[str | None, ...]
    bias: bool | Cond = False
    when: Cond | None = None

    @property
    def bias_shape(self) -> tuple[int | str, ...]:
        return self.shape[:1]  # nn.Linear: [out, in]

    def tensors(self, col: int | None = None) -> list[tuple[str, str | None, Cond | None, bool]]:
        """(hub name, name in dialect column `col`, presence, is_bias) of the weight and its bias."""
        name = None if col is None else self.names[col]
        out = [(self.hub, name, self.when, False)]
        if self.bias is not False:
            when = self.when if self.bias is True else all_of(self.when, self.bias)
            out.append((bias_of(self.hub), name and bias_of(name), when, True))
        return out


def hub_of(table: tuple[Kind, ...], dialects: tuple[str, ...]) -> tuple[HubTensor, ...]:
    """The hub tensors of a name table, weight then bias of each row; every row must name the
    weight in each of `dialects` (None where a dialect has no place for it)."""
    for k in table:
        if len(k.names) != len(dialects):
            raise ValueError(f"table row {k.hub}: {len(k.names)} names for dialects {dialects}")
    return tuple(
        HubTensor(hub, k.bias_shape if is_bias else k.shape, when)
        for k in table
        for hub, _, when, is_bias in k.tensors()
    )


@dataclass(frozen=True)
class Bound:
    """A rule instantiated for one layer (or a global one): concrete names, ready to run."""

    hub: tuple[str, ...]
    dialect: tuple[str, ...]
    ops: tuple[Op, ...]


@dataclass
class Family:
    """A model family: its hub tensors, its dialect tables and its config translation.

    `normalize(cfg)` fills defaults and derived keys (head_dim, kv_dim, ...) that shapes and
    ops refer to. `config_from[d](metadata)` builds an HF config from a format's own metadata
    (GGUF keys); `config_to[d](cfg)` goes the other way.
    """

    name: str
    model_types: tuple[str, ...]
    hub: tuple[HubTensor, ...]
    dialects: dict[str, tuple[Rule, ...]]
    normalize: Callable[[dict], dict]
    ignorable: tuple[str, ...] = ()  # regexes of known leftovers (position_ids, inv_freq, ...)
    config_from: dict[str, Callable[[dict], dict]] = field(default_factory=dict)
    config_to: dict[str, Callable[[dict], dict]] = field(default_factory=dict)
    # configs a checkpoint without one might have (model type, class, ...): see arch.guess_config
    variants: Callable[[dict], list[dict]] | None = None
    # hub weights the model class stores [in, out] (GPT-2's Conv1D): a quantized checkpoint
    # holds them as the nn.Linear they compute, [out, in] (compress.skeleton.linearize)
    stored_in_out: tuple[str, ...] = ()
    # per-layer sizes a config lists (BERT's `pruned_heads`): resize(cfg, shapes) corrects the
    # shapes hub_tensors derived from the uniform sizes
    resize: Callable[[dict, dict], None] | None = None

    def __post_init__(self) -> None:
        self.dialects = {
            "hf": tuple(rule(t.name, t.name, when=t.when) for t in self.hub),
            **self.dialects,
        }

    def candidates(self, partial: dict) -> list[dict]:
        """Configs to try for a checkpoint that came without one (`partial`: what it shows)."""
        if self.variants is not None:
            return self.variants(partial)
        return [{**partial, "model_type": t} for t in self.model_types]

    def hub_tensors(self, cfg: dict) -> dict[str, tuple[int, ...]]:
        """Every hub tensor this config has, with its expected shape."""
        out = {}
        for t in self.hub:
            if t.when is None or t.when(cfg):
                for name in _expand(t.name, cfg):
                    out[name] = t.expected_shape(cfg)
        if self.resize is not None:
            self.resize(cfg, out)
        return out

    def in_out_weights(self, cfg: dict) -> set[str]:
        """The `stored_in_out` hub weights this config has, names filled in."""
        return {n for p in self.stored_in_out for n in _expand(p, cfg)}

    def bound_rules(self, dialect: str, cfg: dict) -> list[Bound]:
        out = []
        for r in self.dialects[dialect]:
            if r.when is not None and not r.when(cfg):
                continue
            if any(LAYER in n for n in r.hub + r.dialect):
                for i in range(int(cfg["num_hidden_layers"])):
                    out.append(Bound(_fill_all(r.hub, cfg, i), _fill_all(r.dialect, cfg, i), r.ops))
            else:
                out.append(Bound(_fill_all(r.hub, cfg), _fill_all(r.dialect, cfg), r.ops))
        return out


_FIELD = re.compile(r"\{(\w+)\}")


def fill(pattern: str, cfg: dict, layer: int | None = None) -> str:
    """A name pattern with `{layer}` and `{config_key}` placeholders filled in.

    Besides the layer number, a pattern may name any key of the normalised config, for names
    that depend on the model class (Keras scopes like `tf_bert_model`, the `bert.` prefix of
    head models).
    """
    return _FIELD.sub(lambda m: str(layer) if m[1] == "layer" else str(cfg[m[1]]), pattern)


def _fill_all(names: tuple[str, ...], cfg: dict, layer: int | None = None) -> tuple[str, ...]:
    return tuple(fill(n, cfg, layer) for n in names)


def _expand(pattern: str, cfg: dict) -> list[str]:
    if LAYER not in pattern:
        return [fill(pattern, cfg)]
    return [fill(pattern, cfg, i) for i in range(int(cfg["num_hidden_layers"]))]
