"""Every reader, fed mutated seed files and (safetensors) arbitrary JSON headers, either reads the
file or raises SlimportError: never another exception, > 10 s or > 1 GB (see tests/fuzzing.py).
Bounded for CI: FUZZ_EXAMPLES inputs per reader (default 200; a quarter of that for generated
headers, which cost more to generate than to read); benchmarks/fuzz_readers.py runs longer."""

from __future__ import annotations

import json
import os
import random
import struct
from pathlib import Path

import pytest
from fuzzing import READERS, SUFFIX, check, mutate, peak_kb, seeds
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "200"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,  # the 10 s bound is checked by fuzzing.check, not by timing asserts here
    derandomize=True,  # the same inputs every CI run: a failure is reproducible
    suppress_health_check=list(HealthCheck),
    database=None,
)


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


@pytest.mark.parametrize("fmt", list(READERS))
def test_mutated_files_read_or_raise_slimport_error(fmt, work):
    corpus = seeds(fmt)
    path = work / f"input{SUFFIX[fmt]}"
    outcomes = []
    baseline = peak_kb()  # now, not at import: earlier tests of the suite raised the peak
    # the seeds themselves must read, or nothing is being fuzzed but the first check; read
    # first, they also start what a reader starts once (the h5 metadata process)
    for data in corpus:
        path.write_bytes(data)
        assert check(path, fmt, baseline) == "ok"

    @FUZZ
    @given(st.integers(0, len(corpus) - 1), st.integers(0, 2**32))
    def one(which, seed):
        path.write_bytes(mutate(corpus[which], random.Random(seed)))
        outcomes.append(check(path, fmt, baseline))

    one()
    assert "refused" in outcomes, "no mutation was refused: the mutator does nothing"


JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**65), 2**65) | st.floats() | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
ENTRY = st.fixed_dictionaries(
    {
        "dtype": st.sampled_from(["F32", "F16", "BF16", "I64", "BOOL", "F8_E4M3", "X"]) | JSON,
        "shape": st.lists(st.integers(-2, 2**40), max_size=4) | JSON,
        "data_offsets": st.lists(st.integers(-8, 2**40), min_size=2, max_size=2) | JSON,
    }
)


@settings(FUZZ, max_examples=max(EXAMPLES // 4, 1))
@given(st.dictionaries(st.text(max_size=6), ENTRY | JSON, max_size=4), st.binary(max_size=64))
def test_arbitrary_safetensors_headers_read_or_raise_slimport_error(work, header, data):
    blob = json.dumps(header).encode()
    path = work / "header.safetensors"
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)
    check(path, "safetensors", peak_kb())
