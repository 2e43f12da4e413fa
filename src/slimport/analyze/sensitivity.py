"""Layer sensitivity: what quantizing one Linear alone costs the model.

For every Linear the recipe would quantize, its weight alone is replaced by the quantized one
(RTN, GPTQ, AWQ or AWQ+GPTQ on float-model calibration statistics: the module's own error,
without its neighbours'), and the model is scored on a small held-out slice: perplexity for a
causal LM, accuracy for a classifier. Also the weight's relative error and, with a Hessian, the
relative output error tr(dW H dW^T) / tr(W H W^T). Each evaluation is independent of the others
(`Probe.measure`), which is what `--ray` distributes.

Causal LMs are scored from the module's own block on: the hidden states entering every block are
stored once (float model), and a module in block L replays block L's input (the blocks before it
compute exactly what they did). The numbers equal a full forward's.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from slimport.arch.layout import is_causal_lm, layout_for
from slimport.compress.calibration import calibration_inputs
from slimport.compress.capture import Needs, capture_inputs, collect, run_block
from slimport.compress.pipeline import Replay, Skip
from slimport.compress.quant import gptq as G
from slimport.compress.quant import primitives as P
from slimport.compress.quant.awq import awq_clip, awq_scales
from slimport.compress.quant.config import QuantArgs, QuantizationConfig
from slimport.compress.skeleton import find_blocks, join
from slimport.data import placeholder_mask, read_labeled, wikitext_windows
from slimport.errors import SlimportError
from slimport.evaluate.perplexity import _logits, window_nll

SENSITIVITY_METHODS = ("rtn", "gptq", "awq", "awq+gptq")
UNITS = ("linear", "block")
FLOAT_BITS = 32  # a module left in float is stored as the source's float32


@dataclass(frozen=True)
class Setup:
    """Everything a probe needs, picklable (a Ray worker builds its own probe from it)."""

    model: str
    calib_data: str | None = None
    eval_data: str | None = None
    method: str = "rtn"
    bits: int = 4
    group_size: int | None = 64
    protect: tuple[str, ...] | None = None  # None: the quantizer's default (output heads)
    unit: str = "linear"  # what is quantized alone: one Linear, or every Linear of one block
    windows: int = 4  # causal LM: held-out windows of seq_len tokens, from the end of eval_data
    # causal LM, --budget: candidates scored on these windows (just before the cost windows), not
    # on the ones that ordered them (0: the same windows)
    check_windows: int = 0
    # causal LM: WikiText v1's <unk> placeholders (raw text has the words) are not scored
    skip_unk: bool = True
    seq_len: int = 512
    examples: int = 256  # classifier: held-out labelled rows (the first of eval_data)
    num_samples: int = 16  # calibration windows / sentences
    calib_seq_len: int = 512
    seed: int = 0
    threads: int | None = None

    def config(self, **options) -> QuantizationConfig:
        """The quantizer's recipe for this setup (options on top)."""
        base: dict = dict(bits=self.bits, method=self.method, seed=self.seed,
                          num_samples=self.num_samples, seq_len=self.calib_seq_len)  # fmt: skip
        if self.group_size:
            base["group_size"] = self.group_size
        if self.protect is not None:
            base["protect"] = list(self.protect)
        if self.calib_data:
            base["calib_data"] = self.calib_data
        return QuantizationConfig(**{**base, **options})


def scheme_label(args: QuantArgs | None) -> str:
    if args is None:
        return "float"
    g = {"group": f" g{args.group_size}", "channel": "", "tensor": " per-tensor"}[args.granularity]
    return f"W{args.bits}{g}"


def bits_per_weight(args: QuantArgs | None, shape: tuple[int, int]) -> float:
    """Stored bits per weight of one Linear [out, in] in this scheme: the integers, a float32
    scale and (asymmetric) a `bits`-wide zero point per group / row / tensor."""
    if args is None:
        return float(FLOAT_BITS)
    out, inp = shape
    per = {"group": args.group_size, "channel": inp, "tensor": out * inp}[args.granularity]
    return args.bits + (32 + (0 if args.symmetric else args.bits)) / per


