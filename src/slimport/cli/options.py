"""Arguments several commands share."""

from __future__ import annotations

DEFAULT_PROMPT = "The quick brown fox jumps over the lazy dog. Once upon a time, there was"


def common_options(sp) -> None:
    sp.add_argument("--from", dest="from_format", help="source format when the suffix is ambiguous")
    sp.add_argument("--config", help="config.json to use instead of the one beside the weights")


def compute_dtype_option(sp) -> None:
    sp.add_argument("--compute-dtype", choices=("float32", "bfloat16"), default="float32",
                    help="torch compute: float32 (exact) or bfloat16 (the CPU int8/int4 kernels "
                    "for a quantized model)")  # fmt: skip


def overwrite_option(sp) -> None:
    sp.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT whole")
