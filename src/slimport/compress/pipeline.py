"""Layer-by-layer compression: a model larger than memory, one block at a time.

The transformers model is built on the meta device (skeleton.py); only the embeddings (to turn
calibration ids into block-0 inputs) and one block at a time are ever real. For each block:

  1. one pass of the float block collects what the recipe's handlers need per Linear input
     (capture.py);
  2. the handlers of the recipe's modifiers run in order (handlers.py): scale migration,
     rounding, static input calibration ...;
  3. the *compressed* block is run to make the next block's inputs, so errors are seen downstream;
  4. the block's tensors are written (writer.py) to their own shard and the block is freed.

Modules after the blocks (final norm, lm_head; BERT's pooler and classifier) are run the same way
by replaying the last block's outputs through the rest of the model. Nothing here knows an
algorithm or a family: those are the modifiers' handlers and arch/layout.py's tables.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import re
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from slimport.arch.layout import CompressLayout, layout_for
from slimport.compress.capture import (
    Batch,
    Needs,
    Run,
    capture_inputs,
    collect,
    no_cache,
    run_block,
)
from slimport.compress.handlers import BlockWork, handler_for
from slimport.compress.prune import REPORT as PRUNE_REPORT
from slimport.compress.prune import handlers as _pruning  # noqa: F401 (registers its handlers)
from slimport.compress.quant.compressed import consumers
from slimport.compress.quant.config import DEFAULT_PROTECT, QuantizationConfig
from slimport.compress.skeleton import Skeleton, check_finite, find_blocks, join, linearize
from slimport.compress.writer import FolderWriter, ignore_list, linear_shapes, module_tensors
from slimport.convert.loader import convert
from slimport.errors import SlimportError
from slimport.io.auto import open_checkpoint
from slimport.io.base import atomic_dir, bounded_heap, check_output_dir
from slimport.io.hf import copy_tokenizer
from slimport.io.safetensors import MAX_SHARD_SIZE, shard_bytes


def quantize_block(
    block: nn.Module,
    prefix: str,
    inputs: list[Batch],
    config: QuantizationConfig,
    layout: CompressLayout,
    run: Run = run_block,
) -> list[dict]:
    """Compress every unprotected Linear of `block` in place; returns per-Linear report rows."""
    linears = {
        n: m
        for n, m in block.named_modules()
        if isinstance(m, nn.Linear) and not config.is_protected(join(prefix, n))
    }
    if not linears:
        return []
    for n, m in linears.items():
        check_finite(join(prefix, n) + ".weight", m.weight)
    plan = config.plan
    handlers = [handler_for(m) for m in plan]
    needs = functools.reduce(
        lambda a, b: a | b, (h.needs(m) for m, h in zip(plan, handlers, strict=True)), Needs()
    )
    stats = collect(block, linears, inputs, needs, config.seed, run)
    rows = {
        n: {"module": join(prefix, n), "seconds": 0.0, "size": m.weight.numel()}
        for n, m in linears.items()
    }
    work = BlockWork(block, linears, stats, inputs, config, layout, rows, run)
    for i, (m, h) in enumerate(zip(plan, handlers, strict=True)):
        work.later = plan[i + 1 :]
        h.apply(m, work)
    return list(rows.values())


# ----------------------------------------------------------------- whole model
def quantize(
    source: str | Path,
    out: str | Path,
    config: QuantizationConfig,
    calibration: list[dict] | Callable[[], list[dict]] | None = None,
    tokenizer_dir: str | Path | None = None,
    progress: bool = True,
    overwrite: bool = False,
    max_shard_size: int | str = MAX_SHARD_SIZE,
) -> dict:
    """Quantize the checkpoint at `source` block by block into a compressed-tensors folder `out`.

    `calibration` is a list of model-input dicts (input_ids, attention_mask, ...), or a function
    returning one, called only once the output folder, the model and the recipe were checked;
    required when the recipe needs data (GPTQ, AWQ, SmoothQuant, static activations). A
    non-empty `out` is refused unless `overwrite` (then it is replaced as a whole). Weights are
    sharded by size as transformers does (`max_shard_size`, "5GB" by default).
    """
    with bounded_heap():
        return _quantize(
            source, out, config, calibration, tokenizer_dir, progress, overwrite, max_shard_size
        )


def _quantize(
    source, out, config, calibration, tokenizer_dir, progress, overwrite, max_shard_size
) -> dict:
    t_start = time.perf_counter()
    out = Path(out)
    check_output_dir(out, overwrite, Path(source))
    shard_bytes(max_shard_size)  # a bad size is refused before the model is read
    if config.bits == 16:
        return _cast16(source, out, config, overwrite, max_shard_size)
    sk = Skeleton(source)
    try:
        shapes = linear_shapes(sk.model)
        quantized = _quantized_linears(shapes, config, sk.source.source.path)
        ignore = ignore_list(sk.model, quantized)
        if callable(calibration):
            calibration = calibration()
        if config.needs_calibration and not calibration:
            raise SlimportError(
                f"method {config.method!r}"
                + (" with activations" if config.activations else "")
                + " needs calibration data, and none was given",
                hint="pass --calib-data FILE (text, .tsv or .jsonl) with enough tokens",
            )
        report_rows: list[dict] = []
        with atomic_dir(out, overwrite, Path(source)) as tmp:
            writer = FolderWriter(tmp, config, sk.tied_head(), max_shard_size)
            sk.calibration = calibration or [{"input_ids": torch.zeros(1, 1, dtype=torch.long)}]
            inputs = capture_inputs(sk.model, sk.blocks, sk.calibration, sk.materialize, sk.free)
            n_blocks = len(sk.blocks)
            bar = tqdm(
                total=n_blocks + 1,
                desc="prune" if config.pruning else "quantize",
                unit="block",
                disable=not progress or None,
            )
            tail = _has_tail_linears(sk.model, sk.blocks, config)
            for i in range(n_blocks):
                prefix = f"{sk.blocks_name}.{i}"
                block = sk.blocks[i]
                sk.materialize(block, prefix)
                report_rows += quantize_block(block, prefix, inputs, config, sk.layout)
                if i + 1 < n_blocks or tail:
                    for b, o in zip(inputs, run_block(block, inputs), strict=True):
                        b.hidden = o
                writer.part(i + 1, module_tensors(block, prefix, config))
                sk.free(block)
                bar.update(1)
            # the rest: embeddings, final norm, heads
            with _skipped(sk.blocks):
                for n, m in sk.model.named_children():
                    sk.materialize(m, n)
                tail_rows = _tail(sk.model, sk.blocks, inputs, sk.calibration, config, sk.layout)
                # buffers the checkpoint never had (position/token-type ids) are not invented
                rest = [
                    t
                    for t in module_tensors(sk.model, "", config)
                    if t.name in sk.planned or not t.name.endswith(_IDS)
                ]
            report_rows += tail_rows
            writer.part(0, writer.untied(rest))
            bar.update(1)
            bar.close()
            writer.finish(sk.config, ignore, sparsity_config(config, report_rows))
            tok_src = sk.source.source
            if tokenizer_dir is not None:
                tok_src = open_checkpoint(tokenizer_dir)
            copy_tokenizer(tmp, tok_src)
            bytes_before = sum(
                _nbytes(p.shape, torch.float32 if p.dtype.is_floating_point else p.dtype)
                for p in sk.planned.values()
            )
            report = {
                "source": str(sk.source.source.path),
                "config": config.to_dict(),
                "quantized_linears": len(quantized),
                "protected_linears": [n for n in shapes if n not in quantized],
                "bytes_before": bytes_before,
                "bytes_after": writer.bytes(),
                "seconds": round(time.perf_counter() - t_start, 2),
                "modules": report_rows,
                "consumers": consumers(config) if config.quantizes else [],
            }
            (tmp / report_file(config)).write_text(json.dumps(report, indent=2) + "\n")
    finally:
        sk.close()
    return report


def _quantized_linears(shapes: dict[str, tuple[int, int]], config, path) -> dict:
    """The Linears the recipe quantizes (name -> [out, in]), after checking it against the
    model's shapes (known from config.json before any weight is read)."""
    if not shapes:
        raise SlimportError(f"{path}: the model has no Linear layers to quantize")
    for p in config.protect:
        if p and p not in DEFAULT_PROTECT and not any(re.search(p, n) for n in shapes):
            raise SlimportError(
                f"protect pattern {p!r} matches no Linear layer",
                hint="layer names look like " + ", ".join(list(shapes)[:3]),
            )
    for p in config.overrides:
        if not any(re.search(p, n) for n in shapes):
            raise SlimportError(
                f"overrides pattern {p!r} matches no Linear layer",
                hint="layer names look like " + ", ".join(list(shapes)[:3]),
            )
    quantized = {n: s for n, s in shapes.items() if not config.is_protected(n)}
    if not quantized:
        raise SlimportError("every Linear layer is protected: nothing to quantize")
    check_group_size(quantized, config)
    for m in config.plan:
        m.check_layers(quantized)
    return quantized