class Probe:
    """A float model, its held-out slice and calibration statistics: scores the model with any
    set of its Linears quantized (`evaluate`), one module at a time (`measure`)."""

    def __init__(self, setup: Setup) -> None:
        from slimport.evaluate.models import load_for_eval

        self.setup = setup
        if setup.threads:
            torch.set_num_threads(setup.threads)
        torch.manual_seed(setup.seed)
        path = Path(setup.model)
        cfg = _read_config(path)
        self.causal = is_causal_lm(cfg)
        if "quantization_config" in cfg:
            raise SlimportError(f"{path}: already quantized; sensitivity starts from a float model")
        self.model, self.tokenizer = load_for_eval(path, "wikitext2" if self.causal else "sst2")
        self.model.float().eval()
        self.config = setup.config()
        layout = layout_for(getattr(self.model.config, "model_type", None), str(path))
        self.blocks_name, self.blocks = find_blocks(self.model, layout)
        self.linears = {
            n: m
            for n, m in self.model.named_modules()
            if isinstance(m, nn.Linear) and not self.config.is_protected(n)
        }
        if not self.linears:
            raise SlimportError(f"{path}: every Linear layer is protected: nothing to measure")
        # the float Parameters themselves: `applied` swaps in new ones, never writes into these
        self.params = {n: m.weight for n, m in self.linears.items()}
        self.originals = {n: p.detach() for n, p in self.params.items()}
        self.units = self._units()
        self._eval_data()
        self.stats = self._calibrate()
        self._cache: dict = {}
        self.block_inputs: list[list[torch.Tensor]] | None = None
        self._float_nlls: dict[str, list[float]] = {}
        if self.causal:  # the float run records every block's input (the replays) and its NLLs
            with self._from_block(0, record=True):
                self._float_nlls["cost"] = self.window_nlls(self.model)
            self.baseline = _perplexity(self._float_nlls["cost"])
        else:
            self.baseline = self.evaluate({}, record=True)

    def _units(self) -> dict[str, list[str]]:
        """What `measure` quantizes at once, by name: each Linear, or each block's Linears (a
        Linear outside the blocks is a unit of its own)."""
        if self.setup.unit not in UNITS:
            raise SlimportError(f"unit {self.setup.unit!r}", hint="one of " + ", ".join(UNITS))
        if self.setup.unit == "linear":
            return {n: [n] for n in self.linears}
        units: dict[str, list[str]] = {}
        for n in self.linears:
            rest = n.removeprefix(self.blocks_name + ".")
            head = rest.split(".")[0]
            key = f"{self.blocks_name}.{head}" if rest != n and head.isdigit() else n
            units.setdefault(key, []).append(n)
        return units

    def expand(self, plan: dict) -> dict[str, QuantArgs | None]:
        """A plan over units as a plan over Linears."""
        return {n: a for u, a in plan.items() for n in self.units[u]}

    def size_bits(self, unit: str, args: QuantArgs | None) -> float:
        """Stored bits of a unit's weights in scheme `args`."""
        return sum(bits_per_weight(args, tuple(self.originals[n].shape)) * self.originals[n].numel()
                   for n in self.units[unit])  # fmt: skip

    # ---------------------------------------------------------------- data
    def _eval_data(self) -> None:
        s = self.setup
        if not s.eval_data:
            raise SlimportError("sensitivity needs --eval-data (the held-out slice it scores on)")
        self.check_batches = None
        if self.causal:
            ids = wikitext_windows(self.tokenizer, s.eval_data, s.seq_len)
            need = s.windows + s.check_windows
            if s.windows < 1 or s.check_windows < 0 or len(ids) < need:
                raise SlimportError(f"{s.eval_data}: {len(ids)} windows of {s.seq_len} tokens, "
                                    f"fewer than --windows {s.windows} + --check-windows "
                                    f"{s.check_windows}")  # fmt: skip
            self.batches = list(ids[len(ids) - s.windows :].split(1))  # the file's last windows
            if s.check_windows:  # the ones before them: other articles than the costs saw
                self.check_batches = list(ids[len(ids) - need : len(ids) - s.windows].split(1))
            # the targets scored (None: all): not the tokens of a placeholder
            unk = placeholder_mask(self.tokenizer, s.eval_data, s.seq_len) if s.skip_unk else None
            if unk is not None and len(unk) != len(ids):
                raise SlimportError(f"{s.eval_data}: the tokenizer's offsets disagree with its ids")
            keep = list((~unk[:, 1:]).split(1)) if unk is not None else [None] * len(ids)
            self.keep = keep[len(ids) - s.windows :]
            self.check_keep = keep[len(ids) - need : len(ids) - s.windows]
        else:
            texts, labels = read_labeled(s.eval_data)
            texts, labels = texts[: s.examples], labels[: s.examples]
            self.labels = torch.tensor(labels)
            self.batches = [
                dict(self.tokenizer(texts[i : i + 64], padding=True, truncation=True,
                                    return_tensors="pt", padding_side="right"))
                for i in range(0, len(texts), 64)
            ]  # fmt: skip

    def _calibrate(self) -> dict:
        """Per-Linear input statistics of the float model (Hessians for GPTQ, a token sample
        for AWQ), block by block as the quantizer collects them."""
        methods = self.setup.method.split("+")
        needs = Needs(hessian="gptq" in methods, sample=4096 if "awq" in methods else None)
        if not needs:
            return {}
        if not self.setup.calib_data:
            raise SlimportError(f"method {self.setup.method} calibrates: pass --calib-data FILE")
        inputs = capture_inputs(self.model, self.blocks, self.calibration())
        stats = {}
        for i, block in enumerate(self.blocks):
            prefix = f"{self.blocks_name}.{i}"
            inside = {n: m for n, m in block.named_modules() if join(prefix, n) in self.linears}
            for n, st in collect(block, inside, inputs, needs, self.setup.seed, run_block).items():
                stats[join(prefix, n)] = st
            for b, o in zip(inputs, run_block(block, inputs), strict=True):
                b.hidden = o
        return stats

    def calibration(self) -> list[dict]:
        """The calibration batches of the setup (the quantizer's own sampling), made once."""
        if getattr(self, "_calibration", None) is None:
            if not self.setup.calib_data:
                raise SlimportError(
                    f"method {self.setup.method} calibrates: pass --calib-data FILE"
                )
            self._calibration = calibration_inputs(
                self.tokenizer, self.setup.calib_data, self.config, self.causal
            )
        return self._calibration

    # ---------------------------------------------------------------- quantized weights
    def quantized(self, name: str, args: QuantArgs) -> torch.Tensor:
        """The float weight of `name` after quantizing it alone (dequantized), cached."""
        key = (name, args)
        if key not in self._cache:
            self._cache[key] = self._quantize(name, args)
        return self._cache[key]

    def _quantize(self, name: str, args: QuantArgs) -> torch.Tensor:
        w = self.originals[name].float()
        methods = self.setup.method.split("+")
        st = self.stats.get(name)
        s = torch.ones(w.shape[1])
        if "awq" in methods:
            x = torch.cat(st.sample)
            s = awq_scales(x, [w], args)
            if "gptq" not in methods:  # AWQ's clipping: only without GPTQ's error feedback
                return _rtn(awq_clip(w * s, x / s, args), args) / s
        if "gptq" in methods:
            H = st.hessian.value() / s[:, None] / s[None, :]
            r = G.gptq(w * s, H, args)
            return P.dequantize_tensor(r[0].float(), args, r[1], r[2]) / s
        return _rtn(w * s, args) / s

    def errors(self, unit: str, args: QuantArgs) -> dict:
        """Relative weight error (and, with Hessians, output error) over the unit's Linears."""
        dw = ww = dh = wh = 0.0
        for n in self.units[unit]:
            w = self.originals[n].float()
            d = self.quantized(n, args) - w
            dw, ww = dw + float(d.square().sum()), ww + float(w.square().sum())
            st = self.stats.get(n)
            if st is not None and st.hessian is not None:
                H = st.hessian.value()
                dh, wh = dh + float(((d @ H) * d).sum()), wh + float(((w @ H) * w).sum())
        out = {"weight_rel_err": math.sqrt(dw / max(ww, 1e-30))}
        if wh:
            out["output_rel_err"] = dh / wh
        return out

    # ---------------------------------------------------------------- scoring
    @contextlib.contextmanager
    def applied(self, plan: dict[str, QuantArgs | None]):
        """The model with the Linears of `plan` quantized (None: float), restored after."""
        for n, args in plan.items():
            if args is not None:
                self.linears[n].weight = nn.Parameter(self.quantized(n, args), requires_grad=False)
        try:
            yield self.model
        finally:
            for n in plan:
                self.linears[n].weight = self.params[n]

    def evaluate(self, plan: dict[str, QuantArgs | None], record: bool = False) -> float:
        """Perplexity (causal LM) or accuracy (classifier) on the held-out slice with `plan`."""
        start = self._first_block(plan) if self.block_inputs is not None else 0
        with self.applied(plan), self._from_block(start, record):
            return self.score(self.model)

    @torch.no_grad()
    def score(self, model: nn.Module) -> float:
        """Perplexity or accuracy of any model of this one's shape on the held-out slice."""
        if self.causal:
            return _perplexity(self.window_nlls(model))
        preds = torch.cat([_logits(model(**b)).argmax(-1) for b in self.batches])
        return float((preds == self.labels).float().mean())

    @torch.no_grad()
    def window_nlls(self, model: nn.Module, check: bool = False) -> list[float]:
        """Causal LM: mean next-token NLL of each held-out window (`check`: the check slice's)."""
        if check and self.check_batches:
            batches, keep = self.check_batches, self.check_keep
        else:
            batches, keep = self.batches, self.keep
        return [float(window_nll(_logits(model(b)), b, k)[0])
                for b, k in zip(batches, keep, strict=True)]  # fmt: skip

    def float_nlls(self, check: bool = False) -> list[float]:
        """The float model's `window_nlls`, computed once (a full forward: no replay)."""
        key = "check" if check and self.check_batches else "cost"
        if key not in self._float_nlls:
            self._float_nlls[key] = self.window_nlls(self.model, check)
        return self._float_nlls[key]

    def float_metric(self, check: bool = False) -> float:
        """Causal LM: the float model's perplexity on the slice (`check`: the check slice)."""
        return _perplexity(self.float_nlls(check))

    def _first_block(self, plan) -> int:
        first = len(self.blocks)
        for n, args in plan.items():
            rest = n.removeprefix(self.blocks_name + ".")
            if args is None:
                continue
            if rest == n or not rest.split(".")[0].isdigit():
                return 0  # a Linear outside the blocks: run everything
            first = min(first, int(rest.split(".")[0]))
        return first if first < len(self.blocks) else 0

    @contextlib.contextmanager
    def _from_block(self, start: int, record: bool):
        """Record every block's input (the float baseline), or replay block `start`'s stored
        input in place of blocks 0..start-1 (causal LMs only: their blocks see one window)."""
        if not self.causal or not (record or start):
            yield
            return
        if record:
            self.block_inputs = [[] for _ in self.blocks]
            hooks = [
                b.register_forward_pre_hook(lambda m, a, i=i: self.block_inputs[i].append(a[0]))
                for i, b in enumerate(self.blocks)
            ]
            try:
                yield
            finally:
                for h in hooks:
                    h.remove()
            return
        kept = list(self.blocks)
        self.blocks[0] = Replay(self.block_inputs[start])
        for i in range(1, start):
            self.blocks[i] = Skip()
        try:
            yield
        finally:
            for i in range(start):
                self.blocks[i] = kept[i]

    def measure(self, unit: str, args: QuantArgs) -> dict:
        """The cost of quantizing `unit` (a Linear, or a block's) alone in scheme `args`."""
        value = self.evaluate(dict.fromkeys(self.units[unit], args))
        errors = self.errors(unit, args)
        self._cache = {}  # a unit's quantized weights are not asked for again
        return {
            "module": unit,
            "scheme": scheme_label(args),
            "metric": value,
            "delta": self.delta(value),
            **errors,
            "params": sum(self.originals[n].numel() for n in self.units[unit]),
        }

    def delta(self, value: float) -> float:
        """Perplexity: relative increase (0.05 = +5%); accuracy: change in points (-0.5 = -0.5pt)."""
        if self.causal:
            return value / self.baseline - 1.0
        return (value - self.baseline) * 100.0

    @property
    def metric(self) -> str:
        return "perplexity" if self.causal else "accuracy"

    def shapes(self) -> dict[str, tuple[int, int]]:
        return {n: tuple(w.shape) for n, w in self.originals.items()}


def _perplexity(nlls: list[float]) -> float:
    return math.exp(sum(nlls) / len(nlls))


def _rtn(w: torch.Tensor, args: QuantArgs) -> torch.Tensor:
    q, scale, zero = P.rtn(w, args)
    return P.dequantize_tensor(q, args, scale, zero)


def _read_config(path: Path) -> dict:
    import json

    try:
        return json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise SlimportError(
            f"{path}: not a Hugging Face model folder ({e})",
            hint="convert it first: slimport convert SRC OUT --to hf",
        ) from None


def rank(rows: list[dict], causal: bool) -> list[dict]:
    """Most costly first: largest perplexity increase / accuracy loss, then output error."""
    sign = 1.0 if causal else -1.0
    return sorted(
        rows,
        key=lambda r: (
            -sign * r["delta"],
            -r.get("output_rel_err", r["weight_rel_err"]),
            r["module"],
        ),
    )
