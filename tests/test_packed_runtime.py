"""The packed torch runtime: quantized layers that hold only integers, scales and zero points,
compute what the dequantized weight computes (exactly in fp32; within bf16 rounding on the CPU
int8/int4 kernels), and load a compressed-tensors folder into a model that really is small."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from torch import nn

pytest.importorskip("compressed_tensors")

from slimport.compress.quant import primitives as P  # noqa: E402
from slimport.compress.quant.compressed import load_simulated  # noqa: E402
from slimport.compress.quant.config import QuantizationConfig  # noqa: E402
from slimport.compress.quant.modules import QuantLinear  # noqa: E402
from slimport.compress.writer import save_quantized  # noqa: E402
from slimport.errors import SlimportError  # noqa: E402
from slimport.runtime.torch.packed import (  # noqa: E402
    PREFILL_ROWS,
    PackedEmbedding,
    PackedLinear,
    PackedWeight,
    int4_layout,
)
from slimport.runtime.torch.quantized import load_quantized, resident_bytes  # noqa: E402

# bf16 keeps 8 significant bits: activations, scales and outputs each round by <= 2^-9. Measured
# max |y - y_ref| / max |y_ref| on these layers: 2.5e-3 .. 3.7e-3 (kernels and prefill path);
# logits of the 2-layer model: 1.4e-2 .. 2.6e-2 (every float of the model in bf16).
BF16_LAYER_TOL = 1e-2
BF16_LOGITS_TOL = 6e-2

# (bits, out, in, group size or None = per row, symmetric) -> kernel used with bf16 compute
LAYERS = {
    "w4-g32-asym": ((4, 64, 128, 32, False), "int4"),
    "w4-g64-sym": ((4, 80, 256, 64, True), "int4"),
    "w4-g128-asym": ((4, 48, 256, 128, False), "int4"),
    "w4-g256-asym": ((4, 32, 512, 256, False), "int4"),
    "w4-g512-asym": ((4, 64, 1024, 512, False), "int4"),  # a multiple of a kernel group
    "w4-row-asym": ((4, 112, 192, None, False), "int4"),
    "w3-g64-asym": ((3, 64, 128, 64, False), "int4"),  # 3-bit integers fit the 4-bit kernel
    "w4-g16-asym": ((4, 64, 128, 16, False), None),  # group the kernel does not take
    "w4-n24-asym": ((4, 24, 128, 64, False), None),  # N % 16 != 0
    "w4-oddk-sym": ((4, 32, 99, None, True), None),  # odd K: one integer per byte
    "w8-row-sym": ((8, 64, 128, None, True), "int8"),
    "w8-row-asym": ((8, 64, 128, None, False), "int8"),
    "w8-g64-sym": ((8, 64, 128, 64, True), None),  # grouped 8-bit: no kernel
}


def random_weight(bits, n, k, group, symmetric, seed=0):
    """Integers on the signed b-bit grid, positive scales, zero points anywhere on the grid."""
    g = torch.Generator().manual_seed(seed)
    lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    groups = 1 if group is None else k // group
    q = torch.randint(lo, hi + 1, (n, k), dtype=torch.int8, generator=g)
    scale = torch.rand(n, groups, generator=g) * 0.05 + 0.005
    zero = None if symmetric else torch.randint(lo, hi + 1, (n, groups), dtype=torch.int8, generator=g)  # fmt: skip
    return q, scale, zero


def reference(q, scale, zero):
    """The spec: value = (q - zero) * scale, scale and zero shared by each group of columns."""
    n, k = q.shape
    cols = k // scale.shape[1]
    z = 0 if zero is None else zero.float().repeat_interleave(cols, 1)
    return (q.float() - z) * scale.repeat_interleave(cols, 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", list(LAYERS))
def test_every_scheme_computes_the_dequantized_weight(name, dtype):
    (bits, n, k, group, sym), kernel = LAYERS[name]
    q, scale, zero = random_weight(bits, n, k, group, sym)
    w = reference(q, scale, zero)
    packed = PackedWeight(q, scale, zero, bits, dtype)
    if dtype == torch.float32 or (kernel == "int4" and int4_layout() is None):
        kernel = None  # fp32 is the exact path; a CPU whose int4 layout is unknown has no kernel
    assert packed.kernel == kernel
    x = torch.randn(PREFILL_ROWS + 3, k, generator=torch.Generator().manual_seed(1)).to(dtype)
    rows = torch.tensor([0, n - 1, 5, n // 2, 5])
    for m in (1, 3, PREFILL_ROWS + 3):  # decode (kernel) sizes and the prefill path
        got = packed.mm(x[:m]).float()
        want = x[:m].float() @ w.T
        err = (got - want).abs().max().item() / want.abs().max().item()
        assert err <= (1e-5 if dtype == torch.float32 else BF16_LAYER_TOL), (m, err)
    got_rows = packed.rows(rows).float()
    err = (got_rows - w[rows]).abs().max().item() / w.abs().max().item()
    assert err <= (0 if dtype == torch.float32 else BF16_LAYER_TOL), err


def test_int4_kernel_convention_zero_is_minus_zero_point_times_scale():
    """aten's int4 kernel computes (u - 8) * s + z on unsigned nibbles u; storing u = q + 8 for
    compressed-tensors' signed q with signed zero point zp, (q - zp) * s needs z = -zp * s
    (= (8 - zp_u) * s for the unsigned zero point zp_u = zp + 8)."""
    q, scale, zero = random_weight(4, 32, 128, 64, symmetric=False)
    s = scale.T.contiguous()  # [groups, N]
    z = -zero.T.float() * s
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu((q.int() + 8).contiguous(), 1)
    x = torch.eye(128)  # fp32 input: the kernel's exact (slow) path returns W.T itself
    w = torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, 64, torch.stack([s, z], -1))
    assert (w.T - reference(q, scale, zero)).abs().max().item() <= 1e-5


def float_tensors(module: nn.Module) -> list[tuple[str, torch.Size]]:
    return [(n, t.shape) for n, t in [*module.named_parameters(), *module.named_buffers()] if t.is_floating_point()]  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_a_packed_layer_holds_no_float_weight(dtype):
    for name, ((bits, n, k, group, sym), _) in LAYERS.items():
        q, scale, zero = random_weight(bits, n, k, group, sym)
        layer = PackedLinear(PackedWeight(q, scale, zero, bits, dtype))
        ints = sum(t.nbytes for t in layer.buffers() if not t.is_floating_point())
        per_weight = 0.5 if layer.packed.layout != "int8" else 1  # two 4-bit integers a byte
        assert ints <= n * k * per_weight + n * k // 16, name  # + int8 zero points per group
        # the only floats: one scale (and zero) per group; a float weight would be n * k
        assert all(shape.numel() <= 2 * n * k // min(group or k, 32) for _, shape in float_tensors(layer)), name  # fmt: skip


# ---------------------------------------------------------------- folders


def tiny_llama(tie: bool):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tie,
    )  # fmt: skip
    return LlamaForCausalLM(cfg).eval()


def rtn_quantize(model: nn.Module, qc: QuantizationConfig, batch: dict) -> nn.Module:
    """Round-to-nearest every unprotected Linear; static input scales from one forward's range."""
    for name, lin in [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]:
        if not qc.is_protected(name):
            q, s, z = P.rtn(lin.weight.detach().float(), qc.weights)
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent), attr, QuantLinear.from_linear(lin, q, s, z, qc.weights, qc.inputs))  # fmt: skip
    if qc.activations == "static":
        ranges = {}

        def observe(name):
            def hook(module, args):
                ranges[name] = (args[0].min(), args[0].max())

            return hook

        quantized = [(n, m) for n, m in model.named_modules() if isinstance(m, QuantLinear)]
        hooks = [m.register_forward_pre_hook(observe(n)) for n, m in quantized]
        with torch.no_grad():
            model(**batch)
        for h in hooks:
            h.remove()
        for n, (lo, hi) in ranges.items():
            model.get_submodule(n).set_input_qparams(*P.qparams(lo, hi, 8, qc.inputs.symmetric))
    return model


