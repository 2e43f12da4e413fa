"""The format registry: one row per checkpoint format, the one place that says which files a
format claims, which module reads and writes it and which naming dialects its files hold.

It feeds format detection, `open_checkpoint`, the `--to` targets of `convert` and the CLI's
choices. It imports nothing heavy (no torch), so the CLI can build its parser from it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from slimport.errors import SlimportError


@dataclass(frozen=True)
class Format:
    name: str  # Checkpoint.format, --from FORMAT
    reader: str  # module with read(path) -> Checkpoint
    suffixes: tuple[str, ...]  # file name endings it claims (lower case)
    dialects: tuple[str, ...]  # naming dialects its files can hold, most likely first
    writer: str | None = None  # module with write_model(folder, tensors, job, progress)
    writes: tuple[str, ...] = ()  # the dialects its writer lays out: each is a --to target
    # module with export(src, out, **options) -> report: a --to target named for the format whose
    # files are graphs built from the model's family, not a tensor layout. It lives in the runtime
    # layer (the graph builders run there), so only slimport.api, above it, imports it.
    exporter: str | None = None
    # a test on the file's first bytes, for a suffix two formats share; None: the suffix decides
    magic: Callable[[bytes], bool] | None = None


def _not_zip_or_pickle(head: bytes) -> bool:
    return head[:2] != b"PK" and head[:1] != b"\x80"


# Detection tries the rows in order: llama2.c's headerless .bin is told from torch's zip/pickle
# .bin by content, so it comes first; the writers' rows give the --to targets in this order.
FORMATS: dict[str, Format] = {
    f.name: f
    for f in (
        Format("safetensors", "slimport.io.safetensors", (".safetensors", ".safetensors.index.json"),
               ("hf",), writer="slimport.io.hf", writes=("hf",)),
        Format("llama2c", "slimport.io.llama2c", (".bin",), ("llama2c",), magic=_not_zip_or_pickle),
        Format("pytorch", "slimport.io.torch_pickle", (".bin", ".pt", ".pth", ".index.json"), ("hf",)),
        Format("mindspore", "slimport.io.mindspore_ckpt", (".ckpt",), ("mindspore", "mindformers"),
               writer="slimport.io.mindspore_ckpt", writes=("mindspore", "mindformers")),
        Format("keras", "slimport.io.keras_h5", (".h5", ".keras"), ("keras",),
               writer="slimport.io.keras_h5", writes=("keras",)),
        Format("gguf", "slimport.io.gguf", (".gguf",), ("gguf",),
               writer="slimport.io.gguf_writer", writes=("gguf",)),
        Format("onnx", "slimport.io.onnx", (".onnx",), ("hf",),
               exporter="slimport.runtime.onnx.export"),
    )
}  # fmt: skip

# --to target -> (dialect, writer module); a target is named for the dialect it writes
TARGETS: dict[str, tuple[str, str]] = {
    d: (d, f.writer) for f in FORMATS.values() if f.writer for d in f.writes
}

# --to target -> exporter module (graphs, see Format.exporter); a target is named for its format
EXPORTS: dict[str, str] = {f.name: f.exporter for f in FORMATS.values() if f.exporter}
TO_CHOICES = (*TARGETS, *EXPORTS)  # every --to target, layouts first

# writer options with a fixed set of values (CLI choices; the writers check them too)
CAST_DTYPES = ("float32", "float16", "bfloat16")  # --dtype
GGUF_TYPES = ("f32", "f16", "q8_0", "q4_0", "q4_1")  # --gguf-type: tensor type of 2-D GGUF weights

# The GGUF types that hold a weight-only quantization scheme's integers exactly (io.gguf_blocks),
# by (bits, symmetric), the default first, for groups of whole 32-value blocks (or per channel).
# 8-bit asymmetric values q - zero span up to 511 steps, more than Q8_0's int8 holds.
GGUF_BLOCK = 32
GGUF_FITS: dict[tuple[int, bool], tuple[str, ...]] = {
    (8, True): ("q8_0",),
    (4, True): ("q4_0", "q4_1", "q8_0"),
    (4, False): ("q4_1", "q8_0"),
    (3, True): ("q4_0", "q4_1", "q8_0"),
    (3, False): ("q4_1", "q8_0"),
}
GGUF_LAYOUTS = "W8 sym -> q8_0; W4/W3 sym -> q4_0, q4_1, q8_0; W4/W3 asym -> q4_1, q8_0"


def scheme_fits(bits: int, symmetric: bool, granularity: str, group_size: int | None) -> bool:
    """Whether a GGUF block type holds this weight scheme (given rows of whole blocks)."""
    whole = granularity != "group" or bool(group_size) and group_size % GGUF_BLOCK == 0
    return whole and (bits, symmetric) in GGUF_FITS


# What to open when SRC is a folder, most preferred first: the names transformers and the
# writers give, then a lone file of one kind (`*.bin` late: training_args.bin is no model).
FOLDER_FILES = (
    "model.safetensors.index.json",
    "model.safetensors",
    "pytorch_model.bin.index.json",
    "pytorch_model.bin",
    "tf_model.h5",
    "model.ckpt",
    "model.gguf",
    "model.onnx",
    "*.safetensors",
    "*.gguf",
    "*.ckpt",
    "*.h5",
    "*.bin",
    "*.onnx",
)


def resolve_path(path: str | Path) -> Path:
    """The weights file for a file or an HF-style folder."""
    from slimport.io.base import regular_file  # torch: not for the CLI's choices lists

    p = Path(path)
    if not p.exists():  # a model name or Hub id (the CLI resolved those already)
        from slimport.io.locate import resolve_model

        p = resolve_model(path)
    if not p.is_dir():
        return regular_file(p)  # a FIFO would block the first read forever
    for name in FOLDER_FILES:
        if "*" not in name:
            if (p / name).exists():
                return regular_file(p / name)
        elif len(found := sorted(p.glob(name))) == 1:
            return regular_file(found[0])
    raise SlimportError(f"{p}: folder holds no checkpoint file slimport recognises")


def detect_format(path: Path) -> str:
    """The format of a weights file, from its name (and first bytes where a suffix is shared)."""
    name = path.name.lower()
    head = None
    for f in FORMATS.values():
        if not name.endswith(f.suffixes):
            continue
        if f.magic is None:
            return f.name
        if head is None:
            with open(path, "rb") as fh:
                head = fh.read(4)
        if f.magic(head):
            return f.name
    raise SlimportError(
        f"{path}: unknown checkpoint format (suffix {path.suffix!r})",
        hint="pass --from FORMAT, one of: " + ", ".join(FORMATS),
    )


def get(name: str) -> Format:
    """The registry row of a --from format name."""
    if name not in FORMATS:
        raise SlimportError(f"unknown --from format {name!r}", hint="one of: " + ", ".join(FORMATS))
    return FORMATS[name]
