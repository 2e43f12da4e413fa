"""The format registry (slimport.io.formats) is the one table of formats: every row's reader and
writer exist, detection follows its suffixes and content tests, and what a reader returns
carries the dialects the row declares."""

from __future__ import annotations

import importlib
import struct

import pytest
import torch
from safetensors.torch import save_file

from slimport import api, cli
from slimport.errors import SlimportError
from slimport.io import formats, open_checkpoint


@pytest.mark.parametrize("fmt", list(formats.FORMATS.values()), ids=lambda f: f.name)
def test_each_row_names_modules_that_read_and_write(fmt):
    assert callable(importlib.import_module(fmt.reader).read)
    if fmt.writer is not None:
        assert callable(importlib.import_module(fmt.writer).write_model)
        assert set(fmt.writes) <= set(fmt.dialects)  # what it writes it can read back


@pytest.mark.parametrize(
    ("name", "head", "expected"),
    [
        ("model.safetensors", b"", "safetensors"),
        ("model.safetensors.index.json", b"{}", "safetensors"),
        ("pytorch_model.bin.index.json", b"{}", "pytorch"),
        ("pytorch_model.bin", b"PK\x03\x04", "pytorch"),  # torch zip
        ("old.bin", b"\x80\x02", "pytorch"),  # legacy pickle
        ("stories260K.bin", struct.pack("<7i", 64, 172, 5, 8, 4, 512, 512), "llama2c"),
        ("weights.PTH", b"PK", "pytorch"),
        ("tf_model.h5", b"", "keras"),
        ("model.keras", b"", "keras"),
        ("model.gguf", b"GGUF", "gguf"),
        ("model.ckpt", b"", "mindspore"),
        ("model.onnx", b"", "onnx"),
    ],
)
def test_detection_by_suffix_then_content(tmp_path, name, head, expected):
    (tmp_path / name).write_bytes(head)
    assert formats.detect_format(tmp_path / name) == expected


def test_unknown_suffix_names_the_formats(tmp_path):
    (tmp_path / "model.npz").write_bytes(b"")
    with pytest.raises(SlimportError, match="unknown checkpoint format") as e:
        formats.detect_format(tmp_path / "model.npz")
    assert all(name in e.value.hint for name in formats.FORMATS)


def test_folder_prefers_canonical_names_then_a_lone_file(tmp_path):
    (tmp_path / "pytorch_model.bin").write_bytes(b"PK")
    (tmp_path / "tf_model.h5").write_bytes(b"")
    assert formats.resolve_path(tmp_path).name == "pytorch_model.bin"
    other = tmp_path / "other"
    other.mkdir()
    (other / "smollm2.gguf").write_bytes(b"GGUF")
    (other / "training_args.bin").write_bytes(b"PK")
    assert formats.resolve_path(other).name == "smollm2.gguf"


def test_reader_dialects_are_the_rows(tmp_path):
    save_file({"w": torch.zeros(2)}, tmp_path / "model.safetensors")
    with open_checkpoint(tmp_path / "model.safetensors") as ckpt:
        assert ckpt.dialects == formats.FORMATS["safetensors"].dialects == ("hf",)


def test_convert_targets_and_cli_choices_come_from_the_registry():
    writers = {d for f in formats.FORMATS.values() for d in f.writes}
    assert set(api.TARGETS) == writers == {"hf", "mindspore", "mindformers", "keras", "gguf"}
    convert = next(
        a
        for a in cli.build_parser()._subparsers._group_actions[0].choices.values()
        if a.prog.endswith("convert")
    )
    to = next(a for a in convert._actions if a.dest == "to")
    assert list(to.choices) == [*api.TARGETS, *api.EXPORTS]
    exporters = {f.name: f.exporter for f in formats.FORMATS.values() if f.exporter}
    assert api.EXPORTS == exporters == {"onnx": "slimport.runtime.onnx.export"}
    assert all(callable(importlib.import_module(m).export) for m in exporters.values())
