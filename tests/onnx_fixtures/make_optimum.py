"""Writes the optimum exports in this folder (random tiny BERT and Llama, exported by optimum's
`main_export` as `optimum-cli export onnx` does: feature-extraction BERT, text-generation-with-past
Llama, each folder with the config.json optimum writes beside model.onnx).

optimum is not a slimport dependency; the files were made once in a separate environment:
    python3 -m venv /work/venv-optimum
    /work/venv-optimum/bin/pip install torch==2.13.0 "optimum[onnx]" onnxruntime==1.32.0
    /work/venv-optimum/bin/python tests/onnx_fixtures/make_optimum.py tests/onnx_fixtures
(optimum 2.1.0, optimum-onnx 0.1.0, transformers 4.57.6, torch 2.13.0+cpu, opset 18)
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

import torch
import transformers as tf
from optimum.exporters.onnx import main_export

# tiny configs: the two files stay under 200 KB each
BERT = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=37, max_position_embeddings=64)  # fmt: skip
LLAMA = dict(vocab_size=64, hidden_size=32, intermediate_size=56, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, rope_theta=5000.0, rms_norm_eps=1e-5,
             tie_word_embeddings=False, max_position_embeddings=128)  # fmt: skip


def _random(model):
    with torch.no_grad():  # distinct biases and norms, so a swapped name changes the output
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def main(out: Path) -> None:
    torch.manual_seed(0)
    models = {
        "optimum-bert": (tf.BertModel(tf.BertConfig(**BERT)), "feature-extraction"),
        "optimum-llama": (
            tf.LlamaForCausalLM(tf.LlamaConfig(**LLAMA)),
            "text-generation-with-past",
        ),
    }
    with tempfile.TemporaryDirectory() as tmp:
        for name, (model, task) in models.items():
            _random(model).save_pretrained(Path(tmp) / name)
            shutil.rmtree(out / name, ignore_errors=True)
            main_export(str(Path(tmp) / name), output=str(out / name), task=task)
            (out / name / "generation_config.json").unlink(missing_ok=True)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
