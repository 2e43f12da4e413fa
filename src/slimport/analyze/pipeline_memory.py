"""Peak memory of slimport's own conversion and quantization of a model, from what the streaming
pipelines hold at once (read off the code, checked against measured peak RSS in
tests/test_analyze_pipeline_memory.py). Bytes above the process's import baseline (Python +
torch + transformers + slimport), which `import_baseline()` measures in a fresh process.

Conversion (`convert --to hf`, engine.py + io/safetensors.py) streams one tensor at a time: the
tensor read, plus `_all_finite`'s scratch on it. `torch.isfinite` is `x == x & x.abs() != inf`,
so a chunk of c elements allocates c x (itemsize + 3) bytes at once (abs in the tensor's dtype,
three bool masks): with 2^24-element chunks that is 112 MiB for fp32, about as much as the
largest tensor of a small model (SmolLM2's embedding: 108 MiB).

Quantization (compress/pipeline.py) holds, at its two high points:
- a block: its float weights, the QuantLinears replacing them (a dequantized float weight and
  the int8 integers each), the calibration hidden states in and out (samples x seq x hidden,
  fp32), one batch's MLP activations, and for GPTQ the float32 Hessian (in x in) per distinct
  Linear input (q/k/v share one, gate/up one) plus GPTQ's two n x n working matrices and the
  stacked weight; AWQ keeps max_tokens sampled inputs per distinct input instead;
- the tail: every module outside the blocks materialized at once (embeddings, final norm,
  head; a tied head is read a second time), the finite-check scratch, and then `reshard`
  reading the largest tensor back from its part file while those are still held.
Both in fp32 (the pipeline computes in the model's float32), plus `KERNELS_MIB` for the kernels
and allocator (memory.py). Not counted: glibc heap holes between the small (< 16 MB, below
`bounded_heap`'s threshold) allocations of a block, which can add tens of MB; the
embedding forward of the capture step (smaller than the tail, which holds it and more)."""

from __future__ import annotations

import json
import subprocess
import sys

import torch

from slimport.analyze.memory import KERNELS_MIB, _dims, _linears
from slimport.arch.layout import layout_for

FINITE_CHUNK = 1 << 24  # engine._all_finite
AWQ_TOKENS = 4096  # modifiers.AWQConfig.max_tokens
BATCH = 8  # calibration.calibration_inputs: batches of 8 samples
FP32 = 4
OUT_PROJ = ("o_proj", "down_proj", "dense", "c_proj", "out_proj", "out_lin", "lin2")  # own input


def _finite_scratch(numel: int, itemsize: int) -> int:
    return min(numel, FINITE_CHUNK) * (itemsize + 3)


def _blocks(model: torch.nn.Module):
    from slimport.compress.skeleton import find_blocks

    layout = layout_for(getattr(model.config, "model_type", None), type(model).__name__)
    return find_blocks(model, layout)[1]


def _outside(model: torch.nn.Module, blocks) -> list[torch.Tensor]:
    """Parameters and persistent buffers outside the blocks, a tied one each time it is named:
    the pipeline materializes every module of the tail from the checkpoint."""
    inside = {id(t) for t in blocks.state_dict(keep_vars=True).values()}
    out = []
    for _, t in model.state_dict(keep_vars=True).items():
        if id(t) not in inside:
            out.append(t)
    return out


def convert_peak(model: torch.nn.Module, itemsize: int) -> dict:
    """`slimport convert --to hf` (no --dtype): the largest tensor plus its finite-check scratch."""
    largest = max(p.numel() for p in model.state_dict(keep_vars=True).values())
    tensor, scratch = largest * itemsize, _finite_scratch(largest, itemsize)
    return {"largest tensor": tensor, "finite-check scratch": scratch, "total": tensor + scratch}


def _linear_inputs(block: torch.nn.Module) -> list[int]:
    """in_features of each distinct Linear input of a block: Linears named as sharing an input
    (q/k/v, gate/up: the same parent and in_features, and not o/down) count once."""
    seen: dict[tuple, int] = {}
    for name, i, _ in _linears(block):  # GPT-2's Conv1D too: the pipeline makes it a Linear
        parent, _, leaf = name.rpartition(".")
        seen[(name,) if leaf in OUT_PROJ else (parent, i)] = i
    return list(seen.values())


