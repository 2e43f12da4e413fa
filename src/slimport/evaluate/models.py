"""The model an evaluation task runs: a causal LM for WikiText-2 perplexity, a sequence
classifier for SST-2, from a Hugging Face folder (transformers; a quantized folder on the packed
runtime) or an exported ONNX folder (ONNX Runtime)."""

from __future__ import annotations

import json
from pathlib import Path

from slimport.arch.layout import is_causal_lm
from slimport.errors import SlimportError
from slimport.io import pruned_heads

RUNTIMES = ("torch", "onnx")


def default_runtime(path: str | Path) -> str:
    """ONNX Runtime for an exported ONNX folder (model.onnx beside config.json), else torch."""
    p = Path(path)
    return "onnx" if (p / "model.onnx").is_file() and (p / "config.json").is_file() else "torch"


def _onnx_for_eval(path: Path, task: str, threads: int | None):
    from transformers import AutoTokenizer

    from slimport.runtime.onnx.runner import TorchView, is_export

    if not is_export(path):
        raise SlimportError(
            f"{path}: not an exported ONNX folder (model.onnx + config.json)",
            hint="export it first: slimport convert SRC OUT --to onnx",
        )
    model = TorchView(path, threads)
    causal = task == "wikitext2"
    if causal != model.is_decoder or not model.has_logits:
        kind = "decoder" if model.is_decoder else "encoder"
        head = "" if model.has_logits else " without a head (no logits)"
        raise SlimportError(
            f"{path}: an ONNX {kind}{head}, which cannot run {task}",
            hint="wikitext2 needs a causal LM; sst2 a fine-tuned classifier (slimport finetune)",
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)  # as the torch runtime tokenizes
    except (OSError, ValueError) as e:
        raise SlimportError(f"{path}: no tokenizer beside the ONNX model ({e})") from None
    return model, tokenizer


def load_for_eval(
    path: str | Path,
    task: str,
    compute_dtype: str = "float32",
    runtime: str | None = None,
    threads: int | None = None,
):
    """(model, tokenizer) for `slimport eval`: a causal LM for wikitext2, a classifier for sst2.
    runtime "torch": a quantized folder runs on the packed runtime (integers only); compute_dtype
    float32 is exact, bfloat16 uses the CPU int8/int4 kernels (a float model is cast to it).
    runtime "onnx": an exported folder in ONNX Runtime (its own dtypes; compute_dtype float32).
    None: onnx for an exported ONNX folder, else torch."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    from slimport.runtime.torch.quantized import DTYPES, load_quantized

    path = Path(path)
    runtime = runtime or default_runtime(path)
    if runtime not in RUNTIMES:
        raise SlimportError(f"unknown --runtime {runtime!r}", hint="one of: " + ", ".join(RUNTIMES))
    if runtime == "onnx":
        if compute_dtype != "float32":
            raise SlimportError(
                f"--compute-dtype {compute_dtype} is for --runtime torch",
                hint="an ONNX folder computes as exported (--dtype of convert --to onnx)",
            )
        return _onnx_for_eval(path, task, threads)
    if not (path / "config.json").is_file():
        raise SlimportError(
            f"{path}: not a Hugging Face model folder (no config.json)",
            hint="convert it first: slimport convert SRC OUT --to hf",
        )
    causal = task == "wikitext2"
    head = "CausalLM" if causal else "SequenceClassification"
    try:
        architectures = json.loads((path / "config.json").read_text()).get("architectures") or []
    except (OSError, ValueError, AttributeError) as e:
        raise SlimportError(f"{path / 'config.json'}: not a valid config ({e})") from None
    fits = (
        is_causal_lm({"architectures": architectures})
        if causal
        else any(a.endswith("ForSequenceClassification") for a in architectures)
    )
    if architectures and not fits:
        raise SlimportError(
            f"{path}: a {', '.join(architectures)}, which has no {head} head for {task}",
            hint="sst2 needs a fine-tuned classifier (slimport finetune); wikitext2 a causal LM",
        )
    auto = AutoModelForCausalLM if causal else AutoModelForSequenceClassification
    config = json.loads((path / "config.json").read_text())
    if "quantization_config" in config:  # ours (or any compressed-tensors model): exact integers
        model, _ = load_quantized(path, compute_dtype)
        return model.eval(), AutoTokenizer.from_pretrained(path)
    if compute_dtype not in DTYPES:
        raise SlimportError(f"compute_dtype {compute_dtype!r} is not supported", hint="float32 or bfloat16")  # fmt: skip
    try:
        model = pruned_heads.from_pretrained(auto, path, dtype=DTYPES[compute_dtype])
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, KeyError) as e:
        raise SlimportError(f"{path}: transformers cannot load it for {task} ({e})") from None
    return model.eval(), tokenizer
