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
