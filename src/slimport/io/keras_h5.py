"""Keras / TensorFlow HDF5 weights: lazy reader (h5py datasets) and streaming writer.

Layouts read (names are the datasets' paths in the h5 tree):
* Keras 2 `save_weights` (what Hugging Face TF `save_pretrained` writes as tf_model.h5): root attrs
  `layer_names`, each layer group's attr `weight_names`, data at `<layer>/<weight name>`, e.g.
  `bert/tf_bert_model/bert/encoder/layer_._0/attention/self/query/kernel:0` (kernels `[in, out]`).
  Attributes too large for an HDF5 object header are split into `layer_names0`, `layer_names1`...
* Keras 2 `model.save(...h5)`: the same under a `model_weights` group, which is stripped from the
  names (so both Keras 2 layouts name a model alike); `optimizer_weights` is skipped.
* Keras 3 `.weights.h5`: `layers/<layer>/vars/<i>` (nested layers nest), `optimizer/vars/<i>`
  (skipped); bfloat16 is stored as 2-byte opaque data with attr dtype="bfloat16". A `.keras`
  archive is read through the model.weights.h5 inside it.
Optimizer slots (Adam `m`/`v`, `iter`, ...) and metric state are listed in `Checkpoint.skipped`.
"""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import torch

from slimport.errors import SlimportError
from slimport.io.base import Checkpoint, TensorInfo, atomic_path, release_freed_memory
from slimport.io.formats import FORMATS
from slimport.io.h5_meta import H5_ERRORS, open_h5, read_metadata, short
from slimport.io.hf import copy_tokenizer, write_config

HDF5_OBJECT_HEADER_LIMIT = 64512  # Keras splits attributes larger than this into numbered chunks
KERAS_VERSION = "2.21.0"  # the tf_keras whose save_weights layout write_model reproduces
NUMPY_TO_TORCH = {
    np.dtype("float64"): torch.float64,
    np.dtype("float32"): torch.float32,
    np.dtype("float16"): torch.float16,
    np.dtype("int64"): torch.int64,
    np.dtype("int32"): torch.int32,
    np.dtype("int16"): torch.int16,
    np.dtype("int8"): torch.int8,
    np.dtype("uint8"): torch.uint8,
    np.dtype("bool"): torch.bool,
}


def read(path: Path) -> Checkpoint:
    meta = read_metadata(path)  # in a child process: libhdf5 can hang on a corrupt header
    infos = {name: _info(dtype, bf16, shape, name, path) for name, _, shape, dtype, bf16 in meta["tensors"]}  # fmt: skip
    f, close = open_h5(path)
    try:  # the datasets the child listed and checked, opened by their h5 paths
        datasets = {name: f[h5] for name, h5, *_ in meta["tensors"]}
    except H5_ERRORS as e:
        close()
        raise SlimportError(f"{path}: corrupt HDF5 structure ({short(e)})") from None

    def load(name: str) -> torch.Tensor:
        release_freed_memory()  # tensors the caller dropped since the last load
        ds = datasets[name]
        try:
            arr = np.asarray(ds[()])
        except H5_ERRORS as e:
            raise SlimportError(
                f"{path}: cannot read tensor {name!r} ({short(e)}); the file is damaged"
            ) from None
        if infos[name].dtype == torch.bfloat16:  # numpy has none: Keras 3's 2-byte opaque
            return torch.from_numpy(arr.view(np.uint16).copy()).view(torch.bfloat16)
        if arr.dtype.byteorder == ">":
            arr = arr.astype(arr.dtype.newbyteorder("="))
        return torch.from_numpy(np.asarray(arr, order="C"))  # ascontiguousarray would make 0-d 1-d

    return Checkpoint(
        path,
        "keras",
        infos,
        load,
        FORMATS["keras"].dialects,
        metadata={**meta["metadata"], "layout": meta["layout"]},
        skipped=meta["skipped"],
        closer=close,
    )


def _info(dtype: str, bf16: bool, shape: list[int], name: str, path: Path) -> TensorInfo:
    if bf16:
        return TensorInfo(tuple(shape), torch.bfloat16)
    np_dtype = np.dtype(dtype)
    torch_dtype = NUMPY_TO_TORCH.get(
        np_dtype.newbyteorder("=") if np_dtype.byteorder == ">" else np_dtype
    )
    if torch_dtype is None:
        raise SlimportError(
            f"{path}: tensor {name!r} has HDF5 type {np_dtype}, which slimport cannot read"
        )
    return TensorInfo(tuple(shape), torch_dtype)