def check_group_size(quantized: dict[str, tuple[int, int]], config: QuantizationConfig) -> None:
    """Per-group scales need group_size to divide every quantized Linear's input size."""
    for name, (_, cols) in quantized.items():
        w = config.weights_for(name)
        g = w.group_size
        if w.granularity == "group" and g and cols % g:
            common = math.gcd(*(c for _, c in quantized.values()))
            fits = [d for d in range(1, common + 1) if common % d == 0]
            raise SlimportError(
                f"quantization option group_size (--group-size) {g}: {name} has {cols} input "
                f"features, which {g} does not divide; sizes that divide every quantized "
                f"Linear: {', '.join(map(str, fits))}",
                hint="choose one of those, or keep the layer in float with --protect",
            )


def report_file(config: QuantizationConfig) -> str:
    return PRUNE_REPORT if config.pruning else "quantization_report.json"


def sparsity_config(config: QuantizationConfig, rows: list[dict]) -> dict | None:
    """What the pruning did, for config.json: the pattern, the modules pruned and the sparsity
    over them (None when the recipe does not prune)."""
    m = config.pruning
    if m is None:
        return None
    pruned = [r for r in rows if r.get("sparsity", 0) > 0]
    sizes = {r["module"]: r["size"] for r in pruned}
    total = sum(sizes.values())
    zeros = sum(r["sparsity"] * r["size"] for r in pruned)
    return {
        "structure": m.pattern,
        "global_sparsity": round(zeros / total, 6) if total else 0.0,
        "targets": sorted(sizes),
    }


