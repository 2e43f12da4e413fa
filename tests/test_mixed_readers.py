"""Mixed-precision folders (one config group per scheme: what `slimport sensitivity --budget`'s
recipes quantize to) load in every reader: each Linear computes in its own group's scheme
(bits, group size, symmetric or not) and a protected Linear stays float. The reference is
compressed-tensors' own decompressor applied module by module (transformers 5.24 decodes such
folders with the first group's scheme), on real SmolLM2 weights (its first two blocks)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

pytest.importorskip("compressed_tensors")

from test_mixed_precision import decoded_by_the_library  # noqa: E402

from slimport import api, load_quantized  # noqa: E402
from slimport.compress import pipeline  # noqa: E402
from slimport.compress.quant.config import QuantizationConfig  # noqa: E402
from slimport.errors import SlimportError  # noqa: E402
from slimport.io.auto import open_checkpoint  # noqa: E402
from slimport.io.compressed import dequantize  # noqa: E402
from slimport.runtime.torch.packed import PackedLinear  # noqa: E402

IDS = torch.randint(0, 49152, (2, 24), generator=torch.Generator().manual_seed(0))
P = "model.layers"
# W4 g32 asym by default; W8 per channel (symmetric) for layer 0's q/k; W4 g64 for layer 1's
# MLP; two Linears left float
MIXED = dict(
    bits=4, group_size=32, symmetric=False, method="rtn",
    protect=[r"lm_head$", r"layers\.0\.self_attn\.o_proj$", r"layers\.1\.mlp\.down_proj$"],
    overrides={r"layers\.0\.self_attn\.[qk]_proj$": {"bits": 8, "granularity": "channel"},
               r"layers\.1\.mlp\.": {"group_size": 64}},
)  # fmt: skip
# (bits, group size or None for per channel, symmetric) per Linear; absent: float
EXPECTED = {
    **{f"{P}.0.self_attn.{m}": (8, None, True) for m in ("q_proj", "k_proj")},
    **{f"{P}.0.{m}": (4, 32, False) for m in ("self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")},
    **{f"{P}.1.self_attn.{m}": (4, 32, False) for m in ("q_proj", "k_proj", "v_proj", "o_proj")},
    **{f"{P}.1.mlp.{m}": (4, 64, False) for m in ("gate_proj", "up_proj")},
}  # fmt: skip
FLOAT = (f"{P}.0.self_attn.o_proj", f"{P}.1.mlp.down_proj")


def quantized(src: Path, out: Path, **recipe) -> Path:
    pipeline.quantize(src, out, QuantizationConfig(**recipe), progress=False)
    return out


@pytest.fixture(scope="module")
def mixed(smollm2_slice, tmp_path_factory) -> Path:
    folder = quantized(smollm2_slice, tmp_path_factory.mktemp("mixed") / "q", **MIXED)
    groups = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert len(groups["config_groups"]) == 3
    return folder


@pytest.fixture(scope="module")
def decoded(mixed, smollm2_slice) -> nn.Module:
    """The model compressed-tensors' decompressor makes of the folder."""
    from transformers import AutoModelForCausalLM

    return decoded_by_the_library(mixed, AutoModelForCausalLM.from_pretrained(smollm2_slice))


@pytest.fixture(scope="module")
def reference(decoded) -> torch.Tensor:
    with torch.no_grad():
        return decoded(IDS).logits


def test_load_quantized_gives_each_linear_its_own_scheme(mixed, reference):
    model, info = load_quantized(mixed)
    with torch.no_grad():
        d = (model(IDS).logits - reference).abs().max().item()
    print(f"\nmixed W8/W4 g32/W4 g64/float, load_quantized fp32 vs decompressed: max|d| {d:.2e}")
    assert d <= 1e-5
    assert set(info["scheme"].split("; ")) == {
        "W8 per-channel sym (pack-quantized)",
        "W4 g32 asym (pack-quantized)",
        "W4 g64 asym (pack-quantized)",
    }
    for name, (bits, group, symmetric) in EXPECTED.items():
        m = model.get_submodule(name)
        assert isinstance(m, PackedLinear), name
        w = m.packed
        assert (w.bits, w.group, w.zero is None) == (bits, group or m.in_features, symmetric), name
        # resident: integers (and their scales), never a float copy of the weight
        assert not w.qweight.is_floating_point() and not any(
            t.is_floating_point() and t.shape == (m.out_features, m.in_features)
            for t in m.state_dict().values()
        ), name
    for name in FLOAT:
        m = model.get_submodule(name)
        assert type(m) is nn.Linear and m.weight.dtype == torch.float32, name


