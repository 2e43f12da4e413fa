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

import re
import zipfile
from collections.abc import Callable
from pathlib import Path

import h5py
import numpy as np
import torch

from slimport.errors import SlimportError, name_list
from slimport.io.base import Checkpoint, TensorInfo, atomic_path, release_freed_memory
from slimport.io.formats import FORMATS
from slimport.io.hf import copy_tokenizer, write_config

KERAS_ARCHIVE_WEIGHTS = "model.weights.h5"  # inside a Keras 3 .keras zip
H5_ERRORS = (OSError, RuntimeError, KeyError, ValueError, TypeError)
MAX_INFLATION = 1024  # declared bytes per stored byte a compressed dataset may claim
HDF5_OBJECT_HEADER_LIMIT = 64512  # Keras splits attributes larger than this into numbered chunks
KERAS_VERSION = "2.21.0"  # the tf_keras whose save_weights layout write_model reproduces
# optimizer slots and counters inside weight lists (Keras 2 optimizers name them like this)
OPTIMIZER_SLOT = re.compile(
    r"(^|/)(iter|iterations|learning_rate|lr|decay|beta_1|beta_2|epsilon|momentum|rho)(:\d+)?$"
    r"|/(m|v|vhat|velocity|momentum|accumulator|rms|mg)(:\d+)?$"
)
# Keras 3 top-level groups that hold training state, not model weights
KERAS3_STATE_GROUPS = (
    "optimizer",
    "metrics",
    "compile_metrics",
    "_compile_metrics",
    "_loss_tracker",
    "loss_tracker",
)
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
    f, close = _open(path)
    try:
        _refuse_external_links(f, path)
        datasets, skipped, layout = _layout(f, path)
        infos = {name: _info(ds, name, path) for name, ds in datasets.items()}
    except H5_ERRORS as e:  # h5py reports a damaged tree as any of these, from any call
        close()
        raise SlimportError(
            f"{path}: corrupt HDF5 structure ({_short(e)})",
            hint="the file is damaged; fetch it again",
        ) from None
    except Exception:
        close()
        raise
    if not infos:
        close()
        raise SlimportError(
            f"{path}: HDF5 file holds no weights"
            + (f" (only {name_list(skipped)})" if skipped else "")
        )

    def load(name: str) -> torch.Tensor:
        release_freed_memory()  # tensors the caller dropped since the last load
        ds = datasets[name]
        try:
            arr = np.asarray(ds[()])
        except H5_ERRORS as e:
            raise SlimportError(
                f"{path}: cannot read tensor {name!r} ({_short(e)}); the file is damaged"
            ) from None
        if _is_bf16(ds):
            return torch.from_numpy(arr.view(np.uint16).copy()).view(torch.bfloat16)
        if arr.dtype.byteorder == ">":
            arr = arr.astype(arr.dtype.newbyteorder("="))
        return torch.from_numpy(np.asarray(arr, order="C"))  # ascontiguousarray would make 0-d 1-d

    metadata = {k: _text(f.attrs[k]) for k in ("backend", "keras_version") if k in f.attrs}
    metadata["layout"] = layout
    return Checkpoint(
        path,
        "keras",
        infos,
        load,
        FORMATS["keras"].dialects,
        metadata=metadata,
        skipped=skipped,
        closer=close,
    )


def _open(path: Path) -> tuple[h5py.File, Callable[[], None]]:
    """The HDF5 file, or the model.weights.h5 inside a Keras 3 .keras zip (read in place, as Keras
    does), and how to close it."""
    try:
        if zipfile.is_zipfile(path):
            archive = zipfile.ZipFile(path)
            if KERAS_ARCHIVE_WEIGHTS not in archive.namelist():
                archive.close()
                raise SlimportError(
                    f"{path}: zip archive without {KERAS_ARCHIVE_WEIGHTS}, not a Keras 3 model"
                )
            member = archive.open(KERAS_ARCHIVE_WEIGHTS)
            f = h5py.File(member, "r")

            def close() -> None:
                f.close()
                member.close()
                archive.close()

            return f, close
        f = h5py.File(path, "r")
        return f, f.close
    except (OSError, zipfile.BadZipFile) as e:
        raise SlimportError(
            f"{path}: corrupt, truncated or not an HDF5 file ({_short(e)})",
            hint="the file is damaged or not Keras/TensorFlow weights; fetch it again",
        ) from None


