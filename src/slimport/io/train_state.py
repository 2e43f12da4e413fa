"""The bookkeeping file of a training checkpoint folder (trainer.json), shared by the torch and
MindSpore trainers: which runtime wrote it, the step, and a fingerprint of the model."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from slimport.errors import SlimportError

META = "trainer.json"


def fingerprint(shapes: dict[str, tuple[int, ...]]) -> str:
    """A short hash of every parameter's name and shape: another model gets another one."""
    blob = json.dumps(sorted((name, list(shape)) for name, shape in shapes.items()))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def write_meta(folder: Path, meta: dict) -> None:
    (folder / META).write_text(json.dumps(meta, indent=2) + "\n")


def read_meta(folder: Path, runtime: str, state: str, model: str) -> dict:
    """trainer.json of a checkpoint folder, checked to come from `runtime` and the model with
    fingerprint `model`."""
    if not (folder / META).is_file() or not (folder / state).is_file():
        raise SlimportError(f"{folder}: not a training checkpoint (no {META} / {state})")
    meta = json.loads((folder / META).read_text())
    if meta.get("runtime") != runtime:
        raise SlimportError(
            f"{folder}: a checkpoint of a {meta.get('runtime')} run; this run is {runtime}",
            hint="resume with the runtime that wrote it",
        )
    if meta.get("model") != model:
        raise SlimportError(
            f"{folder}: a checkpoint of another model or trainable set (fingerprint "
            f"{meta.get('model')}, this run {model})",
            hint="resume with the model, LoRA targets and settings the checkpoint was trained with",
        )
    return meta
