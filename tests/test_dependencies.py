"""Declared dependencies match what the code imports: every third-party module that src/,
tests/ and benchmarks/ import belongs to a declared distribution, and every runtime dependency
declared for src/ is imported there (or is listed below with the reason it is needed anyway)."""

from __future__ import annotations

import ast
import importlib.metadata as md
import re
import sys
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())

# declared for src/ although src/ never imports them: what needs them instead
NOT_IMPORTED = {
    "accelerate": "transformers' own GGUF loading (load_tokenizer, tests) requires it",
}
# benchmark peers that cannot share slimport's environment (llm-compressor pins older
# transformers and compressed-tensors): installed in the peer venv (BENCHMARKS.md "Peers"),
# never an extra; `datasets` is what llm-compressor takes calibration data in
PEER_VENV = {"nncf", "hqq", "llmcompressor", "datasets"}
# tests/onnx_fixtures/make_optimum.py made its checked-in files once, in a venv of its own
FIXTURE_VENV = {"optimum"}


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(req: str) -> str:
    return norm(re.match(r"[A-Za-z0-9._-]+", req).group(0))


def declared(*groups: str) -> set[str]:
    """Distribution names of the core dependencies and the given extras (all when none)."""
    project = PYPROJECT["project"]
    extras = project["optional-dependencies"]
    reqs = list(project["dependencies"])
    for g in groups or extras:
        reqs += extras[g]
    return {requirement_name(r) for r in reqs} - {"slimport"}


def imported_modules(folder: Path) -> dict[str, set[str]]:
    """Top-level third-party modules imported by the .py files under `folder`, with the files."""
    # the project's own modules (benchmarks import tests/fuzzing.py through sys.path)
    local = {p.stem for d in ("tests", "benchmarks") for p in (ROOT / d).glob("*.py")} | {
        "slimport"
    }
    out: dict[str, set[str]] = {}
    for path in folder.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names and top not in local:
                    out.setdefault(top, set()).add(str(path.relative_to(ROOT)))
    return out


def distributions(modules) -> dict[str, str]:
    """module -> distribution (installed: from its metadata; else the module's own name)."""
    known = md.packages_distributions()
    return {m: norm(known[m][0]) if m in known else norm(m) for m in modules}


# extras of slimport's own features (not the tests' `dev`, the benchmarks' `bench`)
RUNTIME_EXTRAS = sorted(
    set(PYPROJECT["project"]["optional-dependencies"]) - {"dev", "bench", "all"}
)


def test_src_imports_only_declared_runtime_dependencies():
    runtime = declared(*RUNTIME_EXTRAS)
    used = imported_modules(ROOT / "src")
    undeclared = {m: sorted(used[m]) for m, d in distributions(used).items() if d not in runtime}
    assert not undeclared, f"imported by src/ but not a runtime dependency: {undeclared}"


def test_every_runtime_dependency_is_imported_by_src():
    used = set(distributions(imported_modules(ROOT / "src")).values())
    unused = declared(*RUNTIME_EXTRAS) - used - set(NOT_IMPORTED)
    assert not unused, f"declared but imported nowhere in src/: {sorted(unused)}"


def test_tests_and_benchmarks_import_only_declared_packages():
    for folder, allowed in (
        ("tests", declared() | FIXTURE_VENV),
        ("benchmarks", declared() | PEER_VENV),
    ):
        used = imported_modules(ROOT / folder)
        undeclared = {
            m: sorted(used[m]) for m, d in distributions(used).items() if d not in allowed
        }
        assert not undeclared, f"imported by {folder}/ but declared nowhere: {undeclared}"


def test_benchmark_extras_are_used_and_the_peers_have_their_pins():
    used = set(distributions(imported_modules(ROOT / "benchmarks")).values())
    bench = {requirement_name(r) for r in PYPROJECT["project"]["optional-dependencies"]["bench"]}
    assert bench <= used, f"bench extra lists what no benchmark imports: {sorted(bench - used)}"
    tree = ast.parse((ROOT / "benchmarks/quant_vs_peers.py").read_text())
    pins = next(
        ast.literal_eval(n.value)
        for n in ast.walk(tree)
        if isinstance(n, ast.Assign) and getattr(n.targets[0], "id", "") == "PEER_PINS"
    )
    assert {requirement_name(p) for p in pins} >= PEER_VENV