def _layout(f: h5py.File, path: Path) -> tuple[dict[str, h5py.Dataset], list[str], str]:
    """{name: dataset} in Keras' own order, the skipped names, and which layout it was."""
    skipped: list[str] = []
    if "optimizer_weights" in f:
        skipped += _all_datasets(f["optimizer_weights"], "optimizer_weights/")
    model_weights = f.get("model_weights")
    if isinstance(model_weights, h5py.Group) and _has_attr(model_weights, "layer_names"):
        root, layout = model_weights, "keras2-model"
    elif _has_attr(f, "layer_names"):
        root, layout = f, "keras2-weights"
    else:  # Keras 3 .weights.h5 (layers/<name>/vars/<i>), or any plain HDF5 tree of datasets
        datasets = {}
        for name in _all_datasets(f, ""):
            top = name.split("/", 1)[0]
            if top in KERAS3_STATE_GROUPS:
                skipped.append(name)
            elif top != "optimizer_weights":  # listed in skipped above
                datasets[name] = f[name]
        return datasets, skipped, "keras3" if "layers" in f or "vars" in f else "hdf5"
    datasets = {}
    layers = _attr_list(root, "layer_names")
    # Keras >= 2.13 keeps weights owned by no layer in this group
    if isinstance(root.get("top_level_model_weights"), h5py.Group):
        layers.append("top_level_model_weights")
    for layer in layers:
        group = root.get(layer)
        if not isinstance(group, h5py.Group):
            raise SlimportError(
                f"{path}: layer {layer!r} is listed in layer_names but its group is missing (file is corrupt)"
            )
        for wname in _attr_list(group, "weight_names"):
            name = f"{layer}/{wname}"
            ds = group.get(wname)
            if not isinstance(ds, h5py.Dataset):
                raise SlimportError(
                    f"{path}: weight {name!r} is listed in weight_names but missing (file is corrupt)"
                )
            if OPTIMIZER_SLOT.search(wname):
                skipped.append(name)
            else:
                datasets[name] = ds
    return datasets, skipped, layout


def _all_datasets(group: h5py.Group, prefix: str) -> list[str]:
    names: list[str] = []
    group.visititems(
        lambda n, obj: names.append(prefix + n) if isinstance(obj, h5py.Dataset) else None
    )
    return names


def _has_attr(obj, name: str) -> bool:
    return name in obj.attrs or f"{name}0" in obj.attrs


def _attr_list(obj, name: str) -> list[str]:
    """A Keras string-list attribute, joined from its numbered chunks when it was split."""
    if name in obj.attrs:
        values = obj.attrs[name]
    else:
        values, i = [], 0
        while f"{name}{i}" in obj.attrs:
            values.extend(obj.attrs[f"{name}{i}"])
            i += 1
    return [_text(v) for v in np.atleast_1d(values)] if len(values) else []


def _text(v) -> str:
    return v.decode("utf8") if isinstance(v, bytes | np.bytes_) else str(v)


def _is_bf16(ds: h5py.Dataset) -> bool:
    return (
        ds.dtype.itemsize == 2
        and ds.dtype.kind == "V"
        and _text(ds.attrs.get("dtype", "")) == "bfloat16"
    )


def _refuse_external_links(f: h5py.File, path: Path) -> None:
    """An external link makes h5py open another file: nothing outside the checkpoint is read."""
    found: list[str] = []
    f.visititems_links(
        lambda n, link: found.append(n) if isinstance(link, h5py.ExternalLink) else None
    )
    if found:
        raise SlimportError(
            f"{path}: HDF5 entry {found[0]!r} is an external link to another file; refused",
            hint="a checkpoint must hold its own weights; re-save it without external links",
        )


def _check_storage(ds: h5py.Dataset, name: str, path: Path) -> None:
    """Data must live in this file and be there: external storage or a virtual dataset reads other
    files, and a never-written dataset declares any size for free (reading fills it in memory)."""
    if ds.external or ds.is_virtual:
        raise SlimportError(
            f"{path}: tensor {name!r} stores its data in another file "
            f"({'virtual dataset' if ds.is_virtual else 'external storage'}); refused",
            hint="a checkpoint must hold its own weights; re-save it with the data inside",
        )
    nbytes = ds.size * ds.dtype.itemsize
    stored = ds.id.get_storage_size()
    # compressed chunks may shrink data a lot, but not beyond MAX_INFLATION
    if nbytes and (
        stored == 0 or (ds.chunks is None and stored < nbytes) or nbytes > stored * MAX_INFLATION
    ):
        raise SlimportError(
            f"{path}: tensor {name!r} declares {nbytes} bytes ({list(ds.shape)}) but the file "
            f"stores {stored} for it",
            hint="the file is truncated or was written incompletely",
        )


def _info(ds: h5py.Dataset, name: str, path: Path) -> TensorInfo:
    _check_storage(ds, name, path)
    if _is_bf16(ds):
        return TensorInfo(tuple(ds.shape), torch.bfloat16)
    dtype = NUMPY_TO_TORCH.get(
        ds.dtype.newbyteorder("=") if ds.dtype.byteorder == ">" else ds.dtype
    )
    if dtype is None:
        raise SlimportError(
            f"{path}: tensor {name!r} has HDF5 type {ds.dtype}, which slimport cannot read"
        )
    return TensorInfo(tuple(ds.shape), dtype)


def _short(e: Exception) -> str:
    return " ".join(str(e).split())[:200]


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
