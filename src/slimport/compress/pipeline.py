"""Layer-by-layer quantization: a model larger than memory, one block at a time.

The transformers model is built on the meta device; only the embeddings (to turn calibration ids
into block-0 inputs) and one block at a time are ever real. For each block:

  1. run it on its calibration inputs, collecting what the algorithms need per Linear input
     (channel absmax for SmoothQuant/AWQ, a token sample for AWQ, the Hessian for GPTQ);
  2. migrate scales between a producer (norm or Linear) and its consumers (SmoothQuant or AWQ);
  3. quantize each Linear's weight (RTN or GPTQ) into a QuantLinear;
  4. with static activations, calibrate each input's range with the chosen observer;
  5. run the *quantized* block to make the next block's inputs, so errors are seen downstream;
  6. write the block's tensors (compressed-tensors layout) to its own shard and free it.

Modules after the blocks (final norm, lm_head; BERT's pooler and classifier) are run the same way
by replaying the last block's outputs through the rest of the model.
"""

from __future__ import annotations

import contextlib
import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from slimport.compress.quant import compressed
from slimport.compress.quant import primitives as P
from slimport.compress.quant.awq import awq_clip, awq_scales
from slimport.compress.quant.config import DEFAULT_PROTECT, QuantizationConfig
from slimport.compress.quant.gptq import Hessian, gptq
from slimport.compress.quant.modules import QuantLinear
from slimport.compress.quant.observers import make_observer, mse_weight_qparams
from slimport.compress.quant.scaling import fold_scales
from slimport.compress.quant.smoothquant import smooth_scales
from slimport.convert import engine
from slimport.convert.loader import convert, load
from slimport.errors import SlimportError
from slimport.io import safetensors as st_io
from slimport.io.auto import open_checkpoint
from slimport.io.base import Ready, atomic_dir, bounded_heap, release_freed_memory
from slimport.io.hf import copy_tokenizer

