"""Memory a model needs, from its config and its meta-device module tree (no weights read).

Exact by construction: weight bytes per dtype and quantization scheme (every parameter of the
built model, tied ones once) and the KV cache per token (2 x layers x kv heads x head dim).
Estimates, by counting the tensors alive at the peak of each stage of the forward: activations
at B x S for inference (no_grad), and the tensors autograd saves for training; for inference
also what the process holds beyond live tensors (`runtime_reserve`). Tests hold the exact
numbers to real tensors and the inference estimate to a real forward's peak RSS."""

from __future__ import annotations

import torch

from slimport.arch.layout import output_heads

BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
LORA_RANK = 8
# tensors of B x S x intermediate alive at the MLP's peak (forward, no_grad) and saved for
# backward: SwiGLU act(gate), up, product; GELU-tanh (GPT-2) makes ~4 temporaries; erf-GELU 2
MLP_LIVE = {"llama": 3, "gpt2": 4}
MLP_SAVED = {"llama": 3, "gpt2": 4}
# A real CPU forward's peak RSS is more than its live tensors (measured on MiniLM at 8 x 64..512
# with torch's profiler for the live bytes, tests/memory_probe.py for the RSS; glibc malloc):
# - KERNELS_MIB: what the first full-size forward allocates outside torch's tensors (BLAS and
#   kernel scratch, caches; anonymous memory: file-backed RSS grew 0.5 MiB) plus the module
#   objects: 14.6 MiB above the live tensors with glibc's mmap threshold pinned (the same at
#   8 x 128 and 8 x 256), ~3 MiB of it the model's Python objects;
# - HEAP_HOLES x the largest freed activation: glibc raises its mmap threshold to each freed
#   mapped block (up to 32 MiB), so later blocks of that size come from the heap, whose freed
#   space stays resident (it trims the top only past twice the threshold). Measured 0.8-1.7x.
# Any MALLOC_* tunable pins the threshold (glibc then never raises it): every freed block over
# 128 KiB is unmapped and the peak is the live tensors + KERNELS_MIB, `pinned` (measured within
# 4% on SmolLM2, MiniLM and random GPT-2 / Qwen2 / DistilBERT, tests/test_analyze.py). With the
# dynamic threshold, a decoder that keeps each layer's KV tensors between its freed MLP
# temporaries can leave far more than HEAP_HOLES resident, varying run to run (random GPT-2 at
# 4 x 256: +120..+180 MiB, about one 12 MiB MLP block per layer), which `total` does not model.
KERNELS_MIB = 14.5
HEAP_HOLES = 1.5
MMAP_THRESHOLD_MAX = 32 << 20
PIN_MMAP_THRESHOLD = "MALLOC_MMAP_THRESHOLD_=131072"


def _dims(config) -> dict:
    h = config.hidden_size
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    hd = getattr(config, "head_dim", None) or h // heads
    inter = (
        getattr(config, "intermediate_size", None)
        or getattr(config, "n_inner", None)
        or getattr(config, "hidden_dim", None)
        or 4 * h
    )
    return {"hidden": h, "heads": heads, "kv_heads": kv, "head_dim": hd, "inter": inter,
            "layers": config.num_hidden_layers, "vocab": config.vocab_size}  # fmt: skip


def _linears(model: torch.nn.Module) -> list[tuple[str, int, int]]:
    """(name, in, out) of every Linear-like layer (GPT-2's Conv1D holds weight [in, out])."""
    out = []
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear):
            out.append((name, m.in_features, m.out_features))
        elif type(m).__name__ == "Conv1D" and getattr(m, "weight", None) is not None:
            out.append((name, m.weight.shape[0], m.weight.shape[1]))
    return out


