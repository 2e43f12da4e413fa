"""Loading options shared by every MindSpore model: dtype, format flags, Auto classes."""

from __future__ import annotations

import mindspore as ms
import numpy as np
import pytest

from slimport.errors import SlimportError
from slimport.mindspore import AutoModel, AutoModelForCausalLM


@pytest.fixture(scope="module")
def probe():
    return ms.Tensor(np.array([[101, 7592, 2088, 2003, 1037, 3231, 102]], dtype=np.int32))


def test_float16_loads_and_stays_close_to_float32(minilm_dir, probe):
    full = AutoModel.from_pretrained(minilm_dir)
    half = AutoModel.from_pretrained(minilm_dir, dtype="float16")
    assert {p.dtype for p in half.get_parameters()} == {ms.float16}
    a = full(probe)["last_hidden_state"].asnumpy()
    b = half(probe)["last_hidden_state"].asnumpy().astype(np.float32)
    err = np.abs(a - b).max()
    print(f"MiniLM float16 vs float32 last_hidden_state max|Δ| {err:.3g}")
    assert 0 < err < 2e-2


def test_bfloat16_on_cpu_is_refused_clearly(minilm_dir):
    with pytest.raises(SlimportError, match="no bfloat16 MatMul"):
        AutoModel.from_pretrained(minilm_dir, dtype="bfloat16")


def test_format_flag_that_contradicts_the_file(minilm_dir):
    with pytest.raises(SlimportError, match="from_gguf=True but the file is safetensors"):
        AutoModel.from_pretrained(minilm_dir, from_gguf=True)


def test_auto_class_without_a_model_for_the_family(minilm_dir):
    with pytest.raises(SlimportError, match="no MindSpore causal-lm model for model_type='bert'"):
        AutoModelForCausalLM.from_pretrained(minilm_dir)


def test_ignore_mismatched_sizes_reinitialises_like_transformers(minilm_dir, tmp_path):
    """A classifier with another label count: an error by default, re-initialised on request."""
    from slimport.runtime.mindspore.bert import BertForSequenceClassification

    with pytest.warns(UserWarning, match="newly initialised"):
        two = BertForSequenceClassification.from_pretrained(minilm_dir, num_labels=2)
    two.save_pretrained(tmp_path / "two")
    with pytest.raises(SlimportError, match="shape mismatch.*classifier.weight"):
        BertForSequenceClassification.from_pretrained(tmp_path / "two", num_labels=3)
    with pytest.warns(UserWarning, match="re-initialised"):
        three = BertForSequenceClassification.from_pretrained(
            tmp_path / "two", num_labels=3, ignore_mismatched_sizes=True
        )
    assert three.classifier.weight.shape == (3, 384)
    assert any(
        "classifier.weight: checkpoint [2, 384] vs model [3, 384]" in n
        for n in three.load_report.notes
    )


# transformers' keywords: translated, warned about, or refused; never merged into the config unseen


def test_torch_dtype_is_dtype_and_a_name_resolves(stories260k):
    model = AutoModelForCausalLM.from_pretrained("stories260k", torch_dtype="float16")
    assert model.model.embed_tokens.embedding_table.dtype == ms.float16


def test_unused_transformers_keywords_are_named_in_one_warning(stories260k):
    with pytest.warns(UserWarning, match="ignores device_map='auto'.*trust_remote_code=True"):
        AutoModelForCausalLM.from_pretrained(stories260k, device_map="auto", trust_remote_code=True)


def test_an_unknown_keyword_is_refused_not_merged_into_the_config(stories260k):
    with pytest.raises(SlimportError, match="unknown keyword.*torch_dtpye"):
        AutoModelForCausalLM.from_pretrained(stories260k, torch_dtpye="float16")
    with pytest.raises(SlimportError, match="a local path has no revision"):
        AutoModelForCausalLM.from_pretrained(stories260k, revision="main")


def test_transformers_compressed_tensors_config_is_a_clear_error(stories260k):
    from transformers import CompressedTensorsConfig

    with pytest.raises(SlimportError, match="CompressedTensorsConfig.*not how to quantize"):
        AutoModelForCausalLM.from_pretrained(
            stories260k, quantization_config=CompressedTensorsConfig()
        )


def test_loading_prints_no_deprecation_or_numpy_notice_of_ours(stories260k):
    import os
    import subprocess
    import sys
    from pathlib import Path

    code = (
        "from slimport.mindspore import AutoModelForCausalLM;"
        f"AutoModelForCausalLM.from_pretrained({str(stories260k)!r}).generate([[1, 2]], max_new_tokens=2)"
    )
    src = str(Path(__file__).resolve().parents[1] / "src")
    run = subprocess.run([sys.executable, "-W", "always::DeprecationWarning:slimport", "-c", code],
                         capture_output=True, text=True, env={**os.environ, "PYTHONPATH": src})  # fmt: skip
    assert run.returncode == 0, run.stderr
    for notice in ("pynative_synchronize", "Numpy init failed", "NumPy 1.x"):
        assert notice not in run.stderr, run.stderr