# (producer, consumers) inside one block: scaling the producer's output channels down by s and the
# consumers' input columns up by s preserves the block's function. Only producers whose output
# feeds nothing but these consumers qualify (pre-norm Llama yes; post-norm BERT's LayerNorms no).
SMOOTHING = {
    "llama": [
        ("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
        ("self_attn.v_proj", ("self_attn.o_proj",)),
        ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
        ("mlp.up_proj", ("mlp.down_proj",)),
    ],
    "bert": [("attention.self.value", ("attention.output.dense",))],
}
SMOOTHING["mistral"] = SMOOTHING["qwen2"] = SMOOTHING["llama"]
SMOOTHING["roberta"] = SMOOTHING["xlm-roberta"] = SMOOTHING["bert"]
# AWQ's weight clipping skips q/k: their error is amplified by the softmax (as AutoAWQ does)
NO_CLIP = re.compile(r"(q_proj|k_proj|query|key)$")


@dataclass
class Stats:
    """What the algorithms need to know about one Linear's input."""

    absmax: torch.Tensor | None = None
    hessian: object | None = None
    sample: list[torch.Tensor] = field(default_factory=list)
    sampled: int = 0


@dataclass
class Batch:
    """One calibration batch at a block boundary: the hidden state plus the other call arguments."""

    hidden: torch.Tensor
    args: tuple
    kwargs: dict
    tokens: torch.Tensor | None = None  # [batch, seq] bool, False at padding


# ----------------------------------------------------------------- model skeleton
class Skeleton:
    """A transformers model on the meta device plus lazy access to the checkpoint's tensors."""

    def __init__(self, source) -> None:
        import transformers

        self.source = load(source)
        m = self.source
        self.config = dict(m.config)
        self.model_type = self.config.get("model_type")
        if self.model_type not in SMOOTHING:
            raise SlimportError(
                f"{m.source.path}: quantizing {self.model_type!r} models is not supported",
                hint="supported: " + ", ".join(sorted(SMOOTHING)),
            )
        planned = engine.from_hub(m.hub, m.family, "hf", m.cfg)
        self.planned = {p.name: p for p in planned}
        hf_config = transformers.AutoConfig.for_model(**self.config)
        arch = (self.config.get("architectures") or [None])[0]
        cls = getattr(transformers, arch or "", None)
        if cls is None:
            raise SlimportError(f"{m.source.path}: transformers has no class {arch!r}")
        with torch.device("meta"):
            self.model = cls(hf_config).eval()
        self.blocks_name, self.blocks = _find_blocks(self.model, hf_config.num_hidden_layers)

    def materialize(self, module: nn.Module, prefix: str) -> None:
        """Give a meta submodule real memory: weights from the file, assigned without a second
        copy; non-persistent buffers (rotary tables, position ids) from the model's own init."""
        for sub in module.modules():
            persistent = set(sub.state_dict(keep_vars=True))
            if any(n not in persistent for n, _ in sub.named_buffers(recurse=False)):
                sub.to_empty(device="cpu", recurse=False)
                self.model._init_weights(sub)
        state = {}
        for name, t in module.state_dict(keep_vars=True).items():
            full = f"{prefix}.{name}" if prefix else name
            p = self.planned.get(full) or self._tied(full)
            if p is None:
                continue  # a buffer the checkpoint does not carry (position ids)
            value = p.compute()
            if tuple(value.shape) != tuple(t.shape):
                raise SlimportError(
                    f"tensor {full!r}: checkpoint {list(value.shape)}, model {list(t.shape)}"
                )
            _check_finite(full, value)
            state[name] = value.to(t.dtype)
        module.load_state_dict(state, strict=False, assign=True)
        left = [n for n, t in module.state_dict(keep_vars=True).items() if t.is_meta]
        if left:
            raise SlimportError(
                f"the checkpoint has no tensor for {', '.join(_join(prefix, n) for n in left[:5])}"
            )

    def _tied(self, name: str):
        tied = getattr(self.model, "_tied_weights_keys", None) or {}
        if isinstance(tied, dict) and name in tied:
            return self.planned.get(tied[name])
        return None

    def tied_head(self) -> dict[str, str]:
        """{head weight: embedding weight} when the checkpoint ties them, else {}."""
        tied = getattr(self.model, "_tied_weights_keys", None) or {}
        if isinstance(tied, dict) and self.config.get("tie_word_embeddings", False):
            return tied
        return {}

    def free(self, module: nn.Module) -> None:
        module.to("meta")
        release_freed_memory()  # hand the block's pages back to the OS, or RSS only grows

    def close(self) -> None:
        self.source.source.close()


def _find_blocks(model: nn.Module, n: int) -> tuple[str, nn.ModuleList]:
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) == n:
            return name, mod
    raise SlimportError(f"could not find the {n} transformer blocks of {type(model).__name__}")


def _finite(t: torch.Tensor) -> bool:
    # a sum is finite whenever every element is (barring overflow, then checked in full): 10x cheaper
    return bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all())


def _check_finite(name: str, t: torch.Tensor) -> None:
    if t.is_floating_point() and not _finite(t):
        raise SlimportError(
            f"tensor {name!r} holds NaN or Inf values",
            hint="the checkpoint is damaged; re-export it",
        )


# ----------------------------------------------------------------- calibration inputs
class _Stop(Exception):
    pass


class _Catcher(nn.Module):
    def __init__(self, store: list) -> None:
        super().__init__()
        self.store = store

    def forward(self, hidden, *args, **kwargs):
        self.store.append(Batch(hidden, args, kwargs))
        raise _Stop


def capture_inputs(sk: Skeleton, batches: list[dict]) -> list[Batch]:
    """Block-0 inputs for each calibration batch: run the model until its first block.

    Modules outside the blocks get memory only when the forward reaches them, so a head that runs
    after the blocks (lm_head) is never loaded here."""
    first = sk.blocks[0]
    loaded: list[nn.Module] = []

    def on_call(name):
        def hook(module, args, kwargs=None):
            if any(p.is_meta for p in module.parameters()) or any(
                b.is_meta for b in module.buffers()
            ):
                sk.materialize(module, name)
                loaded.append(module)

        return hook

    hooks = [m.register_forward_pre_hook(on_call(n)) for n, m in _outside_blocks(sk)]
    store: list[Batch] = []
    sk.blocks[0] = _Catcher(store)
    try:
        with torch.no_grad():
            for b in batches:
                with contextlib.suppress(_Stop):
                    sk.model(**b, **_no_cache(sk.model))
                store[-1].tokens = _token_mask(b.get("attention_mask"))
    finally:
        sk.blocks[0] = first
        for h in hooks:
            h.remove()
    for mod in loaded:
        sk.free(mod)
    return store


