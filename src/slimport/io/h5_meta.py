"""The metadata of a Keras / TensorFlow HDF5 file, read in a child process with a time limit.

A corrupt attribute or object header can make libhdf5 loop forever (a fuzzed string attribute
of tf_model.h5 did) or crash, and a loop inside the C library holds the GIL: no Python timeout or
signal handler can end it. So the walk over the file's tree (layer lists, datasets, storage
checks) runs in a child process forked from a server process that imports only this module
(h5py, numpy), and sends back what it found; the parent opens only the datasets it listed. The child
may use SLIMPORT_H5_TIMEOUT seconds of CPU (default 5; MiniLM's tf_model.h5 takes ~0.1 s):
counted by the kernel (RLIMIT_CPU), so a busy machine does not fail a good file, and a
wall-clock bound of 6x that ends a child that blocks instead.

Layouts (names are the datasets' paths in the h5 tree): Keras 2 `save_weights` (root attrs
`layer_names`, each layer group's `weight_names`; split into `layer_names0`, `layer_names1`...
when too large for an object header), Keras 2 `model.save` (the same under `model_weights`,
stripped from the names), Keras 3 `.weights.h5` (`layers/<layer>/vars/<i>`; bfloat16 as 2-byte
opaque data with attr dtype="bfloat16"), a `.keras` zip's model.weights.h5.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import json
import math
import os
import re
import resource
import select
import signal
import subprocess
import sys
import threading
import time
import zipfile
from collections.abc import Callable
from pathlib import Path

import h5py
import numpy as np

from slimport.errors import SlimportError, name_list

KERAS_ARCHIVE_WEIGHTS = "model.weights.h5"  # inside a Keras 3 .keras zip
H5_ERRORS = (OSError, RuntimeError, KeyError, ValueError, TypeError)
MAX_INFLATION = 1024  # declared bytes per stored byte a compressed dataset may claim
TIMEOUT_S = 5.0
CHILD_MEMORY = 2 << 30  # address space of the child: a lying header cannot take the machine
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


def read_metadata(path: Path) -> dict:
    """{"tensors": [[name, h5 path, shape, numpy dtype str, is bf16]], "skipped", "layout",
    "metadata"} of an HDF5 weights file, from a child process (see the module docstring)."""
    timeout = float(os.environ.get("SLIMPORT_H5_TIMEOUT", TIMEOUT_S))
    cpu = max(1, math.ceil(timeout))
    reply = _server().ask({"path": str(path), "cpu": cpu, "wall": 6 * timeout})
    sig = reply.get("signal")
    if reply.get("timed_out") or sig in (signal.SIGXCPU, signal.SIGKILL):
        raise SlimportError(
            f"{path}: reading the HDF5 metadata did not finish in {timeout:g} s (a corrupt "
            "attribute or header makes libhdf5 loop)",
            hint="the file is damaged; fetch it again (for a huge file, raise "
            "SLIMPORT_H5_TIMEOUT=SECONDS)",
        )
    answer = reply.get("answer")
    if answer is None:
        raise SlimportError(
            f"{path}: libhdf5 crashed reading the file's metadata (signal {sig})",
            hint="the file is damaged; fetch it again",
        )
    if "error" in answer:
        raise SlimportError(answer["error"], hint=answer.get("hint"))
    return answer


class _Server:
    """`python -m slimport.io.h5_meta`: a process that imported h5py once (a fresh interpreter
    per file costs 0.3 s of CPU) and forks one child per file. Never a fork of this process:
    its threads (torch's) would not be copied, and a lock one of them held would stay held."""

    def __init__(self) -> None:
        root = str(Path(__file__).resolve().parents[2])  # this slimport, whatever is installed
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]),
        }
        env |= {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}  # no thread pools to fork
        self.p = subprocess.Popen([sys.executable, "-m", __name__], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env,
                                  text=True)  # fmt: skip
        self.lock = threading.Lock()
        atexit.register(self.close)

    def ask(self, request: dict) -> dict:
        with self.lock:
            try:
                self.p.stdin.write(json.dumps(request) + "\n")
                self.p.stdin.flush()
                line = self.p.stdout.readline()
            except OSError:
                line = ""
        if not line:
            _server.cache_clear()
            raise SlimportError(f"{request['path']}: the HDF5 metadata reader process failed")
        return json.loads(line)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.p.stdin.close()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.p.wait(timeout=5)


