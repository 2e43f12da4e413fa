"""Arguments several commands share, and the help layout every command uses."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import textwrap
from collections.abc import Iterator

from slimport.io.formats import FORMATS

DEFAULT_PROMPT = "The quick brown fox jumps over the lazy dog. Once upon a time, there was"


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's default in its help line (unless the help says it in words: a None default
    means "derived", which only words explain); descriptions and epilogs keep their line breaks
    (examples, tables), long lines wrapped under their own indent."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        lines = []
        for line in text.splitlines():
            hang = " " * (len(line) - len(line.lstrip()))
            hang += " " * 9 if line.lstrip().startswith("example:") else ""
            lines.append(textwrap.fill(line, width, initial_indent=indent,
                                       subsequent_indent=indent + hang) or indent)  # fmt: skip
        return "\n".join(lines)

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        unset = action.default is None or action.default is False or action.default == []
        flag = isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction))
        if "default" in text or unset or flag or action.default == argparse.SUPPRESS:
            return text
        return super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    """`slimport CMD`'s parser: HelpFormatter unless the command picks another."""

    def __init__(self, *args, formatter_class=HelpFormatter, **kwargs):
        super().__init__(*args, formatter_class=formatter_class, **kwargs)


def common_options(sp) -> None:
    sp.add_argument("--from", dest="from_format", choices=tuple(FORMATS), metavar="FORMAT",
                    help="source format, one of: %(choices)s (default: detected from the suffix "
                    "and first bytes)")  # fmt: skip
    sp.add_argument("--config", help="config.json to use (default: the one beside the weights)")


def compute_dtype_option(sp) -> None:
    sp.add_argument("--compute-dtype", choices=("float32", "bfloat16"), default="float32",
                    help="torch compute: float32 (exact) or bfloat16 (the CPU int8/int4 kernels "
                    "for a quantized model)")  # fmt: skip


def overwrite_option(sp) -> None:
    sp.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a non-empty OUT whole (default: refuse it)",
    )


class DeprecatedAlias(argparse.Action):
    """An option's old spelling: stores into the same dest and says the new name once."""

    def __init__(self, *args, new: str, **kwargs):
        self.new = new
        super().__init__(*args, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        print(f"slimport: note: {option_string} is deprecated, use {self.new}", file=sys.stderr)
        setattr(namespace, self.dest, values)


@contextlib.contextmanager
def stdout_kept_for_json(enabled: bool = True) -> Iterator[None]:
    """While a --json command works, everything else written to stdout (a library's print, a
    progress bar, MindSpore's C++ logging on file descriptor 1) goes to stderr, so stdout
    carries the JSON alone."""
    if not enabled:
        yield
        return
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        os.dup2(2, 1)
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)
