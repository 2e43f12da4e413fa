"""Model folders are sharded by size as transformers' save_pretrained does (`max_shard_size`,
"5GB" by default): one model.safetensors for small models, numbered shards + an index beyond."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from slimport import api
from slimport.cli import main
from slimport.compress import api as quant_api
from slimport.errors import SlimportError

W4 = dict(bits=4, group_size=128, symmetric=False)


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(f, "pt") as st:
            out.update({k: st.get_tensor(k) for k in st.keys()})  # noqa: SIM118
    return out


def shard_sizes(folder: Path) -> list[list[int]]:
    """Per shard, in order, the byte size of each tensor in the order the file stores them."""
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    sizes = []
    for name in sorted(set(index["weight_map"].values())):
        with open(folder / name, "rb") as f:
            header = json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))
        header.pop("__metadata__", None)
        spans = sorted(e["data_offsets"] for e in header.values())
        sizes.append([end - begin for begin, end in spans])
    return sizes


def assert_sharded_by_size(folder: Path, limit: int) -> int:
    """transformers' rule: a shard stays under the limit unless it holds one tensor, and a shard
    was closed only because the next tensor would not fit. Returns the shard count."""
    sizes = shard_sizes(folder)
    assert len(sizes) > 1
    for shard, after in zip(sizes, [*sizes[1:], None], strict=True):
        assert sum(shard) <= limit or len(shard) == 1
        if after is not None:
            assert sum(shard) + after[0] > limit
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == sum(map(sum, sizes))
    return len(sizes)


@pytest.fixture(scope="module")
def w4_one_file(minilm_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("w4") / "default"
    quant_api.quantize(minilm_dir, out, progress=False, **W4)
    return out


def test_a_small_quantized_model_is_one_file_without_an_index(w4_one_file):
    names = sorted(p.name for p in w4_one_file.iterdir())
    assert [n for n in names if "safetensors" in n] == ["model.safetensors"]
    assert not any(p.is_dir() for p in w4_one_file.iterdir())  # the block parts are gone


def test_a_quantized_model_shards_by_size_and_reads_back_equal(minilm_dir, w4_one_file, tmp_path):
    out = tmp_path / "20MB"
    report = quant_api.quantize(minilm_dir, out, progress=False, max_shard_size="20MB", **W4)
    n = assert_sharded_by_size(out, 20 * 10**6)
    assert n == len(list(out.glob("model-*-of-*.safetensors")))
    assert all(p.name.endswith(f"-of-{n:05d}.safetensors") for p in out.glob("model-*"))
    assert not (out / "model.safetensors").exists()
    one, many = tensors(w4_one_file), tensors(out)
    assert one.keys() == many.keys()
    assert all(torch.equal(one[k], many[k]) for k in one)
    assert report["bytes_after"] >= sum(v.numel() * v.element_size() for v in many.values())
    # the quantized folder reads back through the index as the same float model
    a, b = api.inspect(w4_one_file), api.inspect(out)
    assert a["quantization"] == b["quantization"] and a["tensor_count"] == b["tensor_count"]


def test_a_float_conversion_shards_by_size(minilm_dir, tmp_path):
    out = tmp_path / "hf"
    assert (
        main(
            [
                "convert",
                str(minilm_dir),
                str(out),
                "--to",
                "hf",
                "--max-shard-size",
                "30MB",
                "--quiet",
            ]
        )
        == 0
    )
    assert assert_sharded_by_size(out, 30 * 10**6) >= 2
    src = tensors(minilm_dir)
    del src["embeddings.position_ids"]  # a buffer, not a weight: conversions leave it out
    got = tensors(out)
    assert src.keys() == got.keys() and all(torch.equal(src[k], got[k]) for k in src)


def test_a_bad_shard_size_is_refused_before_any_work(minilm_dir, tmp_path):
    with pytest.raises(SlimportError, match="max_shard_size 'lots' is not a size"):
        quant_api.quantize(minilm_dir, tmp_path / "q", progress=False, max_shard_size="lots", **W4)
    assert not (tmp_path / "q").exists()
    code = main(
        [
            "quantize",
            str(minilm_dir),
            str(tmp_path / "q"),
            "--bits",
            "4",
            "--max-shard-size",
            "lots",
        ]
    )
    assert code == 3 and not (tmp_path / "q").exists()  # the command line says it the same way
