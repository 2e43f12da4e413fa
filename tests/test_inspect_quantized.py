"""`inspect` on a quantized folder shows what is stored: the scheme, packed bytes and bits per
parameter, not the float model the folder computes."""

from __future__ import annotations

import json
from pathlib import Path

from slimport import api
from slimport.cli import main
from slimport.compress import api as quant_api


def test_a_w4_folder_reports_its_packed_bytes(minilm_dir, tmp_path, capsys):
    out = tmp_path / "w4"
    quant_api.quantize(minilm_dir, out, progress=False, bits=4, group_size=128, symmetric=False)
    info = api.inspect(out)
    q = info["quantization"]
    on_disk = sum(f.stat().st_size for f in Path(out).glob("*.safetensors"))
    assert q["scheme"] == "W4 g128 asym"
    assert q["quantized_linears"] == 37  # 6 layers x (q, k, v, o, up, down) + the pooler
    # int4 + one float32 scale and one int4 zero point per 128 weights: 4 + 0.25 + ~0.03 bits
    assert 4.2 <= q["bits_per_parameter"] <= 4.4
    assert abs(info["bytes"] - on_disk) <= 0.01 * on_disk  # headers aside, what the files hold
    float_view = 4 * info["parameter_count"]
    assert info["bytes"] < 0.6 * float_view  # embeddings stay float: half of MiniLM
    assert main(["inspect", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["quantization"]["packed_bytes"] == q["packed_bytes"]


def test_a_symmetric_folder_names_its_scheme_ignored_layers_and_stored_bytes(minilm_dir, tmp_path):
    from safetensors import safe_open

    out, kept = tmp_path / "w4sym", "encoder.layer.0.attention.self.query"
    quant_api.quantize(minilm_dir, out, progress=False, bits=4, group_size=64, symmetric=True,
                       protect=[kept])  # fmt: skip
    q = api.inspect(out)["quantization"]
    assert q["scheme"] == "W4 g64 sym" and kept in q["ignored"]
    assert q["quantized_linears"] == 36
    stored = 0  # what the file holds for the quantized Linears: integers, scales, shapes
    with safe_open(out / "model.safetensors", "pt") as st:
        for k in st.keys():  # noqa: SIM118
            if k.rpartition(".")[2] in ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape"):  # fmt: skip
                t = st.get_tensor(k)
                stored += t.numel() * t.element_size()
    assert abs(q["packed_bytes"] - stored) <= 0.001 * stored
    assert q["bits_per_parameter"] == round(8 * q["packed_bytes"] / q["quantized_parameters"], 3)
    assert 4.2 <= q["bits_per_parameter"] <= 4.6  # symmetric: no zero points


def test_a_gguf_file_reports_its_bytes_per_quantized_type(smollm2_gguf, capsys):
    import gguf

    reader = gguf.GGUFReader(smollm2_gguf)  # gguf-py's own reading of the file
    want: dict[str, int] = {}
    for t in reader.tensors:
        want[t.tensor_type.name] = want.get(t.tensor_type.name, 0) + int(t.n_bytes)
    info = api.inspect(smollm2_gguf)
    assert info["quantization"]["bytes_by_type"] == want
    assert info["bytes"] == sum(want.values()) < 100e6  # not the 538 MB of float32 it reads as
    assert info["dtypes"] == {"Q4_1": 210, "F32": 61, "Q8_0": 1}
    # Q4_1 is 5 bits a weight (a 16-bit scale and minimum per 32), Q8_0 8.5: between them
    assert 5.0 < info["quantization"]["bits_per_parameter"] < 6.0
    assert main(["inspect", str(smollm2_gguf), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["quantization"]["bytes_by_type"] == want