def test_mindspore_gives_each_linear_its_own_scheme(mixed, reference, decoded):
    pytest.importorskip("mindspore")
    import mindspore as ms

    from slimport.runtime.mindspore.auto import AutoModelForCausalLM
    from slimport.runtime.mindspore.quantized import QuantDense

    model = AutoModelForCausalLM.from_pretrained(mixed)
    cells = [c for _, c in model.cells_and_names() if isinstance(c, QuantDense)]
    assert len(cells) == len(EXPECTED)
    kinds = sorted((c.bits, c.group_size) for c in cells)
    want = sorted((b, g or 576) for b, g, _ in EXPECTED.values())
    assert kinds == want
    ours = model(ms.Tensor(IDS.numpy())).logits.asnumpy().astype(np.float64)
    with torch.no_grad():  # the same dequantized weights in float64: fp32 rounding's yardstick
        ref64 = decoded.double()(IDS).logits.numpy()
    decoded.float()
    d, d64 = (float(np.abs(ours - r).max()) for r in (reference.numpy(), ref64))
    noise = float(np.abs(reference.numpy() - ref64).max())
    print(f"\nmixed folder in MindSpore vs decompressed: logits max|d| {d:.2e} (fp32), {d64:.2e} "
          f"(fp64; torch fp32 vs fp64: {noise:.2e})")  # fmt: skip
    # (measured 9.5e-5 vs fp32, 9.2e-5 vs fp64 where torch fp32 is 3.7e-5 from fp64: the MindSpore
    # float kernels' rounding on SmolLM2's ~2e4 residual stream, as in test_ms_llama; the weights
    # each Linear computes with are the decompressor's exactly, checked below)
    assert d <= 1e-4
    for c in cells:
        name = c.weight_q.name.removesuffix(".weight_q")
        want = decoded.get_submodule(name).weight.detach().numpy()
        assert np.array_equal(c.dequantized().asnumpy(), want), name


def test_onnx_export_gives_each_linear_its_own_scheme(mixed, reference, tmp_path):
    onnx = pytest.importorskip("onnx")
    from slimport.runtime.onnx import OnnxModel, export_onnx

    report = export_onnx(mixed, tmp_path / "onnx", accuracy_level=0)
    assert report["quantized_linears"] == len(EXPECTED)
    proto = onnx.load(str(tmp_path / "onnx/model.onnx"))
    concat = {n.output[0]: list(n.input) for n in proto.graph.node if n.op_type == "Concat"}
    covered = {}  # Linear -> (bits, block_size) of the MatMulNBits that computes it
    for n in proto.graph.node:
        if n.op_type == "MatMulNBits":
            a = {x.name: onnx.helper.get_attribute_value(x) for x in n.attribute}
            parts = [b.removesuffix(".weight_packed") for b in concat.get(n.input[1], [n.input[1]])]
            covered |= {p: (a["bits"], a["block_size"], len(parts)) for p in parts}
    # per channel: one scale per row over 128-wide blocks; Linears of one input and one scheme
    # share a packed kernel (layer 1's q/k/v, both gate/up pairs); layer 0's q/k/v differ
    assert {p: c[:2] for p, c in covered.items()} == {
        p: (b, g or 128) for p, (b, g, _) in EXPECTED.items()
    }
    assert covered[f"{P}.1.self_attn.q_proj"][2] == 3 and covered[f"{P}.0.self_attn.q_proj"][2] == 1
    assert covered[f"{P}.0.mlp.gate_proj"][2] == covered[f"{P}.1.mlp.up_proj"][2] == 2
    ours = OnnxModel(tmp_path / "onnx").logits(IDS.numpy())
    d = float(np.abs(ours - reference.numpy()).max())
    print(f"\nmixed folder as ONNX (accuracy_level 0) vs decompressed: logits max|d| {d:.2e}")
    assert d <= 1e-4


GGUF_MIXED = dict(  # Q4_0 by default, Q8_0 and Q4_1 by override, one Linear F32
    bits=4, group_size=32, symmetric=True, gguf_compatible=True, method="rtn",
    protect=[r"lm_head$", r"layers\.1\.mlp\.down_proj$"],
    overrides={r"layers\.0\.self_attn\.[qk]_proj$": {"bits": 8},
               r"layers\.1\.mlp\.(gate|up)_proj$": {"symmetric": False}},
)  # fmt: skip


