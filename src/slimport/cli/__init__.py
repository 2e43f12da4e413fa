"""`slimport` command line: a thin shell over slimport's Python API. Each module of this package
registers its commands (`register(sub)`); `main` parses, checks the numbers and turns errors into
one line and an exit code."""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from pathlib import Path

from slimport.cli import distill, models, quantize, run, train
from slimport.errors import SlimportError

COMMANDS = (models, quantize, distill, run, train)  # in --help order


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="slimport", description="Make transformer models small and portable, with numbers."
    )
    sub = p.add_subparsers(dest="command", required=True)
    for module in COMMANDS:
        module.register(sub)
    return p


# Numeric options and what they must satisfy, checked before any work starts (a negative
# --threads or --top-p 2.0 otherwise fails deep inside torch, or silently means something else).
BOUNDS = {
    "max_new_tokens": (lambda v: v >= 0, "a non-negative integer"),
    "temperature": (lambda v: v > 0, "a positive number"),
    "top_k": (lambda v: v >= 0, "a non-negative integer"),
    "top_p": (lambda v: 0 < v <= 1, "in (0, 1]"),
    "repetition_penalty": (lambda v: v > 0, "a positive number"),
    "tokens": (lambda v: v >= 0, "a non-negative integer"),
    "atol": (lambda v: v >= 0, "a non-negative number"),
    "threads": (lambda v: v > 0, "a positive integer"),
    "seq_len": (lambda v: v > 0, "a positive integer"),
    "windows": (lambda v: v > 0, "a positive integer"),
    "batch_size": (lambda v: v > 0, "a positive integer"),
    "batch": (lambda v: v > 0, "a positive integer"),
    "seq": (lambda v: v > 0, "a positive integer"),
    "num_samples": (lambda v: v > 0, "a positive integer"),
    "max_steps": (lambda v: v > 0, "a positive integer"),
    "epochs": (lambda v: v > 0, "a positive number"),
    "minutes": (lambda v: v > 0, "a positive number"),
    "eval_every": (lambda v: v >= 0, "a non-negative integer"),
}


def check_options(args: argparse.Namespace) -> None:
    """Refuse out-of-range numbers and a --json FILE that is a folder, before the run."""
    for key, (ok, what) in BOUNDS.items():
        v = getattr(args, key, None)
        if v is not None and (v != v or not ok(v)):  # v != v: NaN
            raise SlimportError(f"--{key.replace('_', '-')} {v}: must be {what}")
    json_file = getattr(args, "json", None)
    if isinstance(json_file, str) and Path(json_file).is_dir():
        raise SlimportError(f"--json {json_file}: is a folder; give a file name")


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so every `finally` removes its partial output."""


def _terminate(signum, frame) -> None:
    raise Terminated


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if threading.current_thread() is threading.main_thread():  # signal() works only there
        signal.signal(signal.SIGTERM, _terminate)
    try:
        check_options(args)
        return args.fn(args)
    except SlimportError as e:
        print(f"slimport: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        name = "terminated" if isinstance(e, Terminated) else "interrupted"
        print(f"slimport: {name}; no partial output was kept", file=sys.stderr)
        return 143 if isinstance(e, Terminated) else 130
