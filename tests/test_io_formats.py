"""PyTorch pickles, Keras h5, MindSpore .ckpt and ONNX: round trips bit-exact, readers lazy,
writers streaming, and every damaged or unsafe file refused with an error naming it."""

from __future__ import annotations

import json
import os
import pickle
import shlex
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import h5py
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from slimport import api
from slimport.convert.engine import Planned
from slimport.errors import SlimportError
from slimport.io import keras_h5, mindspore_ckpt, open_checkpoint
from slimport.io import onnx as onnx_io


def sample_tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "embed.weight": torch.randn(40, 8, generator=g),
        "layer.0.fc.weight": torch.randn(8, 8, generator=g).half(),
        "layer.0.fc.bias": torch.randn(8, generator=g).to(torch.bfloat16),
        "layer.0.norm.weight": torch.randn(8, generator=g, dtype=torch.float64),
        "counts": torch.arange(6, dtype=torch.int64).reshape(2, 3),
        "scale": torch.tensor(0.125),
    }


def planned(tensors: dict[str, torch.Tensor]) -> list[Planned]:
    return [
        Planned(n, tuple(t.shape), t.dtype, (n,), (), (lambda t=t: t)) for n, t in tensors.items()
    ]


def fake_job(config: dict | None = None) -> SimpleNamespace:
    source = SimpleNamespace(tokenizer_files=[], tokenizer_writer=None)
    return SimpleNamespace(config=config or {"model_type": "bert"}, dtype=None, source=source)


def assert_same(ckpt, tensors: dict[str, torch.Tensor]) -> None:
    assert list(ckpt.infos) == list(tensors)
    for name, t in tensors.items():
        assert ckpt.infos[name].shape == tuple(t.shape) and ckpt.infos[name].dtype == t.dtype, name
        got = ckpt.load(name)
        assert got.dtype == t.dtype and torch.equal(got, t), name


def poke(path: Path, old: torch.Tensor, new: torch.Tensor) -> None:
    """Overwrite a tensor's bytes in place: a lazy reader opened before sees the new values."""
    raw_old = old.contiguous().view(torch.uint8).numpy().tobytes()
    data = path.read_bytes()
    offset = data.find(raw_old)
    assert offset >= 0 and data.find(raw_old, offset + 1) < 0, "tensor bytes must occur once"
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(new.contiguous().view(torch.uint8).numpy().tobytes())


def truncate(src: Path, dst: Path, fraction: float = 0.5) -> Path:
    data = src.read_bytes()
    dst.write_bytes(data[: int(len(data) * fraction)])
    return dst


def refused(path: Path, *needles: str, reader=None) -> str:
    with pytest.raises(SlimportError) as e:
        reader(path) if reader else open_checkpoint(path)
    message = str(e.value)
    assert str(path) in message, message
    for needle in needles:
        assert needle in message, message
    return message


# --------------------------------------------------------------------------- PyTorch pickles