def _nbytes(shape, dtype) -> int:
    n = dtype.itemsize
    for d in shape:
        n *= d
    return n


def _has_tail_linears(model: nn.Module, blocks: nn.ModuleList, config) -> bool:
    inside = set(id(m) for m in blocks.modules())
    return any(
        isinstance(m, nn.Linear) and id(m) not in inside and not config.is_protected(n)
        for n, m in model.named_modules()
    )


class Replay(nn.Module):
    """Stands in for the first block: hands out stored hidden states (say the last block's
    outputs, or a later block's inputs), one per forward call, in order."""

    def __init__(self, outputs: list[torch.Tensor]) -> None:
        super().__init__()
        self.outputs, self.i = outputs, 0

    def forward(self, hidden, *args, **kwargs):
        out = self.outputs[self.i]
        self.i += 1
        return out


class Skip(nn.Module):
    """Stands in for a block that is not run: hidden states pass through."""

    def forward(self, hidden, *args, **kwargs):
        return hidden


@contextlib.contextmanager
def _skipped(blocks: nn.ModuleList):
    """The model without its blocks (each passes its input through), for its tail."""
    kept = list(blocks)
    for i in range(len(blocks)):
        blocks[i] = Skip()
    try:
        yield
    finally:
        for i, b in enumerate(kept):
            blocks[i] = b


def _tail(model, blocks, inputs: list[Batch], calibration, config, layout) -> list[dict]:
    """Quantize the Linears outside the blocks (inside `_skipped`): the tail sees the replayed
    final hidden states, with the original batches for its other inputs."""
    if not _has_tail_linears(model, blocks, config):
        return []
    outputs = [b.hidden for b in inputs]

    def run(_, __):
        blocks[0] = Replay(outputs)
        with torch.no_grad():
            for b in calibration:
                model(**b, **no_cache(model))
        blocks[0] = Skip()
        return []

    return quantize_block(model, "", [], config, layout, run=run)


# ----------------------------------------------------------------- in memory
def quantize_(
    model: nn.Module, config: QuantizationConfig, calibration: list[dict] | None = None
) -> nn.Module:
    """Quantize a transformers model in place (torchao's `quantize_`), with the very pipeline the
    folder path runs: block by block, each block calibrated on the compressed previous ones.
    Conv1D layers become Linears. Returns the model, in eval mode; `writer.save_quantized`
    writes it."""
    if config.bits == 16:
        raise SlimportError("a 16-bit cast is not quantization", hint="use model.half()")
    if config.needs_calibration and not calibration:
        raise SlimportError(f"method {config.method!r} needs calibration batches, none were given")
    layout = layout_for(getattr(model.config, "model_type", None), type(model).__name__)
    model.eval()
    linearize(model)
    name, blocks = find_blocks(model, layout)
    check_group_size(
        {n: s for n, s in linear_shapes(model).items() if not config.is_protected(n)}, config
    )
    calibration = calibration or [{"input_ids": torch.zeros(1, 1, dtype=torch.long)}]
    inputs = capture_inputs(model, blocks, calibration)
    for i, block in enumerate(blocks):
        quantize_block(block, f"{name}.{i}", inputs, config, layout)
        for b, o in zip(inputs, run_block(block, inputs), strict=True):
            b.hidden = o
    with _skipped(blocks):
        _tail(model, blocks, inputs, calibration, config, layout)
    return model


_IDS = ("position_ids", "token_type_ids")


def _cast16(source, out, config, overwrite: bool, max_shard_size: int | str) -> dict:
    report = convert(
        source,
        out,
        to="hf",
        dtype=config.dtype16,
        progress=False,
        overwrite=overwrite,
        options={"max_shard_size": max_shard_size},
    )
    return {"source": str(source), "config": config.to_dict(), "conversion": report}