def test_gguf_writes_each_linear_as_its_schemes_type(smollm2_slice, tmp_path):
    pytest.importorskip("gguf")
    from transformers import AutoModelForCausalLM

    from slimport.io import gguf as gguf_io

    folder = quantized(smollm2_slice, tmp_path / "q", **GGUF_MIXED)
    report = api.convert(folder, tmp_path / "gguf", to="gguf", progress=False)
    with gguf_io.read(tmp_path / "gguf/model.gguf") as ckpt:
        # 9 Q4_0 Linears, q/k of layer 0 Q8_0, layer 1's gate/up Q4_1; F32: the protected
        # down_proj, the embedding and 5 norms
        assert ckpt.metadata["gguf_types"] == {"Q4_0": 9, "Q8_0": 2, "Q4_1": 2, "F32": 7}
    notes = " ".join(report["notes"])
    assert "9 quantized Linear weight(s) written from their W4 g32 sym integers as 9 Q4_0" in notes
    assert "2 quantized Linear weight(s) written from their W8 g32 sym integers as 2 Q8_0" in notes
    # back to HF: every quantized Linear is exactly its integers' value, the float one as it was
    api.convert(tmp_path / "gguf", tmp_path / "back", to="hf", progress=False)
    back = load_file(tmp_path / "back/model.safetensors")
    with open_checkpoint(folder) as ckpt:
        assert len(ckpt.quantized) == 13
        for name, lin in ckpt.quantized.items():
            assert torch.equal(back[f"{name}.weight"], dequantize(*lin.read())), name
    source = load_file(smollm2_slice / "model.safetensors")
    down = f"{P}.1.mlp.down_proj.weight"
    assert torch.equal(back[down], source[down])
    # transformers' own GGUF loader computes the model compressed-tensors decompresses
    ref = decoded_by_the_library(folder, AutoModelForCausalLM.from_pretrained(smollm2_slice))
    got = AutoModelForCausalLM.from_pretrained(tmp_path / "gguf", gguf_file="model.gguf").eval()
    with torch.no_grad():
        d = (got(IDS).logits - ref(IDS).logits).abs().max().item()
    print(f"\nmixed Q4_0/Q8_0/Q4_1/F32 GGUF (transformers) vs decompressed: max|d| {d:.2e}")
    assert d <= 1e-5


# ---------------------------------------------------------------- bad input


def test_a_group_no_reader_computes_is_named_with_its_modules(mixed, tmp_path):
    import shutil

    folder = tmp_path / "w2"
    shutil.copytree(mixed, folder)
    config = json.loads((folder / "config.json").read_text())
    groups = config["quantization_config"]["config_groups"]
    key = next(k for k, g in groups.items() if f"{P}.0.self_attn.q_proj" in g["targets"])
    groups[key]["weights"]["num_bits"] = 2
    (folder / "config.json").write_text(json.dumps(config))
    for read in (load_quantized, lambda f: api.convert(f, tmp_path / "out", to="hf", progress=False)):  # fmt: skip
        with pytest.raises(SlimportError, match=rf"num_bits=2.*config group {key}: .*q_proj"):
            read(folder)


def test_a_linear_whose_scheme_fits_no_gguf_type_is_named(smollm2_slice, tmp_path):
    recipe = {**GGUF_MIXED, "gguf_compatible": False,
              "overrides": {r"layers\.1\.self_attn\.v_proj$": {"group_size": 16}}}  # fmt: skip
    folder = quantized(smollm2_slice, tmp_path / "q", **recipe)
    with pytest.raises(
        SlimportError,
        match=r"model\.layers\.1\.self_attn\.v_proj \(GGUF blk\.1\.attn_v\.weight\): the "
        r"quantization scheme W4 g16 sym .* fits no GGUF type",
    ):
        api.convert(folder, tmp_path / "gguf", to="gguf", progress=False)
    assert not (tmp_path / "gguf").exists()


def test_a_linear_whose_scheme_onnx_cannot_run_is_named(smollm2_slice, tmp_path):
    pytest.importorskip("onnx")
    from slimport.runtime.onnx import export_onnx

    recipe = {**MIXED, "overrides": {r"layers\.1\.self_attn\.v_proj$": {"group_size": 48}}}
    folder = quantized(smollm2_slice, tmp_path / "q", **recipe)
    with pytest.raises(
        SlimportError,
        match=r"model\.layers\.1\.self_attn\.v_proj \(W4 g48 asym\): group size 48: MatMulNBits",
    ):
        export_onnx(folder, tmp_path / "onnx", accuracy_level=0)