FOLDERS = {
    "w4g64-asym": dict(bits=4, group_size=64, symmetric=False),
    "w4g32-sym": dict(bits=4, group_size=32),
    "w8-channel": dict(bits=8),
    "w8a8-static": dict(bits=8, activations="static"),
    "w8a8-dynamic": dict(bits=8, activations="dynamic"),
}
BATCH = {"input_ids": torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    made = {}

    def make(name: str, tie: bool = False):
        if (name, tie) not in made:
            qc = QuantizationConfig(**FOLDERS[name])
            out = tmp_path_factory.mktemp("q") / f"{name}-{tie}"
            save_quantized(rtn_quantize(tiny_llama(tie), qc, BATCH), out, qc)
            made[name, tie] = out
        return made[name, tie]

    return make


@torch.no_grad()
def logits(model) -> torch.Tensor:
    return model(**BATCH).logits.float()


@pytest.mark.parametrize("name", list(FOLDERS))
def test_load_quantized_computes_what_the_dequantized_model_computes(folder, name):
    path = folder(name)
    ref, _ = load_simulated(path)
    want = logits(ref)
    w8a8, bits = "activations" in FOLDERS[name], FOLDERS[name]["bits"]
    model, info = load_quantized(path)
    # fp32: exact paths only (int8 inputs: an int8 GEMM, exact until the last scaling)
    assert info["kernels"] == {"int_mm" if w8a8 else "dequantize": 14}  # 2 blocks x 7 Linears
    assert (logits(model) - want).abs().max().item() <= 1e-5
    fast, info = load_quantized(path, "bfloat16")
    assert info["kernels"] == {"int_mm" if w8a8 else "int8" if bits == 8 else "int4": 14}
    err = (logits(fast) - want).abs().max().item() / want.abs().max().item()
    assert err <= BF16_LOGITS_TOL, err
    for m in (model, fast):
        for mod in m.modules():
            if isinstance(mod, PackedLinear):  # the bias is the one float of in*out size or less
                assert all(s.numel() < mod.in_features * mod.out_features // 8 for _, s in float_tensors(mod))  # fmt: skip
    assert resident_bytes(model) < 0.6 * resident_bytes(ref)


@pytest.mark.parametrize("how", ["int8", "int4"])
def test_quantized_embeddings_share_their_integers_with_a_tied_head(folder, how):
    path = folder("w4g64-asym", tie=True)
    ref, _ = load_simulated(path)
    plain, _ = load_quantized(path)
    model, info = load_quantized(path, "bfloat16", embeddings=how)
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    assert isinstance(emb, PackedEmbedding) and isinstance(head, PackedLinear)
    assert head.packed is emb.packed and emb.packed.kernel == how
    assert not any(t.is_floating_point() and t.numel() >= 256 * 128 // 8 for t in emb.buffers())
    assert info["resident_bytes"] < resident_bytes(plain) - 256 * 128 * 2
    # the embedding's own rounding: 8 bits loses little, 4 bits (groups of 32) more
    want = logits(ref)
    err = (logits(model) - want).abs().max().item() / want.abs().max().item()
    assert err <= {"int8": BF16_LOGITS_TOL, "int4": 0.5}[how], err
    ids = BATCH["input_ids"]
    table = plain.get_input_embeddings().weight
    err = (emb(ids).float() - table[ids]).abs().max().item() / table.abs().max().item()
    assert err <= {"int8": 1 / 127 + 1e-2, "int4": 1 / 15 + 1e-2}[how], err


def test_bad_input_names_the_problem(folder, tmp_path):
    path = folder("w8-channel")
    with pytest.raises(SlimportError, match="compute_dtype 'float16'"):
        load_quantized(path, "float16")
    with pytest.raises(SlimportError, match="embeddings 'int2'"):
        load_quantized(path, embeddings="int2")
    with pytest.raises(SlimportError, match="not a compressed-tensors model"):
        (tmp_path / "plain").mkdir()
        (tmp_path / "plain/config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))  # fmt: skip
        load_quantized(tmp_path / "plain")
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"]["config_groups"]["group_0"]["weights"]["type"] = "float"
    bad = tmp_path / "float-weights"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(SlimportError, match="weight scheme .* not supported"):
        load_quantized(bad)


# ---------------------------------------------------------------- the real model


@pytest.fixture(scope="module")
def smollm2_w4(smollm2_hf, tmp_path_factory):
    """SmolLM2-135M, W4 g64 asymmetric RTN (no calibration: ~40 s on a busy 2-core machine)."""
    from slimport.compress import api

    out = tmp_path_factory.mktemp("smollm2") / "w4g64"
    api.quantize(smollm2_hf, out, progress=False, bits=4, group_size=64, symmetric=False)
    return out


def test_smollm2_w4_packed_equals_the_reference_and_is_small(smollm2_hf, smollm2_w4):
    from transformers import AutoConfig

    # sharded by size as transformers does (5GB): one file, no index, not one per block
    assert sorted(p.name for p in smollm2_w4.glob("*safetensors*")) == ["model.safetensors"]
    ref, _ = load_simulated(smollm2_w4)
    ids = torch.randint(0, 49152, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = ref(ids).logits
    del ref
    model, info = load_quantized(smollm2_w4)
    with torch.no_grad():
        assert (model(ids).logits - want).abs().max().item() <= 1e-5
    cfg = AutoConfig.from_pretrained(smollm2_hf)
    with torch.device("meta"):
        from transformers import AutoModelForCausalLM

        skeleton = AutoModelForCausalLM.from_config(cfg)
    fp32 = 4 * sum(p.numel() for p in skeleton.parameters())  # tied: counted once
    print(f"resident fp32 compute {info['resident_bytes'] / fp32:.3f}x of fp32 ({fp32} B)")
    assert info["resident_bytes"] <= 0.35 * fp32
    bf16, info16 = load_quantized(smollm2_w4, "bfloat16", embeddings="int8")
    assert info16["kernels"] == {"int4": 210, "int8": 1}  # 30 blocks x 7, and the tied head
    print(f"resident bf16 + int8 embeddings {info16['resident_bytes'] / fp32:.3f}x")
    assert info16["resident_bytes"] <= 0.2 * fp32
    with torch.no_grad():
        got = bf16(ids).logits.float()
    top1 = (got.argmax(-1) == want.argmax(-1)).float().mean().item()
    print(f"bf16 logits max |d| {(got - want).abs().max().item():.3f}, top-1 agreement {top1:.3f}")
    assert top1 >= 0.75  # bf16 through 30 blocks; measured 0.9+ on this prompt


# VmRSS / VmHWM of the process itself (ru_maxrss would carry the forking pytest's size over exec)
RSS_SCRIPT = """
import sys, torch, transformers.models.llama.modeling_llama
from slimport.runtime.torch.quantized import load_quantized
def status(key):
    return int(next(l for l in open("/proc/self/status") if l.startswith(key)).split()[1]) * 1024
before = status("VmRSS")
model, info = load_quantized(sys.argv[1], sys.argv[2])
print(before, status("VmRSS"), status("VmHWM"), info["resident_bytes"])
"""


def test_smollm2_w4_load_grows_rss_by_about_the_packed_bytes(smollm2_w4):
    """Measured in a fresh process: RSS after imports, after the load, and its peak."""
    out = subprocess.run(
        [sys.executable, "-c", RSS_SCRIPT, str(smollm2_w4), "float32"],
        capture_output=True, text=True, check=True,
    ).stdout.split()  # fmt: skip
    before, after, peak, resident = map(int, out[-4:])
    print(f"RSS +{(after - before) / 1e6:.0f} MB after load, peak +{(peak - before) / 1e6:.0f} MB, resident {resident / 1e6:.0f} MB")  # fmt: skip
    assert after - before <= 1.25 * resident + 40e6  # allocator slack, no float weight copy
    assert peak - before <= 1.25 * resident + 150e6  # + the largest tensor while reading it