def _token_mask(mask) -> torch.Tensor | None:
    """Real-token positions of a [batch, seq] attention mask; None when nothing is padded."""
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2 or bool(mask.all()):
        return None
    return mask.bool()


@contextlib.contextmanager
def _real_tokens(module: nn.Module, inputs: list[Batch]):
    """Yields `rows(x)`: a Linear's input as [tokens, features] without the padding positions of
    the batch `module` is running. Padding is not data: its hidden states would widen activation
    ranges and bias Hessians (in MiniLM's block 0 it moved an input range by 55%)."""
    masks = {id(b.hidden): b.tokens for b in inputs}
    current: list[torch.Tensor | None] = [None]

    def hook(_, args, kwargs):
        if args and id(args[0]) in masks:
            current[0] = masks[id(args[0])]
        else:  # the whole model run on a calibration batch (the tail after the blocks)
            current[0] = _token_mask(kwargs.get("attention_mask"))

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


def _outside_blocks(sk: Skeleton) -> list[tuple[str, nn.Module]]:
    """The largest submodules that neither are nor contain the blocks (embeddings, norms, heads)."""
    out = []

    def walk(prefix: str, mod: nn.Module) -> None:
        for n, child in mod.named_children():
            name = _join(prefix, n)
            if child is sk.blocks:
                continue
            if _contains(child, sk.blocks):
                walk(name, child)
            else:
                out.append((name, child))

    walk("", sk.model)
    return out


def _contains(parent: nn.Module, child: nn.Module) -> bool:
    return any(m is child for m in parent.modules())


def run_block(block: nn.Module, inputs: list[Batch]) -> list[torch.Tensor]:
    outs = []
    with torch.no_grad():
        for b in inputs:
            out = block(b.hidden, *b.args, **b.kwargs)
            outs.append(out[0] if isinstance(out, tuple) else out)
    return outs


# ----------------------------------------------------------------- one block
def quantize_block(
    block: nn.Module,
    prefix: str,
    inputs: list[Batch],
    config: QuantizationConfig,
    model_type: str,
    run: Callable[[nn.Module, list[Batch]], list[torch.Tensor]] = run_block,
) -> list[dict]:
    """Quantize every unprotected Linear of `block` in place; returns per-Linear report rows."""
    linears = {
        n: m
        for n, m in block.named_modules()
        if isinstance(m, nn.Linear) and not config.is_protected(_join(prefix, n))
    }
    if not linears:
        return []
    for n, m in linears.items():
        _check_finite(_join(prefix, n) + ".weight", m.weight)
    stats = _collect(block, linears, inputs, config, run)
    rows: dict[str, dict] = {n: {"module": _join(prefix, n), "seconds": 0.0} for n in linears}

    # 2. scale migration
    if config.smoothquant is not None or config.awq_scaling:
        _migrate_scales(block, linears, stats, config, model_type, rows)
    for st in stats.values():
        st.sample = []  # AWQ's token sample is spent: off the working set before GPTQ

    # 3. weights. Linears fed one input share its Hessian; GPTQ quantizes them as one stacked
    # matrix (see gptq()), except per-tensor, whose scale spans one Linear only.
    shared: dict[int, list[str]] = {}
    for n in linears:
        shared.setdefault(id(stats[n]), []).append(n)
    for names in shared.values():
        stack = config.gptq_weights and config.weights.granularity != "tensor"
        for part in [names] if stack else [[n] for n in names]:
            _quantize_weights(
                block, part, linears, stats[part[0]], config, rows, part[-1] == names[-1]
            )

    # 4. static activation ranges, observed on the inputs the quantized weights produce
    if config.activations == "static":
        qls = {n: m for n, m in block.named_modules() if isinstance(m, QuantLinear)}
        obs = {
            n: make_observer(
                config.observer, config.inputs, seed=config.seed, **config.observer_options
            )
            for n in qls
        }
        with _real_tokens(block, inputs) as token_rows:
            hooks = [
                m.register_forward_pre_hook(_observe_hook(obs[n], token_rows))
                for n, m in qls.items()
            ]
            try:
                run(block, inputs)
            finally:
                for h in hooks:
                    h.remove()
        for n, m in qls.items():
            m.set_input_qparams(*obs[n].qparams())
            rows[n]["input_scale"] = float(m.input_scale)
    return list(rows.values())


