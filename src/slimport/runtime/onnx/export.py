"""`export_onnx`: a model folder -> an ONNX Runtime folder (model.onnx, config.json, tokenizer,
genai_config.json for onnxruntime-genai), written atomically.

Weights come through the hub loader, so any checkpoint slimport reads (HF, GGUF, ...) exports
with Hugging Face tensor names as initializer names. A compressed-tensors folder exports its
integers as MatMulNBits (see quantized.py); the rest of it (embeddings, norms, a protected
lm_head) as float.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import onnx

from slimport.convert.loader import load
from slimport.errors import SlimportError
from slimport.io import atomic_dir
from slimport.io.hf import copy_tokenizer
from slimport.runtime.onnx import decoder, encoder
from slimport.runtime.onnx.graph import Graph
from slimport.runtime.onnx.quantized import QuantizedLinears
from slimport.runtime.onnx.weights import Weights

DTYPES = {"float32": np.float32, "float16": np.float16}
MODEL_FILE, DATA_FILE = "model.onnx", "model.onnx.data"
EXTERNAL_ABOVE = 2_000_000_000  # protobuf cannot serialize a message of 2 GiB or more
BUILDERS = {**decoder.BUILDERS, **encoder.BUILDERS}  # family name -> graph builder
GENAI_TYPES = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2", "gpt2": "gpt2"}


def _quantized(folder: Path, accuracy_level: int) -> QuantizedLinears | None:
    config = folder / "config.json"
    if not config.is_file():
        return None
    qc = json.loads(config.read_text()).get("quantization_config")
    if isinstance(qc, dict) and qc.get("quant_method") == "compressed-tensors":
        return QuantizedLinears(folder, accuracy_level)
    return None


def build(
    model,
    quantized: QuantizedLinears | None,
    dtype: str = "float32",
    embeddings: str | None = None,
    accuracy_level: int = 4,
) -> onnx.ModelProto:
    """The ONNX graph of a hub model (`slimport.convert.loader.load(...)`); embeddings "int8" or
    "int4" quantizes the token embedding (GatherBlockQuantized, embedding.py)."""
    family = model.family.name
    if family not in BUILDERS:
        raise SlimportError(
            f"{model.source.path}: no ONNX graph builder for {family} models",
            hint="ONNX export covers " + ", ".join(sorted(BUILDERS)),
        )
    g = Graph(f"slimport_{family}", DTYPES[dtype])
    w = Weights(model.hub, str(model.source.path), quantized, embeddings, accuracy_level)
    BUILDERS[family](g, w, model.config, model.cfg)
    w.check_all_used()
    kind = "decoder" if family in decoder.BUILDERS else "encoder"
    proto = g.model(doc=f"{family} {kind} exported by slimport")
    onnx.helper.set_model_props(proto, {"slimport.kind": kind, "slimport.family": family})
    return proto


def export_onnx(
    model_folder: str | Path,
    out_folder: str | Path,
    dtype: str | None = "float32",
    accuracy_level: int = 4,
    embeddings: str | None = None,
    overwrite: bool = False,
    **load_options,
) -> dict:
    """Export `model_folder` to `out_folder`; returns the report (sizes, graph, timings), which
    the folder also holds as conversion_report.json. embeddings "int8" / "int4": the token
    embedding as GatherBlockQuantized (rounded as `load_quantized(embeddings=...)` rounds it).
    `load_options` are the hub loader's (from_format, config, mapping, ignore_mismatched_sizes,
    allow_missing); dtype None: float32."""
    t0 = time.perf_counter()
    dtype = dtype or "float32"
    if dtype not in DTYPES:
        raise SlimportError(f"unknown ONNX dtype {dtype!r}", hint="one of: " + ", ".join(DTYPES))
    if embeddings not in (None, "int8", "int4"):
        raise SlimportError(f"embeddings {embeddings!r} is not supported", hint="int8 or int4")
    src = Path(model_folder)
    quantized = _quantized(src, accuracy_level) if src.is_dir() else None
    # a quantized folder's Linears are built from its integers (W8A8 included), never its floats
    model = load(src, integer_linears=quantized is not None, **load_options)
    try:
        proto = build(model, quantized, dtype, embeddings, accuracy_level)
        return _write(proto, model, src, Path(out_folder), overwrite, t0, report={
            "source": str(src),
            "source_format": model.source.format,
            "source_dialect": model.dialect,
            "family": model.family.name,
            "target": "onnx",
            "dtype": dtype,
            "tensor_count": len(model.hub),
            "parameter_count": sum(math.prod(t.shape) for t in model.hub.values()),
            "ignored_source_tensors": model.ignored,
            "quantized_linears": 0 if quantized is None else len(quantized.names),
            "quantized_scheme": None if quantized is None else quantized.scheme,
            "accuracy_level": None if quantized is None and embeddings is None else accuracy_level,
            "embeddings": embeddings,
            "notes": [n for n in model.notes if not n.startswith("weights dequantized")]
            + ([] if quantized is None else [f"{len(quantized.names)} Linear(s) computed from "
                                             f"the folder's integers ({quantized.scheme})"]),
        })  # fmt: skip
    finally:
        model.source.close()
        if quantized is not None:
            quantized.close()


def _write(proto, model, src: Path, out: Path, overwrite: bool, t0: float, report: dict) -> dict:
    """The folder: model.onnx (+ external data), config.json, tokenizer, genai_config.json for a
    decoder, conversion_report.json; one rename when all of it is written."""
    weight_bytes = sum(len(t.raw_data) for t in proto.graph.initializer)
    external = weight_bytes > EXTERNAL_ABOVE
    config = {k: v for k, v in model.config.items() if k != "quantization_config"}
    kind = "decoder" if model.family.name in decoder.BUILDERS else "encoder"
    report |= {"kind": kind, "nodes": len(proto.graph.node), "initializers": len(proto.graph.initializer),
               "weight_bytes": weight_bytes, "external_data": external}  # fmt: skip
    with atomic_dir(out, overwrite, source=src) as tmp:
        if external:
            onnx.save_model(proto, tmp / MODEL_FILE, save_as_external_data=True,
                            all_tensors_to_one_file=True, location=DATA_FILE, size_threshold=1024)  # fmt: skip
        else:
            onnx.save_model(proto, tmp / MODEL_FILE)
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        files = [MODEL_FILE, *([DATA_FILE] if external else []), "config.json"]
        files += copy_tokenizer(tmp, model.source)  # the files beside it, or a GGUF's own
        if kind == "decoder":
            inputs = {i.name for i in proto.graph.input}
            genai = genai_config(config, model.cfg, positions="position_ids" in inputs)
            (tmp / "genai_config.json").write_text(json.dumps(genai, indent=2) + "\n")
            files.append("genai_config.json")
        report["files"] = files
        report["seconds"] = round(time.perf_counter() - t0, 3)
        (tmp / "conversion_report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


export = export_onnx  # the format registry's exporter hook (slimport.io.formats, --to onnx)


def genai_config(config: dict, cfg: dict, positions: bool) -> dict:
    """onnxruntime-genai's genai_config.json for our decoder graph. past_present_share_buffer:
    GroupQueryAttention appends in place to one preallocated cache per layer (max_length long),
    as the builder's graphs run and as `OnnxModel.generate` runs ours (session.InPlaceCache)."""
    mt = cfg["model_type"]
    n_kv = cfg.get("num_key_value_heads", cfg["num_attention_heads"])
    context = int(cfg.get("max_position_embeddings") or cfg.get("n_positions"))
    eos = config.get("eos_token_id", cfg.get("eos_token_id"))
    pad = config.get("pad_token_id")
    pad = pad if pad is not None else (eos[0] if isinstance(eos, list) else eos)
    return {
        "model": {
            "bos_token_id": config.get("bos_token_id"),
            "context_length": context,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": MODEL_FILE,
                "head_size": int(
                    cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
                ),
                "hidden_size": int(cfg["hidden_size"]),
                "inputs": {
                    "input_ids": "input_ids",
                    "attention_mask": "attention_mask",
                    **({"position_ids": "position_ids"} if positions else {}),
                    "past_key_names": "past_key_values.%d.key",
                    "past_value_names": "past_key_values.%d.value",
                },
                "outputs": {
                    "logits": "logits",
                    "present_key_names": "present.%d.key",
                    "present_value_names": "present.%d.value",
                },
                "num_attention_heads": int(cfg["num_attention_heads"]),
                "num_hidden_layers": int(cfg["num_hidden_layers"]),
                "num_key_value_heads": int(n_kv),
            },
            "eos_token_id": eos,
            "pad_token_id": pad,
            "type": GENAI_TYPES.get(mt, mt),
            "vocab_size": int(cfg["vocab_size"]),
        },
        "search": {
            "diversity_penalty": 0.0,
            "do_sample": False,
            "early_stopping": True,
            "length_penalty": 1.0,
            "max_length": context,
            "min_length": 0,
            "no_repeat_ngram_size": 0,
            "num_beams": 1,
            "num_return_sequences": 1,
            "past_present_share_buffer": True,
            "repetition_penalty": 1.0,
            "temperature": 1.0,
            "top_k": 1,
            "top_p": 1.0,
        },  # fmt: skip
    }