def quantize_peak(
    model: torch.nn.Module, family: str, method: str, samples: int, seq: int, itemsize: int
) -> dict:
    """Block-by-block quantization (W4/W8 weight-only) with `samples` x `seq` calibration tokens
    (RTN runs one token). Returns the terms of the higher stage and both stage totals."""
    from slimport.analyze.memory import MLP_LIVE

    config = model.config
    d = _dims(config)
    blocks = _blocks(model)
    block = blocks[0]
    tokens = samples * seq if method != "rtn" else 1
    hidden = tokens * d["hidden"] * FP32
    w = sum(p.numel() for p in block.parameters()) * FP32
    lin = sum(i * o for _, i, o in _linears(block))
    quantlinears = lin * (FP32 + 1)  # dequantized float weight + int8 integers
    batch_tokens = min(tokens, BATCH * seq)
    act = batch_tokens * (3 * d["hidden"] + MLP_LIVE.get(family, 2) * d["inter"]) * FP32
    inputs = _linear_inputs(block)
    extra = 0
    if "gptq" in method:
        n = max(inputs, default=0)
        extra += sum(i * i for i in inputs) * FP32 + 2 * n * n * FP32
    if "awq" in method:
        extra += sum(min(tokens, AWQ_TOKENS) * i for i in inputs) * FP32
    block_stage = {
        "block weights (fp32)": w,
        "QuantLinears (float + int8)": quantlinears,
        "hidden states in + out": 2 * hidden,
        "one batch's activations": act,
    }
    if extra:
        block_stage[" + ".join(k for m, k in (("gptq", "Hessians + GPTQ work"), ("awq", "AWQ samples")) if m in method)] = extra  # fmt: skip
    outside = _outside(model, blocks)
    held = sum(t.numel() for t in outside) * FP32
    big = max((t.numel() for t in outside), default=0)
    reread = max(_finite_scratch(big, itemsize) + big * (itemsize if itemsize != FP32 else 0),
                 big * FP32)  # fmt: skip
    tail_stage = {
        "modules outside the blocks (fp32; tied read twice)": held,
        "finite-check scratch / reshard read": reread,
        "hidden states": hidden,
    }
    totals = {"block": sum(block_stage.values()), "tail": sum(tail_stage.values())}
    worst = max(totals, key=totals.get)
    terms = block_stage if worst == "block" else tail_stage
    kernels = int(KERNELS_MIB * 2**20)
    return {
        "method": method,
        "calibration": f"{samples} x {seq}" if method != "rtn" else "none",
        "stage": worst,
        "terms": terms,
        "stages": totals,
        "kernels + allocator": kernels,
        "total": totals[worst] + kernels,
    }


BASELINE = """
import json, sys
def hwm():
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1]) * 1024
import torch, transformers
import slimport.api, slimport.compress.pipeline
try:
    import compressed_tensors  # the quantize writer imports it lazily
except ImportError:
    pass
if sys.argv[1:]:
    getattr(transformers, sys.argv[1], None)  # the model class's module: quantize builds it
torch.zeros(8).sum()
print(json.dumps(hwm()))
"""


def import_baseline(architecture: str | None = None) -> int:
    """Peak RSS of a fresh Python that imported torch, transformers, slimport's pipelines and
    the model class `architecture` (its modeling module costs ~100+ MB of its own): what a
    `slimport quantize` process holds before it reads a tensor (convert holds a little less)."""
    cmd = [sys.executable, "-c", BASELINE, *([architecture] if architecture else [])]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if run.returncode:
        raise RuntimeError(run.stderr[-2000:])
    return int(json.loads(run.stdout.strip().splitlines()[-1]))


def estimate(model: torch.nn.Module, family: str, itemsize: int, samples: int, seq: int) -> dict:
    """Every pipeline-memory number `slimport analyze` reports, in bytes above the baseline."""
    from slimport.errors import SlimportError

    try:
        quantize = {m: quantize_peak(model, family, m, samples, seq, itemsize) for m in ("rtn", "gptq")}  # fmt: skip
        why = None
    except SlimportError as e:  # a family `slimport quantize` has no block layout for
        quantize, why = {}, e.message
    return {
        "convert": convert_peak(model, itemsize),
        "quantize": quantize,
        "quantize_unsupported": why,
        "source_itemsize": itemsize,
        "assumptions": [
            "bytes above the process baseline (Python + torch + transformers + slimport imports)",
            "convert: --to hf, no --dtype; other writers may hold more (GGUF measured +30% on SmolLM2)",
            "quantize: weight-only W4/W8, batches of 8 samples, computed in fp32",
            "not estimated: glibc heap holes between small allocations (tens of MB)",
        ],
    }