def _migrate_scales(block, linears, stats, config, model_type: str, rows) -> None:
    """SmoothQuant or AWQ scales for every (producer, consumers) pair, folded into the weights;
    then AWQ's weight clipping."""
    mods = dict(block.named_modules())
    for producer, consumers in SMOOTHING.get(model_type, []):
        if producer not in mods or not all(c in linears for c in consumers):
            continue
        cons = [linears[c] for c in consumers]
        if (
            isinstance(mods[producer], nn.Linear)
            and mods[producer].out_features != cons[0].in_features
        ):
            continue  # grouped-query attention: v has fewer rows than o has columns
        st = stats[consumers[0]]
        t0 = time.perf_counter()
        if config.smoothquant is not None:
            # every pair, up_proj -> down_proj included: SwiGLU's product carries the largest
            # activation outliers of a Llama block, and they reach down_proj's input
            s = smooth_scales(st.absmax, [c.weight for c in cons], config.smoothquant)
        else:
            s = awq_scales(
                torch.cat(st.sample), [c.weight for c in cons], config.weights,
                grid=config.awq.get("grid", 20),
            )  # fmt: skip
        fold_scales(mods[producer], cons, s)
        for st in {id(stats[c]): stats[c] for c in consumers}.values():
            _rescale(st, s)
        for c in consumers:
            rows[c]["seconds"] += time.perf_counter() - t0
            rows[c]["scaled_by"] = producer
    clip = config.awq.get("clip")
    if config.awq_scaling and (clip or (clip is None and not config.gptq_weights)):
        for n, m in linears.items():
            if NO_CLIP.search(n):
                continue
            t0 = time.perf_counter()
            with torch.no_grad():
                m.weight.copy_(awq_clip(m.weight, torch.cat(stats[n].sample), config.weights))
            rows[n]["seconds"] += time.perf_counter() - t0


