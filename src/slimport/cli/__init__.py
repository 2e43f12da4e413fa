"""`slimport` command line: a thin shell over slimport's Python API. Each module of this package
registers its commands (`register(sub)`); `main` parses, checks the numbers and turns errors into
one line and an exit code (`EXIT_CODES`)."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from pathlib import Path

from slimport.cli import distill, models, quantize, run, sensitivity, train
from slimport.cli.options import HelpFormatter, Parser
from slimport.errors import SlimportError

COMMANDS = (models, quantize, distill, run, sensitivity, train)  # in --help order

# Distinct so scripts can tell a failed check from bad input from a bug (as pytest and ruff do).
OK, FAILED, USAGE, REFUSED, CRASHED, INTERRUPTED, TERMINATED = 0, 1, 2, 3, 4, 130, 143
EXIT_CODES = {
    OK: "success",
    FAILED: "a check failed (verify: the candidate missed its pass criterion)",
    USAGE: "usage error (unknown option, missing argument)",
    REFUSED: "refused input: a file, model name or option slimport cannot use",
    CRASHED: "internal error (a bug): rerun with SLIMPORT_DEBUG=1 for the traceback",
    INTERRUPTED: "interrupted (Ctrl-C; 143: SIGTERM); no partial output is kept",
}


def build_parser() -> argparse.ArgumentParser:
    from slimport import __version__

    codes = "\n".join(f"  {code:<4} {what}" for code, what in EXIT_CODES.items())  # hangs at 7
    p = argparse.ArgumentParser(
        prog="slimport",
        description="Make transformer models small and portable, with numbers.",
        epilog=f"exit status:\n{codes}\n\nexample: slimport models\n"
        "         slimport convert smollm2 out/smollm2 --to mindspore\n"
        "         slimport verify smollm2 out/smollm2\n\n"
        "slimport CMD --help shows each command's options, defaults and examples.",
        formatter_class=HelpFormatter,
    )
    p.add_argument("--version", action="version", version=f"slimport {__version__}")
    sub = p.add_subparsers(dest="command", required=True, parser_class=Parser)
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
    "examples": (lambda v: v > 0, "a positive integer"),
    "workers": (lambda v: v > 0, "a positive integer"),
    "batch_size": (lambda v: v > 0, "a positive integer"),
    "batch": (lambda v: v > 0, "a positive integer"),
    "seq": (lambda v: v > 0, "a positive integer"),
    "num_samples": (lambda v: v > 0, "a positive integer"),
    "max_steps": (lambda v: v > 0, "a positive integer"),
    "epochs": (lambda v: v > 0, "a positive number"),
    "minutes": (lambda v: v > 0, "a positive number"),
    "eval_every": (lambda v: v >= 0, "a non-negative integer"),
}


# the arguments that name a model: a path, a `slimport models` name or a Hub id org/name
MODEL_ARGS = ("path", "src", "model", "teacher")


def resolve_models(args: argparse.Namespace) -> None:
    """Replace each model name by its local path (io.locate), before any command runs."""
    from slimport.io.locate import resolve_model

    for key in MODEL_ARGS:
        if isinstance(value := getattr(args, key, None), str):
            setattr(args, key, str(resolve_model(value)))


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
    args = build_parser().parse_args(argv)  # a usage error exits here, with USAGE
    if threading.current_thread() is threading.main_thread():  # signal() works only there
        signal.signal(signal.SIGTERM, _terminate)
    try:
        check_options(args)
        resolve_models(args)
        code = args.fn(args)
        sys.stdout.flush()  # a closed pipe shows here, inside the handlers below
        return code
    except SlimportError as e:
        print(f"slimport: error: {e}", file=sys.stderr)
        return REFUSED
    except KeyboardInterrupt as e:
        name = "terminated" if isinstance(e, Terminated) else "interrupted"
        print(f"slimport: {name}; no partial output was kept", file=sys.stderr)
        return TERMINATED if isinstance(e, Terminated) else INTERRUPTED
    except BrokenPipeError:  # `slimport inspect --json | head -1`: the reader left; not an error
        # stdout's buffer still holds bytes: point it at /dev/null so exit's flush stays quiet
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return OK
    except Exception as e:
        if os.environ.get("SLIMPORT_DEBUG"):
            raise
        print(
            f"slimport: internal error: {type(e).__name__}: {e}\n"
            "  hint: this is a bug; rerun with SLIMPORT_DEBUG=1 for the traceback and report it",
            file=sys.stderr,
        )
        return CRASHED