# ---------------------------------------------------------------------------------------- writing


def write_model(folder: Path, tensors: list, job, progress=None) -> list[str]:
    """tf_model.h5 (Hugging Face TF layout) + config.json (+ tokenizer files) into `folder`."""
    write(folder / "tf_model.h5", tensors, progress)
    write_config(folder, job)
    return ["tf_model.h5", "config.json", *copy_tokenizer(folder, job.source)]


def write(path: Path, tensors, progress=None) -> None:
    """Keras 2 save_weights layout; names are h5 paths `<layer>/<weight name>`. Streams, atomically.

    bfloat16 is stored the way Keras 3 stores it (2-byte opaque + attr dtype="bfloat16"): lossless
    and read back by Keras 3 and by slimport, though TF/Keras 2 `load_weights` cannot use it.
    """
    tensors = list(tensors)
    layers: dict[str, list[str]] = {}
    for t in tensors:
        layer, _, wname = t.name.partition("/")
        if not layer or not wname:
            raise SlimportError(
                f"tensor {t.name!r}: a Keras h5 name must be '<layer>/<weight name>'",
                hint="the keras dialect table of this family should produce h5 paths",
            )
        if t.dtype not in NUMPY_TO_TORCH.values() and t.dtype != torch.bfloat16:
            raise SlimportError(
                f"tensor {t.name!r}: dtype {t.dtype} cannot be stored in Keras h5",
                hint="pass --dtype float32",
            )
        layers.setdefault(layer, []).append(wname)
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        _string_attr(f, "backend", "tensorflow")
        _string_attr(f, "keras_version", KERAS_VERSION)
        _save_attributes(f, "layer_names", list(layers))
        for layer, wnames in layers.items():
            _save_attributes(f.create_group(layer), "weight_names", wnames)
        # written by tf_keras >= 2.13 save_weights even when empty, as in the reference file
        f.create_group("top_level_model_weights").attrs["weight_names"] = np.array(
            [], dtype=np.float64
        )
        for t in tensors:
            _write_one(f, t)
            release_freed_memory()
            if progress:
                progress(t.dtype.itemsize * int(np.prod(t.shape, dtype=np.int64)))


def _write_one(f: h5py.File, t) -> None:
    value = t.compute()
    if tuple(value.shape) != tuple(t.shape) or value.dtype != t.dtype:
        raise SlimportError(
            f"tensor {t.name!r}: planned {list(t.shape)} {t.dtype}, got {list(value.shape)} {value.dtype}"
        )
    value = value.contiguous()
    if value.dtype == torch.bfloat16:
        arr = value.view(torch.int16).numpy().view(np.dtype("V2"))
    else:
        arr = value.numpy()
    try:
        ds = f.create_dataset(t.name, shape=arr.shape, dtype=arr.dtype)
    except ValueError as e:  # h5py: a name is both a weight and a group of another weight
        raise SlimportError(f"tensor {t.name!r}: cannot be stored at this h5 path ({e})") from None
    if value.dtype == torch.bfloat16:
        ds.attrs["dtype"] = "bfloat16"
    if arr.size:
        ds[()] = arr


def _string_attr(obj, name: str, value: str) -> None:
    # variable-length ASCII strings, like the attributes tf_keras writes
    obj.attrs.create(name, value, dtype=h5py.string_dtype("ascii" if value.isascii() else "utf-8"))


def _save_attributes(obj, name: str, values: list[str]) -> None:
    """Keras' save_attributes_to_hdf5_group: split lists whose fixed-width size exceeds the limit."""
    encoded = [v.encode("utf8") for v in values]
    ascii_only = all(v.isascii() for v in values)
    dtype = h5py.string_dtype("ascii" if ascii_only else "utf-8")
    width = max((len(v) for v in encoded), default=1)
    chunks = 1
    while -(-len(encoded) // chunks) * width > HDF5_OBJECT_HEADER_LIMIT:
        chunks += 1
    if chunks == 1:
        obj.attrs.create(name, np.array(values, dtype=object), dtype=dtype)
        return
    for i, part in enumerate(np.array_split(np.array(values, dtype=object), chunks)):
        obj.attrs.create(f"{name}{i}", part, dtype=dtype)