class CodePayload:
    """Unpickling this runs a shell command that creates `marker`."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {shlex.quote(str(self.marker))}",))


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_torch_pickle_round_trip_is_bit_exact(tmp_path, zip_format):
    tensors = sample_tensors()
    path = tmp_path / "model.pt"
    torch.save(tensors, path, _use_new_zipfile_serialization=zip_format)
    with open_checkpoint(path) as ckpt:
        assert ckpt.format == "pytorch" and ckpt.dialects == ("hf",)
        assert ckpt.metadata["pickle"] == ("zip" if zip_format else "legacy")
        assert_same(ckpt, tensors)
        loaded = ckpt.load("embed.weight")
        loaded += (
            1  # a loaded tensor is the caller's own: changing it changes nothing in the reader
        )
        assert torch.equal(ckpt.load("embed.weight"), tensors["embed.weight"])


def test_torch_zip_is_read_lazily_through_mmap(tmp_path):
    tensors = sample_tensors()
    path = tmp_path / "model.pt"
    torch.save(tensors, path)
    with open_checkpoint(path) as ckpt:
        replacement = torch.full_like(tensors["embed.weight"], 7.0)
        poke(path, tensors["embed.weight"], replacement)  # after opening, before loading
        assert torch.equal(ckpt.load("embed.weight"), replacement)


def test_torch_nested_state_dict_is_unwrapped_and_non_tensors_skipped(tmp_path):
    tensors = sample_tensors()
    path = tmp_path / "checkpoint.pth"
    inner = {**tensors, "global_step": 1200}
    torch.save({"state_dict": inner, "optimizer": {"lr": 0.1}, "epoch": 3}, path)
    with open_checkpoint(path) as ckpt:
        assert_same(ckpt, tensors)
        assert sorted(ckpt.skipped) == ["epoch", "global_step", "optimizer"]
    torch.save({"model": tensors, "step": 5}, path)
    with open_checkpoint(path) as ckpt:
        assert list(ckpt.infos) == list(tensors) and ckpt.skipped == ["step"]


@pytest.mark.parametrize("kind", ["zip", "legacy", "plain-pickle"])
def test_torch_pickle_with_code_is_refused_and_never_run(tmp_path, kind):
    # the payload really runs when unpickled normally: proof the test can fail
    control = tmp_path / "control-marker"
    pickle.loads(pickle.dumps(CodePayload(control)))
    assert control.exists()

    marker = tmp_path / "pwned-marker"
    path = tmp_path / "pytorch_model.bin"
    obj = {"weight": torch.zeros(2), "payload": CodePayload(marker)}
    if kind == "plain-pickle":
        path.write_bytes(pickle.dumps(obj, protocol=2))
    else:
        torch.save(obj, path, _use_new_zipfile_serialization=kind == "zip")
    message = refused(path, "contains code", "weights_only loading refused it")
    assert "Traceback" not in message
    assert not marker.exists(), "the pickled payload was executed"
    with pytest.raises(SlimportError):
        api.inspect(path)
    assert not marker.exists()


def test_torch_pickle_of_a_custom_class_is_refused(tmp_path):
    path = tmp_path / "model.pt"
    torch.save({"weight": torch.zeros(2), "args": SimpleNamespace(lr=0.1)}, path)
    refused(path, "contains code", "weights_only")


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_torch_truncated_pickle_is_refused(tmp_path, zip_format):
    full = tmp_path / "full.pt"
    torch.save(sample_tensors(), full, _use_new_zipfile_serialization=zip_format)
    refused(truncate(full, tmp_path / "model.pt"), "corrupt or truncated PyTorch checkpoint")


def test_torch_sharded_index(tmp_path):
    tensors = sample_tensors()
    names = list(tensors)
    shards = {
        "pytorch_model-00001-of-00002.bin": names[:3],
        "pytorch_model-00002-of-00002.bin": names[3:],
    }
    for i, (shard, members) in enumerate(shards.items()):
        torch.save(
            {n: tensors[n] for n in members},
            tmp_path / shard,
            _use_new_zipfile_serialization=i == 0,
        )
    index = tmp_path / "pytorch_model.bin.index.json"
    index.write_text(json.dumps({"weight_map": {n: s for s, ms in shards.items() for n in ms}}))
    with open_checkpoint(tmp_path) as ckpt:  # the folder resolves to the index
        assert ckpt.path == index
        for name, t in tensors.items():
            assert torch.equal(ckpt.load(name), t) and ckpt.load(name).dtype == t.dtype
    (tmp_path / "pytorch_model-00002-of-00002.bin").unlink()
    refused(index, "shard pytorch_model-00002-of-00002.bin is missing")


def test_torch_real_minilm_inspect(tmp_path, minilm_dir):
    tensors = load_file(minilm_dir / "model.safetensors")
    torch.save(tensors, tmp_path / "pytorch_model.bin")
    shutil.copy(minilm_dir / "config.json", tmp_path / "config.json")
    info = api.inspect(tmp_path)
    assert info["format"] == "pytorch" and info["family"] == "bert"
    assert info["tensor_count"] == len(tensors)
    assert info["parameter_count"] == sum(t.numel() for t in tensors.values())
    with open_checkpoint(tmp_path) as ckpt:
        name = "embeddings.word_embeddings.weight"
        assert torch.equal(ckpt.load(name), tensors[name])


# --------------------------------------------------------------------------- Keras h5


def test_keras_reads_the_real_minilm_tf_checkpoint(minilm_tf):
    with open_checkpoint(minilm_tf / "tf_model.h5") as ckpt:
        assert ckpt.format == "keras" and ckpt.dialects == ("keras",)
        assert len(ckpt.infos) == 103 and ckpt.skipped == []
        prefix = "bert/tf_bert_model/bert/"
        shapes = {
            "embeddings/word_embeddings/weight:0": (30522, 384),
            "embeddings/position_embeddings/embeddings:0": (512, 384),
            "embeddings/token_type_embeddings/embeddings:0": (2, 384),
            "encoder/layer_._0/attention/self/query/kernel:0": (384, 384),
            "encoder/layer_._5/intermediate/dense/kernel:0": (384, 1536),
            "encoder/layer_._5/output/dense/kernel:0": (1536, 384),
            "pooler/dense/kernel:0": (384, 384),
            "pooler/dense/bias:0": (384,),
        }
        for name, shape in shapes.items():
            assert ckpt.infos[prefix + name].shape == shape, name
            assert ckpt.infos[prefix + name].dtype == torch.float32
        assert ckpt.config["model_type"] == "bert"  # config.json beside it
        kernel = ckpt.load(prefix + "pooler/dense/kernel:0")
        with h5py.File(minilm_tf / "tf_model.h5", "r") as f:
            assert np.array_equal(kernel.numpy(), f[prefix + "pooler/dense/kernel:0"][()])
    info = api.inspect(minilm_tf / "tf_model.h5")
    assert (info["format"], info["tensor_count"], info["family"], info["dialect"]) == (
        "keras",
        103,
        "bert",
        "keras",
    )
    assert info["parameter_count"] == 22_713_216


def test_keras_writer_reproduces_the_real_file(tmp_path, minilm_tf):
    src = open_checkpoint(minilm_tf / "tf_model.h5")
    plan = [
        Planned(n, i.shape, i.dtype, (n,), (), (lambda n=n: src.load(n)))
        for n, i in src.infos.items()
    ]
    files = keras_h5.write_model(tmp_path, plan, fake_job(src.config))
    assert files == ["tf_model.h5", "config.json"]
    assert json.loads((tmp_path / "config.json").read_text()) == src.config
    with open_checkpoint(tmp_path / "tf_model.h5") as out:
        assert list(out.infos) == list(src.infos)
        for name in src.infos:
            assert torch.equal(out.load(name), src.load(name)), name
    src.close()
    # same HF TF layout: root attrs, layer list, per-layer weight lists, string types
    with (
        h5py.File(minilm_tf / "tf_model.h5", "r") as a,
        h5py.File(tmp_path / "tf_model.h5", "r") as b,
    ):
        assert sorted(a.attrs) == sorted(b.attrs)
        for key in a.attrs:
            assert np.array_equal(a.attrs[key], b.attrs[key]), key
            ta, tb = a.attrs.get_id(key).get_type(), b.attrs.get_id(key).get_type()
            assert (ta.get_cset(), ta.is_variable_str()) == (tb.get_cset(), tb.is_variable_str()), (
                key
            )
        assert sorted(a) == sorted(b)
        assert list(a["bert"].attrs["weight_names"]) == list(b["bert"].attrs["weight_names"])
        assert len(b["top_level_model_weights"].attrs["weight_names"]) == 0


def test_keras_round_trip_fp16_bf16_and_lazy(tmp_path):
    tensors = {
        f"layer_{i}/block/{n.replace('.', '_')}:0": t
        for i, (n, t) in enumerate(sample_tensors().items())
    }
    path = tmp_path / "tf_model.h5"
    keras_h5.write(path, planned(tensors))
    with open_checkpoint(path) as ckpt:
        assert_same(ckpt, tensors)
    with open_checkpoint(path) as ckpt:
        first = next(iter(tensors))
        replacement = torch.full_like(tensors[first], -3.0)
        poke(path, tensors[first], replacement)  # after opening: datasets are read only when asked
        assert torch.equal(ckpt.load(first), replacement)


def test_keras_long_weight_lists_are_chunked_like_keras(tmp_path):
    names = [
        f"big/{'x' * 90}/w{i}:0" for i in range(1000)
    ]  # ~90 KB of names: over the 64 KB header limit
    tensors = {n: torch.full((1,), float(i)) for i, n in enumerate(names)}
    keras_h5.write(tmp_path / "w.h5", planned(tensors))
    with h5py.File(tmp_path / "w.h5", "r") as f:
        assert "weight_names" not in f["big"].attrs and "weight_names0" in f["big"].attrs
    with open_checkpoint(tmp_path / "w.h5") as ckpt:
        assert list(ckpt.infos) == names and torch.equal(ckpt.load(names[-1]), tensors[names[-1]])


def _string_list(values: list[str]) -> np.ndarray:
    return np.array([v.encode() for v in values])  # tf_keras writes lists of utf-8 bytes


def test_keras2_model_save_layout_with_optimizer(tmp_path):
    """model.save("x.h5"): weights under model_weights/, Adam state under optimizer_weights/."""
    g = torch.Generator().manual_seed(1)
    kernel, bias = torch.randn(4, 3, generator=g), torch.randn(3, generator=g)
    path = tmp_path / "model.h5"
    with h5py.File(path, "w") as f:
        f.attrs["keras_version"] = b"2.15.0"
        f.attrs["backend"] = b"tensorflow"
        f.attrs["model_config"] = json.dumps({"class_name": "Sequential"}).encode()
        mw = f.create_group("model_weights")
        mw.attrs["layer_names"] = _string_list(["input_1", "dense"])
        mw.create_group("input_1").attrs["weight_names"] = np.array([], dtype=np.float64)
        dense = mw.create_group("dense")
        dense.attrs["weight_names"] = _string_list(["dense/kernel:0", "dense/bias:0"])
        dense["dense/kernel:0"] = kernel.numpy()
        dense["dense/bias:0"] = bias.numpy()
        opt = f.create_group("optimizer_weights")
        slots = ["Adam/iter:0", "Adam/dense/kernel/m:0", "Adam/dense/kernel/v:0"]
        opt.attrs["weight_names"] = _string_list(slots)
        opt["Adam/iter:0"] = np.int64(10)
        opt["Adam/dense/kernel/m:0"] = np.zeros((4, 3), np.float32)
        opt["Adam/dense/kernel/v:0"] = np.zeros((4, 3), np.float32)
    with open_checkpoint(path) as ckpt:
        assert_same(ckpt, {"dense/dense/kernel:0": kernel, "dense/dense/bias:0": bias})
        assert sorted(ckpt.skipped) == sorted(f"optimizer_weights/{s}" for s in slots)
        assert ckpt.metadata["layout"] == "keras2-model"
    info = api.inspect(path)
    assert info["tensor_count"] == 2 and len(info["skipped"]) == 3


def test_keras2_optimizer_slots_inside_layer_lists_are_skipped(tmp_path):
    path = tmp_path / "weights.h5"
    with h5py.File(path, "w") as f:
        f.attrs["layer_names"] = _string_list(["dense"])
        d = f.create_group("dense")
        names = ["dense/kernel:0", "training/Adam/dense/kernel/m:0", "training/Adam/iter:0"]
        d.attrs["weight_names"] = _string_list(names)
        for n in names:
            d[n] = np.ones((2, 2), np.float32)
    with open_checkpoint(path) as ckpt:
        assert list(ckpt.infos) == ["dense/dense/kernel:0"]
        assert ckpt.skipped == [
            "dense/training/Adam/dense/kernel/m:0",
            "dense/training/Adam/iter:0",
        ]


def test_keras3_weights_h5_layout_with_bf16(tmp_path):
    """Keras 3 save_weights: layers/<layer>/vars/<i>; bf16 as 2-byte opaque + attr dtype."""
    import ml_dtypes

    g = torch.Generator().manual_seed(2)
    kernel, bias = torch.randn(4, 3, generator=g), torch.randn(3, generator=g).to(torch.bfloat16)
    path = tmp_path / "model.weights.h5"
    with h5py.File(path, "w") as f:
        f.create_group("vars")
        v = f.create_group("layers").create_group("dense").create_group("vars")
        v["0"] = kernel.numpy()
        # Keras 3 writes bf16 through ml_dtypes: h5py stores it as 2-byte opaque data
        ds = v.create_dataset("1", data=bias.float().numpy().astype(ml_dtypes.bfloat16))
        ds.attrs["dtype"] = "bfloat16"
        o = f.create_group("optimizer").create_group("vars")
        o["0"] = np.int64(3)
        o["1"] = np.zeros((4, 3), np.float32)
    with open_checkpoint(path) as ckpt:
        assert_same(ckpt, {"layers/dense/vars/0": kernel, "layers/dense/vars/1": bias})
        assert sorted(ckpt.skipped) == ["optimizer/vars/0", "optimizer/vars/1"]
        assert ckpt.metadata["layout"] == "keras3"


def test_keras3_dot_keras_archive_is_read_through_its_weights_file(tmp_path):
    import zipfile

    kernel = torch.randn(5, 2, generator=torch.Generator().manual_seed(3))
    weights = tmp_path / "model.weights.h5"
    with h5py.File(weights, "w") as f:
        f.create_group("layers").create_group("dense").create_group("vars")["0"] = kernel.numpy()
    with zipfile.ZipFile(tmp_path / "model.keras", "w") as z:  # what keras.saving.save_model writes
        z.writestr("metadata.json", json.dumps({"keras_version": "3.8.0"}))
        z.writestr("config.json", json.dumps({"class_name": "Sequential"}))
        z.write(weights, "model.weights.h5")
    with open_checkpoint(tmp_path / "model.keras") as ckpt:
        assert_same(ckpt, {"layers/dense/vars/0": kernel})


def test_keras_damaged_files_are_refused(tmp_path, minilm_tf):
    refused(
        truncate(minilm_tf / "tf_model.h5", tmp_path / "tf_model.h5"),
        "corrupt, truncated or not an HDF5 file",
    )
    (tmp_path / "junk.h5").write_bytes(os.urandom(4096))
    refused(tmp_path / "junk.h5", "not an HDF5 file")


# --------------------------------------------------------------------------- MindSpore .ckpt


def ms_tensor(t: torch.Tensor):
    import mindspore as ms

    if (
        t.dtype == torch.bfloat16
    ):  # mindspore 2.10 cannot take bf16 numpy arrays here: cast in MindSpore
        return ms.Tensor(t.float().numpy()).astype(ms.bfloat16)
    return ms.Tensor(t.numpy())


def ms_to_torch(p, dtype: torch.dtype) -> torch.Tensor:
    if dtype == torch.bfloat16:  # Parameter.asnumpy() refuses bf16; bf16 -> fp32 -> bf16 is exact
        return torch.from_numpy(p.float().asnumpy()).to(torch.bfloat16)
    return torch.from_numpy(p.asnumpy())


def test_mindspore_writer_matches_save_checkpoint_byte_for_byte(tmp_path):
    import mindspore as ms

    tensors = sample_tensors()
    files = mindspore_ckpt.write_model(tmp_path, planned(tensors), fake_job())
    assert files == ["model.ckpt", "config.json"]
    ms.save_checkpoint(
        [{"name": n, "data": ms_tensor(t)} for n, t in tensors.items()], str(tmp_path / "ms.ckpt")
    )
    assert (tmp_path / "model.ckpt").read_bytes() == (tmp_path / "ms.ckpt").read_bytes()
    loaded = ms.load_checkpoint(str(tmp_path / "model.ckpt"))
    assert list(loaded) == list(tensors)
    for name, t in tensors.items():
        assert torch.equal(ms_to_torch(loaded[name], t.dtype), t), name
    assert (
        str(loaded["layer.0.fc.bias"].dtype) == "BFloat16"
        and str(loaded["layer.0.fc.weight"].dtype) == "Float16"
    )


def test_mindspore_large_tensors_are_written_in_slices_mindspore_joins(tmp_path, monkeypatch):
    import mindspore as ms

    # every tensor above 100 bytes is sliced
    monkeypatch.setattr(mindspore_ckpt, "SLICE_BYTES", 100)
    tensors = sample_tensors()
    mindspore_ckpt.write(tmp_path / "model.ckpt", planned(tensors))
    assert (tmp_path / "model.ckpt").read_bytes().count(b"embed.weight") == 40 * 8 * 4 // 100 + 1
    loaded = ms.load_checkpoint(str(tmp_path / "model.ckpt"))
    for name, t in tensors.items():
        assert torch.equal(ms_to_torch(loaded[name], t.dtype), t), name
    with open_checkpoint(tmp_path / "model.ckpt") as ckpt:
        assert_same(ckpt, tensors)


def test_mindspore_reads_save_checkpoint_files_lazily(tmp_path):
    import mindspore as ms

    tensors = sample_tensors()
    path = tmp_path / "net.ckpt"
    ms.save_checkpoint(
        [{"name": n, "data": ms_tensor(t)} for n, t in tensors.items()], str(path),
        crc_check=True, append_dict={"epoch_num": 3, "arch": "bert"},
    )  # fmt: skip
    with open_checkpoint(path) as ckpt:
        assert ckpt.format == "mindspore" and ckpt.dialects == ("mindspore", "mindformers")
        assert_same(ckpt, tensors)
        assert ckpt.skipped == ["epoch_num", "arch"] and ckpt.metadata["arch"] == "bert"
    mindspore_ckpt.write(path, planned(tensors))  # no crc trailer: pokes stay undetected
    with open_checkpoint(path) as ckpt:
        replacement = torch.full_like(tensors["embed.weight"], 5.0)
        poke(path, tensors["embed.weight"], replacement)
        assert torch.equal(ckpt.load("embed.weight"), replacement)


def test_mindspore_training_state_is_skipped(tmp_path):
    tensors = {
        "dense.weight": torch.ones(2, 2),
        "moment1.dense.weight": torch.zeros(2, 2),
        "global_step": torch.tensor([7]),
    }
    mindspore_ckpt.write(tmp_path / "train.ckpt", planned(tensors))
    with open_checkpoint(tmp_path / "train.ckpt") as ckpt:
        assert list(ckpt.infos) == ["dense.weight"]
        assert ckpt.skipped == ["moment1.dense.weight", "global_step"]


def test_mindspore_real_minilm_round_trip_and_inspect(tmp_path, minilm_dir):
    import mindspore as ms

    tensors = load_file(minilm_dir / "model.safetensors")
    config = json.loads((minilm_dir / "config.json").read_text())
    mindspore_ckpt.write_model(tmp_path, planned(tensors), fake_job(config))
    with open_checkpoint(tmp_path / "model.ckpt") as ckpt:
        assert ckpt.config == config
        assert_same(ckpt, tensors)
    loaded = ms.load_checkpoint(str(tmp_path / "model.ckpt"))
    name = "embeddings.word_embeddings.weight"
    assert torch.equal(torch.from_numpy(loaded[name].asnumpy()), tensors[name])
    info = api.inspect(tmp_path / "model.ckpt")
    assert (
        info["format"] == "mindspore"
        and info["tensor_count"] == len(tensors)
        and info["family"] == "bert"
    )


def test_mindspore_damaged_files_are_refused(tmp_path):
    tensors = sample_tensors()
    good = tmp_path / "good.ckpt"
    mindspore_ckpt.write(good, planned(tensors))
    refused(truncate(good, tmp_path / "cut.ckpt", 0.6), "corrupt or truncated MindSpore checkpoint")
    (tmp_path / "junk.ckpt").write_bytes(os.urandom(2048))
    refused(tmp_path / "junk.ckpt", "MindSpore checkpoint")
    (tmp_path / "empty.ckpt").write_bytes(b"")
    refused(tmp_path / "empty.ckpt", "empty file")
    import mindspore as ms

    crc = tmp_path / "crc.ckpt"
    ms.save_checkpoint(
        [{"name": n, "data": ms_tensor(t)} for n, t in tensors.items()], str(crc), crc_check=True
    )
    poke(crc, tensors["embed.weight"], torch.zeros_like(tensors["embed.weight"]))
    refused(crc, "CRC check failed")


def test_mindspore_unsupported_dtype_is_refused_before_writing(tmp_path):
    t = torch.zeros(2, dtype=torch.complex64)
    with pytest.raises(SlimportError, match="'w'.*cannot be stored in a MindSpore checkpoint"):
        mindspore_ckpt.write(tmp_path / "m.ckpt", planned({"w": t}))
    assert not list(tmp_path.iterdir()), "no partial output"


MEMORY_PROBE = textwrap.dedent(
    """
    import sys, torch
    from pathlib import Path
    from slimport.convert.engine import Planned
    from slimport.io import {module} as fmt

    def status(key):
        return int(next(l for l in open("/proc/self/status") if l.startswith(key)).split()[1]) * 1024

    path, n, shape = Path(sys.argv[1]), 16, (2048, 2048)  # 16 x 16 MiB = 256 MiB
    plan = [Planned(f"{prefix}w{{i}}{suffix}", shape, torch.float32, (), (), (lambda i=i: torch.full(shape, float(i))))
            for i in range(n)]
    if sys.argv[2] == "read":
        fmt.write(path, plan)
    open("/proc/self/clear_refs", "w").write("5")  # reset the kernel's peak-RSS mark (VmHWM)
    base = status("VmRSS")
    if sys.argv[2] == "write":
        fmt.write(path, plan)
    else:
        ckpt = fmt.read(path)
        for i, name in enumerate(ckpt.infos):
            assert ckpt.load(name)[-1, -1].item() == float(i)
        ckpt.close()
    print((status("VmHWM") - base) / 2**20)
    """
)


@pytest.mark.skipif(
    not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc peak-RSS reset"
)
@pytest.mark.parametrize(
    "module,prefix,suffix,mode",
    [
        ("mindspore_ckpt", "", "", "write"),
        ("mindspore_ckpt", "", "", "read"),
        ("keras_h5", "layer/", ":0", "write"),
        ("keras_h5", "layer/", ":0", "read"),
    ],
)
def test_streaming_peak_memory_is_about_one_tensor(tmp_path, module, prefix, suffix, mode):
    """256 MiB through the writer / reader: peak RSS grows by about one 16 MiB tensor, not the model."""
    code = MEMORY_PROBE.format(module=module, prefix=prefix, suffix=suffix)
    out = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "m.bin"), mode],
        capture_output=True,
        text=True,
        check=True,
    )
    peak_mib = float(out.stdout.split()[-1])
    assert peak_mib < 64, f"{module} {mode}: peak RSS +{peak_mib:.0f} MiB for 256 MiB of tensors"


# --------------------------------------------------------------------------- ONNX


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A small torch model exported to ONNX by torch itself."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(6, 16), torch.nn.LayerNorm(16), torch.nn.GELU(), torch.nn.Linear(16, 4)
    )
    path = tmp_path_factory.mktemp("onnx") / "model.onnx"
    torch.onnx.export(
        model, (torch.randn(2, 6),), str(path), dynamo=False, input_names=["x"], output_names=["y"]
    )
    return path, model.state_dict()


def test_onnx_initializers_of_an_exported_model(exported):
    path, state = exported
    with open_checkpoint(path) as ckpt:
        assert ckpt.format == "onnx" and ckpt.dialects == ("hf",)
        assert_same(ckpt, dict(state))
        assert ckpt.metadata["producer"].startswith("pytorch")
    info = api.inspect(path)
    assert info["format"] == "onnx" and info["tensor_count"] == len(state)


def test_onnx_external_data_is_read_lazily(tmp_path, exported):
    import onnx

    path, state = exported
    model = onnx.load(str(path))
    out = tmp_path / "model.onnx"
    onnx.save_model(
        model, str(out), save_as_external_data=True, location="model.onnx.data", size_threshold=0
    )
    assert out.stat().st_size < 2000  # the weights really live in the data file
    with open_checkpoint(out) as ckpt:
        assert_same(ckpt, dict(state))
        replacement = torch.full_like(state["0.weight"], 2.5)
        poke(tmp_path / "model.onnx.data", state["0.weight"], replacement)
        assert torch.equal(ckpt.load("0.weight"), replacement)
    truncate(tmp_path / "model.onnx.data", tmp_path / "cut.data", 0.5).replace(
        tmp_path / "model.onnx.data"
    )
    refused(out, "truncated ONNX external data", reader=onnx_io.read)
    (tmp_path / "model.onnx.data").unlink()
    refused(out, "external data file model.onnx.data", "is missing", reader=onnx_io.read)


def test_onnx_fp16_bf16_initializers_and_exporter_constants(tmp_path):
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    tensors = sample_tensors()
    inits = []
    for name, t in tensors.items():
        if t.dtype == torch.bfloat16:
            proto = helper.make_tensor(
                name,
                TensorProto.BFLOAT16,
                list(t.shape),
                t.view(torch.int16).numpy().tobytes(),
                raw=True,
            )
        else:
            proto = numpy_helper.from_array(t.numpy(), name)
        inits.append(proto)
    inits.append(numpy_helper.from_array(np.array([1, -1], np.int64), "onnx::Reshape_7"))
    # fp16 in the typed int32_data field (not raw bytes), as some exporters write it
    half = torch.tensor([1.5, -2.25], dtype=torch.float16)
    typed = helper.make_tensor("typed_half", TensorProto.FLOAT16, [2], half.tolist())
    assert (
        not typed.raw_data
        and list(typed.int32_data) == half.view(torch.int16).numpy().astype(np.uint16).tolist()
    )
    inits.append(typed)
    onnx.save_model(
        helper.make_model(helper.make_graph([], "g", [], [], initializer=inits)),
        str(tmp_path / "m.onnx"),
    )
    with open_checkpoint(tmp_path / "m.onnx") as ckpt:
        assert ckpt.skipped == ["onnx::Reshape_7"]
        assert_same(ckpt, {**tensors, "typed_half": half})


def test_onnx_damaged_file_is_refused(tmp_path, exported):
    path, _ = exported
    refused(truncate(path, tmp_path / "model.onnx"), "corrupt, truncated or not an ONNX model")
