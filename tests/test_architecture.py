"""The layer order holds: no module imports from a layer above its own, so there is no import
cycle between layers. The order is pyproject.toml's [tool.importlinter] contract (README,
"Layers"); import-linter checks every import, function-local ones included."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_layers_contract_is_kept():
    lint = Path(sys.executable).parent / "lint-imports"
    assert lint.exists(), f"{lint} not found: install the dev extra (pip install -e '.[dev]')"
    # analyse this checkout's sources, whatever slimport the environment has installed
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
    }
    run = subprocess.run(
        [str(lint), "--no-cache"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert "kept, 0 broken" in run.stdout


def test_no_source_file_is_over_500_lines():
    """Small modules named for what they hold: a file past 500 lines holds two things."""
    long = {
        str(p.relative_to(ROOT)): n
        for p in (ROOT / "src").rglob("*.py")
        if (n := len(p.read_text().splitlines())) > 500
    }
    assert not long, f"split these: {long}"