def weight_bytes(model: torch.nn.Module) -> dict:
    """Bytes of the weights per storage scheme. Quantized schemes quantize every Linear but
    the output heads (as `slimport quantize` does) and keep the rest in float16."""
    params = dict(model.named_parameters())  # tied parameters once
    n = sum(p.numel() for p in params.values())
    heads = {h.split(".")[-1] for h in output_heads()}
    quant = [(nm, i, o) for nm, i, o in _linears(model) if nm.split(".")[-1] not in heads]
    qn = sum(i * o for nm, i, o in quant if f"{nm}.weight" in params)
    rest = n - qn
    rows = sum(o for nm, _, o in quant if f"{nm}.weight" in params)
    out = {d: n * b for d, b in BYTES.items()}
    # W8: int8 per output channel, symmetric, a float16 scale per row
    out["int8 (W8 per-channel)"] = qn + 2 * rows + 2 * rest
    # W4 g64 asymmetric: two weights per byte, per 64 columns a float16 scale and an int4 zero
    groups = sum(o * -(-i // 64) for nm, i, o in quant if f"{nm}.weight" in params)
    out["int4 (W4 g64 asym)"] = qn // 2 + groups * 2 + -(-groups // 2) + 2 * rest
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    return {"parameters": n, "quantized_parameters": qn, "bytes": out, "buffers_fp32": buffers}


def kv_cache_per_token(config) -> int:
    """Elements of K and V one token adds to the cache (all layers); 0 for encoders."""
    d = _dims(config)
    return 2 * d["layers"] * d["kv_heads"] * d["head_dim"]


def inference_activations(config, family: str, batch: int, seq: int, eager: bool = False) -> int:
    """Elements alive at the forward's peak (no_grad), beyond the weights and the KV cache."""
    d, bs = _dims(config), batch * seq
    h, kvd = d["hidden"], d["kv_heads"] * d["head_dim"]
    # + h everywhere: the embedding output the model's forward still references
    attention = bs * (4 * h + 2 * kvd + 2 * h)  # residual, norm, q, k, v, rope'd q / out
    if eager:  # at the softmax: the scores and their softmax beside block input, q, k, v
        attention = max(attention, bs * (3 * h + 2 * kvd) + 2 * batch * d["heads"] * seq * seq)
    # SDPA on CPU (flash kernel, padding mask and all) never holds B x heads x S x S (profiled)
    mlp = bs * (3 * h + MLP_LIVE.get(family, 2) * d["inter"])
    head = bs * (h + d["vocab"]) if hasattr(config, "vocab_size") and _causal(config) else 0
    return max(attention, mlp, head)


def largest_transient(config, family: str, batch: int, seq: int, eager: bool = False) -> int:
    """Elements of the largest activation a forward allocates and frees (the logits stay)."""
    d = _dims(config)
    scores = batch * d["heads"] * seq * seq if eager else 0
    return max(batch * seq * d["inter"], scores)


def runtime_reserve(
    config, family: str, batch: int, seq: int, eager: bool, nbytes: int, pinned: bool = False
) -> int:
    """Bytes a forward's peak RSS holds beyond its live tensors: kernels + glibc heap holes
    (none when the mmap threshold is pinned: freed blocks are unmapped)."""
    block = largest_transient(config, family, batch, seq, eager) * nbytes
    holes = HEAP_HOLES * block if block <= MMAP_THRESHOLD_MAX and not pinned else 0
    return int(KERNELS_MIB * 2**20 + holes)


def training_activations(config, family: str, batch: int, seq: int, checkpointing: bool) -> int:
    """Elements autograd saves for backward (fp32 training): per block the inputs of every op
    that needs them; with gradient checkpointing only each block's input plus one block."""
    d, bs = _dims(config), batch * seq
    h, kvd = d["hidden"], d["kv_heads"] * d["head_dim"]
    per_block = bs * (8 * h + 3 * kvd + MLP_SAVED.get(family, 2) * d["inter"])
    head = 2 * bs * d["vocab"] if _causal(config) else bs * h
    blocks = d["layers"] * bs * h + per_block if checkpointing else d["layers"] * per_block
    return blocks + head


def lora_parameters(model: torch.nn.Module, rank: int = LORA_RANK) -> int:
    """LoRA adapters (A: r x in, B: out x r) on every attention/MLP projection (heads excluded)."""
    heads = {h.split(".")[-1] for h in output_heads()}
    return sum(rank * (i + o) for nm, i, o in _linears(model) if nm.split(".")[-1] not in heads)


def _causal(config) -> bool:
    from slimport.arch.layout import is_causal_lm

    return is_causal_lm({"architectures": config.architectures or [], "model_type": config.model_type})  # fmt: skip


def estimate(model: torch.nn.Module, family: str, batch: int, seq: int) -> dict:
    """Every memory number `slimport analyze` reports, in bytes."""
    config = model.config
    w = weight_bytes(model)
    n, fp32 = w["parameters"], w["bytes"]["float32"]
    eager = getattr(config, "_attn_implementation", "sdpa") == "eager"
    kv_tok = kv_cache_per_token(config) if _causal(config) else 0
    infer = {}
    for dtype, b in BYTES.items():
        act = inference_activations(config, family, batch, seq, eager) * b
        kv = kv_tok * batch * seq * b  # the prefill fills the cache a plain forward returns
        rt = runtime_reserve(config, family, batch, seq, eager, b)
        pinned = w["bytes"][dtype] + act + kv + runtime_reserve(config, family, batch, seq, eager, b, True)  # fmt: skip
        infer[dtype] = {"weights": w["bytes"][dtype], "activations": act, "kv_cache": kv,
                        "runtime": rt, "total": w["bytes"][dtype] + act + kv + rt,
                        "pinned": pinned}  # fmt: skip
    train = {}
    lora = lora_parameters(model)
    for ckpt in (False, True):
        act = training_activations(config, family, batch, seq, ckpt) * 4
        key = "checkpointed" if ckpt else "plain"
        train[f"full ({key})"] = {"weights": fp32, "gradients": fp32, "optimizer": 2 * fp32,
                                  "activations": act, "total": 4 * fp32 + act}  # fmt: skip
        lb = lora * 4
        train[f"LoRA r={LORA_RANK} ({key})"] = {
            "weights": fp32 + lb, "gradients": lb, "optimizer": 2 * lb, "activations": act,
            "total": fp32 + 4 * lb + act,
        }  # fmt: skip
    return {
        "weights": w,
        "kv_cache_per_token": {d: kv_tok * b for d, b in BYTES.items()},
        "inference": infer,
        "training": train,
        "lora_parameters": lora,
        "batch": batch,
        "seq": seq,
        "fp32_parameters_bytes": 4 * n,
    }