@functools.cache
def _server() -> _Server:
    return _Server()


def serve() -> None:
    """The server's loop: per request line, fork a child bounded by the kernel (CPU time,
    address space, no core dump) that walks the file, kill it past the wall-clock bound, and
    answer one line: {"answer", "signal", "timed_out"}."""
    for line in sys.stdin:
        req = json.loads(line)
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child
            os.close(r)
            code = 0
            try:
                resource.setrlimit(resource.RLIMIT_CPU, (req["cpu"], req["cpu"] + 1))
                resource.setrlimit(resource.RLIMIT_AS, (CHILD_MEMORY, CHILD_MEMORY))
                resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # SIGXCPU would dump a core
                try:
                    answer = probe(Path(req["path"]))
                except SlimportError as e:
                    answer = {"error": e.message, "hint": e.hint}
                except Exception as e:  # noqa: BLE001 - any failure is the file's: one error
                    answer = {"error": f"{req['path']}: cannot read the HDF5 metadata ({short(e)})"}
                with os.fdopen(w, "w") as f:
                    f.write(json.dumps(answer))
            except BaseException:
                code = 1
            finally:
                os._exit(code)
        os.close(w)
        data, timed_out, deadline = b"", False, time.monotonic() + req["wall"]
        while True:
            ready = select.select([r], [], [], max(0.0, deadline - time.monotonic()))[0]
            if not ready:
                os.kill(pid, signal.SIGKILL)  # blocked rather than spinning
                timed_out = True
                break
            chunk = os.read(r, 1 << 16)
            if not chunk:
                break
            data += chunk
        os.close(r)
        _, status = os.waitpid(pid, 0)
        sig = os.WTERMSIG(status) if os.WIFSIGNALED(status) else None
        ok = data and sig is None and os.WEXITSTATUS(status) == 0
        reply = {"answer": json.loads(data) if ok else None, "signal": sig, "timed_out": timed_out}
        print(json.dumps(reply), flush=True)


def probe(path: Path) -> dict:
    """The walk itself (run in the child): every weight dataset, checked, and what was skipped."""
    f, close = open_h5(path)
    try:
        _refuse_external_links(f, path)
        datasets, skipped, layout = _layout(f, path)
        tensors = []
        for name, ds in datasets.items():
            _check_storage(ds, name, path)
            tensors.append([name, ds.name, list(ds.shape), ds.dtype.str, _is_bf16(ds)])
        metadata = {k: _text(f.attrs[k]) for k in ("backend", "keras_version") if k in f.attrs}
    except H5_ERRORS as e:  # h5py reports a damaged tree as any of these, from any call
        raise SlimportError(
            f"{path}: corrupt HDF5 structure ({short(e)})",
            hint="the file is damaged; fetch it again",
        ) from None
    finally:
        close()
    if not tensors:
        raise SlimportError(
            f"{path}: HDF5 file holds no weights"
            + (f" (only {name_list(skipped)})" if skipped else "")
        )
    return {"tensors": tensors, "skipped": skipped, "layout": layout, "metadata": metadata}


def open_h5(path: Path) -> tuple[h5py.File, Callable[[], None]]:
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
            f"{path}: corrupt, truncated or not an HDF5 file ({short(e)})",
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


def short(e: Exception) -> str:
    return " ".join(str(e).split())[:200]


if __name__ == "__main__":
    serve()
