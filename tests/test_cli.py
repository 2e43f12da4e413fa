"""The command line as a user meets it: exit codes that tell outcomes apart, help with defaults
and an example for every command, names instead of paths."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from slimport import cli
from slimport.cli import main

SRC = str(Path(__file__).resolve().parents[1] / "src")


def _slimport(*argv: str, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": SRC, **kw.pop("env", {})}
    return subprocess.run(
        [sys.executable, "-m", "slimport.cli", *argv], capture_output=True, text=True, env=env, **kw
    )


# --- exit codes --------------------------------------------------------------------------------


def test_exit_codes_are_distinct_and_documented_in_the_help():
    codes = [cli.OK, cli.FAILED, cli.USAGE, cli.REFUSED, cli.CRASHED, cli.INTERRUPTED]
    assert codes == [0, 1, 2, 3, 4, 130]
    top = cli.build_parser().format_help()
    for code, what in cli.EXIT_CODES.items():
        assert f"{code:<4} {what}" in top
    assert "SLIMPORT_DEBUG=1" in top


def test_a_usage_error_exits_2_and_a_refused_input_3(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["inspect"])  # no PATH: argparse's own error
    assert e.value.code == cli.USAGE
    capsys.readouterr()
    assert main(["inspect", str(tmp_path / "absent.safetensors")]) == cli.REFUSED
    err = capsys.readouterr().err
    assert err.startswith("slimport: error: ") and "absent.safetensors" in err
    assert "Traceback" not in err


def test_a_crash_is_one_line_with_a_debug_hint_and_exit_4(monkeypatch, capsys, stories260k):
    from slimport import api

    def broken(*a, **k):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(api, "inspect", broken)
    monkeypatch.delenv("SLIMPORT_DEBUG", raising=False)
    assert main(["inspect", str(stories260k)]) == cli.CRASHED
    err = capsys.readouterr().err
    assert "internal error: ZeroDivisionError: a bug" in err and "SLIMPORT_DEBUG=1" in err
    assert "Traceback" not in err
    monkeypatch.setenv("SLIMPORT_DEBUG", "1")
    with pytest.raises(ZeroDivisionError):  # the traceback, for the bug report
        main(["inspect", str(stories260k)])


def test_ctrl_c_exits_130(monkeypatch, capsys, stories260k):
    from slimport import api

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(api, "inspect", interrupted)
    assert main(["inspect", str(stories260k)]) == cli.INTERRUPTED
    assert "interrupted" in capsys.readouterr().err


def test_json_into_a_pipe_closed_early_prints_no_traceback(stories260k):
    # inspect's JSON made larger than a pipe's buffer, so `head -1` leaves while it writes
    code = (
        "import sys; from slimport import api, cli; real = api.inspect;"
        "api.inspect = lambda *a: {**real(*a), 'padding': ['x' * 100] * 5000};"
        f"sys.exit(cli.main(['inspect', {str(stories260k)!r}, '--json']))"
    )
    run = subprocess.run(
        ["bash", "-c", f'"{sys.executable}" -c "{code}" | head -1; exit ${{PIPESTATUS[0]}}'],
        capture_output=True, text=True, env={**os.environ, "PYTHONPATH": SRC},
    )  # fmt: skip
    assert run.stdout == "{\n"
    assert "Traceback" not in run.stderr and "BrokenPipe" not in run.stderr, run.stderr
    assert run.returncode == 0


def test_version():
    from slimport import __version__

    run = _slimport("--version")
    assert run.returncode == 0 and run.stdout.strip() == f"slimport {__version__}"
