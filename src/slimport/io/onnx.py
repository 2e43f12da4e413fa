"""ONNX models: the graph initializers as named tensors, read lazily.

`onnx.load(load_external_data=False)` parses the graph without touching external data files;
tensors stored inside the .onnx are decoded one at a time (`numpy_helper.to_array`) and external
ones are read straight from their data file with one positioned read each. Integer constants the
PyTorch exporter creates (`onnx::Reshape_12` shapes and the like) are not weights: they go to
`skipped`. A graph `torch.onnx.export` wrote has anonymous Linear weights: they are named after
the module that uses them and presented in hub layout `[out, in]` (see io/onnx_graph.py), and the
config the graph implies goes to `metadata["inferred_config"]` for arch to complete.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, numpy_helper
from onnx.external_data_helper import ExternalDataInfo, uses_external_data

from slimport.errors import SlimportError
from slimport.io.base import Checkpoint, TensorInfo, release_freed_memory
from slimport.io.formats import FORMATS
from slimport.io.onnx_graph import Graph, Role, is_anonymous, roles
from slimport.io.onnx_graph import config as graph_config

_SMALL = 256  # initializers up to this many elements are decoded for the graph analysis

DTYPES = {
    TensorProto.FLOAT: torch.float32,
    TensorProto.FLOAT16: torch.float16,
    TensorProto.BFLOAT16: torch.bfloat16,
    TensorProto.DOUBLE: torch.float64,
    TensorProto.INT8: torch.int8,
    TensorProto.UINT8: torch.uint8,
    TensorProto.INT16: torch.int16,
    TensorProto.UINT16: torch.uint16,
    TensorProto.INT32: torch.int32,
    TensorProto.UINT32: torch.uint32,
    TensorProto.INT64: torch.int64,
    TensorProto.UINT64: torch.uint64,
    TensorProto.BOOL: torch.bool,
    TensorProto.FLOAT8E4M3FN: torch.float8_e4m3fn,
    TensorProto.FLOAT8E5M2: torch.float8_e5m2,
}
_INTEGER = {d for d in DTYPES.values() if not d.is_floating_point}  # bool included


def read(path: Path) -> Checkpoint:
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # protobuf DecodeError and friends
        raise SlimportError(
            f"{path}: corrupt, truncated or not an ONNX model ({' '.join(str(e).split())[:200] or type(e).__name__})",
            hint="the file is damaged; export or fetch it again",
        ) from None
    infos, protos, skipped = {}, {}, []
    for t in model.graph.initializer:
        if t.data_type not in DTYPES:
            raise SlimportError(
                f"{path}: initializer {t.name!r} has ONNX type "
                f"{TensorProto.DataType.Name(t.data_type)}, which slimport cannot read"
            )
        dtype, shape = DTYPES[t.data_type], tuple(t.dims)
        if t.name.startswith("onnx::") and dtype in _INTEGER:
            skipped.append(t.name)
            continue
        if uses_external_data(t):
            _check_external(path, t, dtype, shape)
        infos[t.name] = TensorInfo(shape, dtype)
        protos[t.name] = t
    skipped += [s.values.name for s in model.graph.sparse_initializer]
    graph = named = None
    if any(is_anonymous(n) and i.dtype.is_floating_point for n, i in infos.items()):
        graph = Graph(model.graph, _small_constants(model))  # an exporter's graph: ask it
        named = _graph_names(graph, infos)
    tensors = infos  # what the checkpoint presents: HF names in hub layout when `named`
    if named is not None:
        skipped += [n for n in infos if n not in {r.source for r in named.values()}]
        tensors = {hf: _hub_info(infos[r.source], r) for hf, r in named.items()}
    if not tensors:
        raise SlimportError(f"{path}: ONNX model has no initializers (weights)")
    metadata = {
        "producer": f"{model.producer_name} {model.producer_version}".strip(),
        "opset": {o.domain or "ai.onnx": o.version for o in model.opset_import},
        **{p.key: p.value for p in model.metadata_props},
    }
    if named is not None:
        metadata["inferred_config"] = graph_config(graph, {n: i.shape for n, i in tensors.items()})
        metadata["graph_named"] = sorted(hf for hf, r in named.items() if is_anonymous(r.source))
        metadata["graph_transposed"] = sorted(hf for hf, r in named.items() if r.transposed)

    def load(name: str) -> torch.Tensor:
        if named is None:
            return load_initializer(name)
        role = named[name]
        t = load_initializer(role.source)
        return t.t().contiguous() if role.transposed else t  # exporter's [in, out] -> [out, in]

    def load_initializer(name: str) -> torch.Tensor:
        release_freed_memory()  # tensors the caller dropped since the last load
        t, info = protos[name], infos[name]
        if uses_external_data(t):
            return _read_external(path, t, info)
        try:
            arr = numpy_helper.to_array(t)
        except Exception as e:
            raise SlimportError(f"{path}: cannot decode initializer {name!r} ({e})") from None
        if arr.dtype.kind == "V" or arr.dtype.name in ("bfloat16", "float8_e4m3fn", "float8_e5m2"):
            # ml_dtypes arrays: reinterpret the bits, torch has the same formats
            arr = arr.view(f"u{arr.dtype.itemsize}")
        return torch.from_numpy(np.array(arr, copy=True)).view(info.dtype).reshape(info.shape)

    if named is not None and (tied := _tied_copy(named, tensors, load)) is not None:
        # the exporter wrote the tied output projection as a transposed copy of the embedding
        skipped.append(named.pop(tied).source)
        del tensors[tied]
        metadata["inferred_config"]["tie_word_embeddings"] = True
        metadata["graph_named"].remove(tied)
        metadata["graph_transposed"].remove(tied)
        metadata["graph_tied"] = tied

    return Checkpoint(
        path, "onnx", tensors, load, FORMATS["onnx"].dialects, metadata=metadata, skipped=skipped
    )


def _graph_names(graph: Graph, infos: dict[str, TensorInfo]) -> dict[str, Role] | None:
    """HF name -> initializer, when the graph tells the role of its anonymous weights; None when
    it does not (no module scopes on the nodes): the initializers are then read as named."""
    found = roles(graph)
    found = {hf: r for hf, r in found.items() if r.source in infos}
    if not any(is_anonymous(r.source) for r in found.values()):
        return None
    # module buffers no node claims under their own name (inv_freq) stay as they are; dotless
    # names are the dynamo exporter's folded values (`expand`, `new_ones`), not module tensors
    for n in infos:
        if not is_anonymous(n) and "." in n and n not in found:
            found[n] = Role(n, False)
    return found


def _tied_copy(named: dict[str, Role], tensors: dict[str, TensorInfo], load) -> str | None:
    """The anonymous transposed weight that equals an embedding table, bit for bit (a tied
    `lm_head`): TorchScript and dynamo both store `embedding.T` as a constant of its own."""
    tables = [n for n, r in named.items() if not r.transposed and len(tensors[n].shape) == 2]
    for hf, r in named.items():
        if not (r.transposed and is_anonymous(r.source)):
            continue
        for table in (t for t in tables if tensors[t] == tensors[hf]):
            if torch.equal(load(hf), load(table)):
                return hf
    return None


def _hub_info(info: TensorInfo, role: Role) -> TensorInfo:
    return TensorInfo(info.shape[::-1], info.dtype) if role.transposed else info


def _small_constants(model) -> dict[str, np.ndarray]:
    out = {}
    for t in model.graph.initializer:
        if not uses_external_data(t) and int(np.prod(t.dims, dtype=np.int64)) <= _SMALL:
            try:
                out[t.name] = numpy_helper.to_array(t)
            except Exception:  # an undecodable constant only hides what it would have told
                continue
    return out


def _external(path: Path, t: TensorProto) -> tuple[Path, int, int | None]:
    info = ExternalDataInfo(t)
    loc = Path(info.location)
    # the ONNX spec allows only relative paths inside the model's folder
    if loc.is_absolute() or ".." in loc.parts:
        raise SlimportError(
            f"{path}: initializer {t.name!r} points outside the model folder ({info.location})"
        )
    return path.parent / loc, int(info.offset or 0), (int(info.length) if info.length else None)


def _check_external(path: Path, t: TensorProto, dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    data, offset, length = _external(path, t)
    need = dtype.itemsize * int(np.prod(shape, dtype=np.int64))
    if length is not None and length != need:
        raise SlimportError(
            f"{path}: initializer {t.name!r} declares {length} bytes of external data, shape needs {need}"
        )
    if not data.is_file():
        raise SlimportError(
            f"{path}: external data file {data.name} of initializer {t.name!r} is missing",
            hint="keep the .onnx file and its data file(s) in the same folder",
        )
    if offset + need > data.stat().st_size:
        raise SlimportError(
            f"{data}: truncated ONNX external data: initializer {t.name!r} ends at byte {offset + need}, "
            f"file has {data.stat().st_size}",
            hint="copy the data file again",
        )


def _read_external(path: Path, t: TensorProto, info: TensorInfo) -> torch.Tensor:
    data, offset, _ = _external(path, t)
    out = torch.empty(info.shape, dtype=info.dtype)
    if out.numel():
        buf = out.reshape(-1).view(torch.uint8).numpy()
        fd = os.open(data, os.O_RDONLY)
        try:
            got = os.preadv(fd, [buf], offset)
        finally:
            os.close(fd)
        if got != buf.nbytes:
            raise SlimportError(
                f"{data}: could not read initializer {t.name!r} (file changed or truncated)"
            )
    return out