def _quantize_weights(block, names, linears, st: Stats, config, rows, last: bool) -> None:
    """Quantize the Linears `names` (sharing the input statistics `st`) into QuantLinears, in
    place in `block`; the float Linears are let go as soon as their replacement exists."""
    t0 = time.perf_counter()
    ws = [linears[n].weight.detach().float() for n in names]
    sizes = [w.shape[0] for w in ws]
    loss = None
    if config.gptq_weights:
        # the last user of the Hessian hands it over: GPTQ works in its memory
        H = st.hessian if last else st.hessian.value()
        if last:
            st.hessian = None
        g = config.gptq
        q, scale, zero, loss = gptq(
            ws,
            H,
            config.weights,
            damp=g.get("damp", 0.01),
            block_size=g.get("block_size", 128),
            act_order=g.get("act_order", True),
            weight_observer=config.weight_observer,
        )
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
                scale, zero = mse_weight_qparams(w, config.weights)
                parts.append((P.quantize_tensor(w, config.weights, scale, zero), scale, zero, None))
            else:
                parts.append((*P.rtn(w, config.weights), None))
    seconds = (time.perf_counter() - t0) / len(names)
    for n, w, (q, scale, zero, row_loss) in zip(names, ws, parts, strict=True):
        t0 = time.perf_counter()
        ql = QuantLinear.from_linear(linears.pop(n), q, scale, zero, config.weights, config.inputs)
        _set_module(block, n, ql)
        rows[n]["seconds"] += seconds + time.perf_counter() - t0
        rows[n]["weight_rel_err"] = float((ql.weight - w).norm() / w.norm().clamp_min(1e-12))
        if row_loss is not None:  # GPTQ's objective tr(dW H dW^T) per row: mean output MSE x 2
            rows[n]["output_err"] = float(row_loss.sum()) / max(1, q.shape[0])


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _set_module(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def _observe_hook(observer, token_rows):
    def hook(module, args):
        observer.update(token_rows(args[0].detach()))

    return hook


def _collect(block, linears, inputs, config, run) -> dict[str, Stats]:
    """Pass 1: per-Linear input statistics on the float block."""
    need_absmax = config.smoothquant is not None or config.awq_scaling
    need_sample = config.awq_scaling
    need_hessian = config.gptq_weights
    if not (need_absmax or need_sample or need_hessian):
        return {n: Stats() for n in linears}
    stats = {n: Stats() for n in linears}
    budget = int(config.awq.get("max_tokens", 4096))
    total = (
        sum(
            b.hidden.shape[0] * b.hidden.shape[1] if b.tokens is None else int(b.tokens.sum())
            for b in inputs
        )
        if inputs and inputs[0].hidden.dim() == 3
        else None
    )
    gen = torch.Generator().manual_seed(config.seed)
    # Linears fed the very same tensor (q/k/v, gate/up) share one Stats: one Hessian, not three.
    # `seen` holds the tensors themselves for the length of one forward: compared by identity and
    # kept alive, so a later input can never reuse a freed one's address and be mistaken for it.
    seen: dict[int, tuple[torch.Tensor, str]] = {}

    def hook_for(n, in_features, token_rows):
        if need_hessian:
            stats[n].hessian = Hessian(in_features)

        def hook(module, args):
            owner = seen.setdefault(id(args[0]), (args[0], n))[1]
            if owner != n:
                stats[n] = stats[owner]
                return
            st = stats[n]
            x = token_rows(args[0].detach()).float()
            if not _finite(x):
                raise SlimportError(
                    f"module {n!r}: NaN/Inf in its calibration activations",
                    hint="check the weights before this layer",
                )
            if need_absmax:
                a = x.abs().amax(0)
                st.absmax = a if st.absmax is None else torch.maximum(st.absmax, a)
            if need_hessian:
                st.hessian.add(x)
            if need_sample:
                keep = x
                if total and total > budget:  # an even share of the budget from every batch
                    k = max(1, round(budget * x.shape[0] / total))
                    keep = x[torch.randperm(x.shape[0], generator=gen)[:k]]
                st.sample.append(keep.clone())

        return hook

    with _real_tokens(block, inputs) as token_rows:
        hooks = [
            m.register_forward_pre_hook(hook_for(n, m.in_features, token_rows))
            for n, m in linears.items()
        ]
        hooks.append(block.register_forward_pre_hook(lambda *_: seen.clear()))
        try:
            run(block, inputs)
        finally:
            for h in hooks:
                h.remove()
    return stats


def _rescale(st: Stats, s: torch.Tensor) -> None:
    """The consumer's input is now x / s: keep its statistics in step."""
    if st.absmax is not None:
        st.absmax = st.absmax / s
    if st.sample:
        st.sample = [x / s for x in st.sample]
    if st.hessian is not None:
        st.hessian.scale_inputs(s)


# ----------------------------------------------------------------- whole model
def quantize(
    source: str | Path,
    out: str | Path,
    config: QuantizationConfig,
    calibration: list[dict] | None = None,
    tokenizer_dir: str | Path | None = None,
    progress: bool = True,
) -> dict:
    """Quantize the checkpoint at `source` block by block into a compressed-tensors folder `out`.

    `calibration` is a list of model-input dicts (input_ids, attention_mask, ...); required when
    the recipe needs data (GPTQ, AWQ, SmoothQuant, static activations).
    """
    with bounded_heap():
        return _quantize(source, out, config, calibration, tokenizer_dir, progress)


def _quantize(source, out, config, calibration, tokenizer_dir, progress) -> dict:

    t_start = time.perf_counter()
    if config.bits == 16:
        return _cast16(source, out, config)
    if config.needs_calibration and not calibration:
        raise SlimportError(
            f"method {config.method!r}"
            + (" with activations" if config.activations else "")
            + " needs calibration data, and none was given",
            hint="pass --calib-data FILE (text, .tsv or .jsonl) with enough tokens",
        )
    sk = Skeleton(source)
    all_linears = [n for n, m in sk.model.named_modules() if isinstance(m, nn.Linear)]
    if not all_linears:
        raise SlimportError(f"{sk.source.source.path}: the model has no Linear layers to quantize")
    for p in config.protect:
        if p not in DEFAULT_PROTECT and not any(re.search(p, n) for n in all_linears):
            raise SlimportError(
                f"protect pattern {p!r} matches no Linear layer",
                hint="layer names look like " + ", ".join(all_linears[:3]),
            )
    quantized = [n for n in all_linears if not config.is_protected(n)]
    if not quantized:
        raise SlimportError("every Linear layer is protected: nothing to quantize")

    report_rows: list[dict] = []
    shards: dict[str, list] = {}
    out = Path(out)
    try:
        with atomic_dir(out) as tmp:
            sk.calibration = calibration or [_dummy_batch(sk)]
            inputs = capture_inputs(sk, sk.calibration)
            n_blocks = len(sk.blocks)
            bar = tqdm(
                total=n_blocks + 1, desc="quantize", unit="block", disable=not progress or None
            )
            written: set[str] = set()
            for i in range(n_blocks):
                prefix = f"{sk.blocks_name}.{i}"
                block = sk.blocks[i]
                sk.materialize(block, prefix)
                report_rows += quantize_block(block, prefix, inputs, config, sk.model_type)
                if i + 1 < n_blocks or _has_tail_linears(sk, config):
                    outs = run_block(block, inputs)
                    for b, o in zip(inputs, outs, strict=True):
                        b.hidden = o
                name = f"model-{i + 2:05d}-of-{n_blocks + 2:05d}.safetensors"
                shards[name] = _block_tensors(block, prefix, config, compressed)
                st_io.write(tmp / name, _planned(shards[name]))
                written.update(t.name for t in shards[name])
                shards[name] = [t.name for t in shards[name]]
                sk.free(block)
                bar.update(1)
            # the rest: embeddings, final norm, heads
            tail_rows, rest = _rest(sk, inputs, config, written, compressed)
            report_rows += tail_rows
            first = f"model-00001-of-{n_blocks + 2:05d}.safetensors"
            st_io.write(tmp / first, _planned(rest))
            shards[first] = [t.name for t in rest]
            bar.update(1)
            bar.close()
            index = {
                "metadata": {"total_size": sum((tmp / f).stat().st_size for f in shards)},
                "weight_map": {t: f for f, names in sorted(shards.items()) for t in names},
            }
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
            ignore = [n for n in all_linears if config.is_protected(n)]
            cfg = dict(sk.config)
            if sk.tied_head() and not all(
                config.is_protected(h.rpartition(".")[0]) for h in sk.tied_head()
            ):
                cfg["tie_word_embeddings"] = False  # the head is quantized, the embedding is not
            cfg["quantization_config"] = compressed.quantization_config(config, ignore)
            (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
            (tmp / "slimport_quantization.json").write_text(
                json.dumps(config.to_dict(), indent=2) + "\n"
            )
            tok_src = sk.source.source
            if tokenizer_dir is not None:
                tok_src = open_checkpoint(tokenizer_dir)
            copy_tokenizer(tmp, tok_src)
            bytes_before = sum(
                _nbytes(p.shape, torch.float32 if p.dtype.is_floating_point else p.dtype)
                for p in sk.planned.values()
            )
            bytes_after = sum((tmp / f).stat().st_size for f in shards)
            report = {
                "source": str(sk.source.source.path),
                "config": config.to_dict(),
                "quantized_linears": len(quantized),
                "protected_linears": ignore,
                "bytes_before": bytes_before,
                "bytes_after": bytes_after,
                "seconds": round(time.perf_counter() - t_start, 2),
                "modules": report_rows,
            }
            (tmp / "quantization_report.json").write_text(json.dumps(report, indent=2) + "\n")
    finally:
        sk.close()
    return report


def _nbytes(shape, dtype) -> int:
    n = dtype.itemsize
    for d in shape:
        n *= d
    return n


def _planned(tensors: list[Ready]) -> list[Ready]:
    return sorted(tensors, key=lambda t: t.name)


def _block_tensors(module: nn.Module, prefix: str, config, compressed) -> list[Ready]:
    """A module's checkpoint entries: compressed-tensors entries for QuantLinears, the rest as is."""
    out: dict[str, torch.Tensor] = {}
    qnames = set()
    for n, m in module.named_modules():
        if isinstance(m, QuantLinear):
            qnames.add(n)
            out.update(compressed.linear_tensors(_join(prefix, n), m, config))
    for n, t in module.state_dict().items():
        owner = n.rpartition(".")[0]
        if owner in qnames:
            continue
        out.setdefault(_join(prefix, n), t.detach())  # written before the module is freed
    return [Ready(n, t.contiguous()) for n, t in out.items()]


def _has_tail_linears(sk: Skeleton, config) -> bool:
    blocks = set(id(m) for m in sk.blocks.modules())
    return any(
        isinstance(m, nn.Linear) and id(m) not in blocks and not config.is_protected(n)
        for n, m in sk.model.named_modules()
    )


class _Replay(nn.Module):
    """Stands in for the first block: returns the stored last-block outputs, batch by batch."""

    def __init__(self, outputs: list[torch.Tensor]) -> None:
        super().__init__()
        self.outputs, self.i = outputs, 0

    def forward(self, hidden, *args, **kwargs):
        out = self.outputs[self.i]
        self.i += 1
        return out


class _Skip(nn.Module):
    def forward(self, hidden, *args, **kwargs):
        return hidden


def _rest(sk: Skeleton, inputs: list[Batch], config, written: set[str], compressed):
    """Everything outside the blocks: quantize its unprotected Linears (replaying the blocks'
    outputs through the model's own tail), then hand back its tensors for the first shard."""
    blocks = list(sk.blocks)
    for i in range(len(sk.blocks)):
        sk.blocks[i] = _Skip()
    try:
        rest_modules = [(n, m) for n, m in sk.model.named_children()]
        for n, m in rest_modules:
            sk.materialize(m, n)
        rows: list[dict] = []
        if _has_tail_linears(sk, config):
            # the tail Linears see replayed final hidden states; calibrate with the original batches
            outputs = [b.hidden for b in inputs]

            def run(_, __):
                sk.blocks[0] = _Replay(outputs)
                with torch.no_grad():
                    for b in sk.calibration:
                        sk.model(**b, **_no_cache(sk.model))
                sk.blocks[0] = _Skip()
                return []

            rows = quantize_block(sk.model, "", [], config, sk.model_type, run=run)
        tensors = [
            t for t in _block_tensors(sk.model, "", config, compressed) if t.name not in written
        ]
        # a tied head left in float is not stored twice: transformers re-ties it on load
        if sk.tied_head():
            tensors = [t for t in tensors if t.name not in sk.tied_head()]
        # non-persistent-looking buffers the checkpoint never had
        tensors = [t for t in tensors if t.name in sk.planned or not t.name.endswith(_IDS)]
        return rows, tensors
    finally:
        for i, b in enumerate(blocks):
            sk.blocks[i] = b


_IDS = ("position_ids", "token_type_ids")


def _no_cache(model: nn.Module) -> dict:
    import inspect

    return (
        {"use_cache": False} if "use_cache" in inspect.signature(model.forward).parameters else {}
    )


def _dummy_batch(sk: Skeleton) -> dict:
    return {"input_ids": torch.zeros(1, 1, dtype=torch.long)}


def _cast16(source, out, config) -> dict:
    report = convert(source, out, to="hf", dtype=config.dtype16, progress=False)
    return {"source": str(source), "config": config.to_dict(), "conversion": report}
