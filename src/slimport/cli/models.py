"""Commands on model files: models, inspect, convert, verify, analyze."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from slimport.cli.options import (
    DEFAULT_PROMPT,
    common_options,
    overwrite_option,
    stdout_kept_for_json,
)
from slimport.errors import SlimportError
from slimport.io.formats import CAST_DTYPES, GGUF_TYPES, TO_CHOICES

# Each command imports what it runs inside its function: those modules pull in torch,
# transformers or MindSpore (seconds each), which `slimport --help` and the other commands never
# need. The choices come from modules that import none of them.


def _models(args) -> int:
    from slimport.io.locate import known_models

    found = known_models()
    if args.json:
        print(json.dumps(found, indent=2))
        return 0
    width = max(len(m["name"]) for m in found)
    for m in found:
        print(f"{m['name']:<{width}}  {m['what']}")
        print(f"{'':<{width}}  {m['path'] or 'not found: ' + m['source']}")
    print("\nAny command taking a MODEL accepts these names, a path, or a Hugging Face Hub id "
          "org/name (from the local Hub cache, downloaded when online).")  # fmt: skip
    return 0


def _inspect(args) -> int:
    from slimport import api

    with stdout_kept_for_json(args.json):
        info = api.inspect(args.path, args.from_format, args.config)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    width = max(len(k) for k in info)
    for key, value in info.items():
        if key in ("config", "quantization", "sparsity"):
            for k, v in value.items():
                print(f"{key + '.' + k:<{width + 8}} {v}")
        elif key == "skipped":
            print(
                f"{key:<{width + 8}} {len(value)} tensor(s)"
                + (f": {', '.join(value[:5])} ..." if value else "")
            )
        else:
            print(f"{key:<{width + 8}} {value}")
    return 0


def _convert(args) -> int:
    from slimport import api

    options = {}
    for key, target in WRITER_OPTIONS.items():
        if getattr(args, key) is not None:
            if args.to != target:
                flag = "--" + key.replace("_", "-")
                raise SlimportError(f"{flag} is an option of --to {target}, not --to {args.to}")
            options[key] = getattr(args, key)
    with stdout_kept_for_json(args.json):
        report = api.convert(
            args.src, args.out, to=args.to, from_format=args.from_format, dtype=args.dtype,
            config=args.config, mapping=args.mapping,
            ignore_mismatched_sizes=args.ignore_mismatched_sizes,
            allow_missing=tuple(args.allow_missing), options=options, overwrite=args.overwrite,
            progress=not args.quiet,
        )  # fmt: skip
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(
        f"converted {report['tensor_count']} tensors ({report['parameter_count']:,} parameters) "
        f"{report['source_format']}/{report['source_dialect']} -> {report['target']} "
        f"in {report['seconds']:.2f} s"
    )
    if Path(args.out).is_file():  # --to gguf FILE.gguf
        print(f"wrote {args.out}")
    else:
        print(f"wrote {args.out}: {', '.join(report['files'])}, conversion_report.json")
    for note in report["notes"]:
        print(f"note: {note}")
    if report["ignored_source_tensors"]:
        print(
            f"ignored {len(report['ignored_source_tensors'])} non-weight tensor(s): "
            + ", ".join(report["ignored_source_tensors"][:6])
        )
    return 0


# writer options -> the --to target they belong to
WRITER_OPTIONS = {"gguf_type": "gguf", "gguf_requantize": "gguf", "accuracy_level": "onnx", "embeddings": "onnx",
                  "max_shard_size": "hf"}  # fmt: skip


def _verify(args) -> int:
    from slimport.evaluate.verify import markdown, verify

    with stdout_kept_for_json(args.json == "-"):
        report = verify(
            args.src, args.target, runtime=args.runtime, rtol=args.rtol, min_top1=args.min_top1,
            atol=args.atol, tokens=args.tokens, prompt=args.prompt, mode=args.mode,
            progress=not args.quiet,
        )  # fmt: skip
    if args.json == "-":
        print(json.dumps(report, indent=2))
    else:
        print(markdown(report))
    if args.report:
        from slimport.evaluate.verify_report import save_report

        written = ", ".join(map(str, save_report(report, args.report)))
        print("wrote " + written, file=sys.stderr if args.json == "-" else sys.stdout)
    if args.json not in (None, "-"):
        from slimport.io.base import atomic_path

        with atomic_path(Path(args.json)) as tmp:
            tmp.write_text(json.dumps(report, indent=2) + "\n")
    return 0 if report["passed"] else 1


def _analyze(args) -> int:
    from slimport.analyze import analyze, markdown, report

    with stdout_kept_for_json(args.json):
        result = analyze(
            args.model,
            args.target,
            args.batch,
            args.seq,
            args.num_samples,
            args.seq_len,
            args.baseline,
        )
    print(json.dumps(result, indent=1) if args.json else markdown(result))
    if args.report:
        print("wrote " + ", ".join(map(str, report(result, args.report))), file=sys.stderr)
    return 0


DIALECTS = """\
--to mindspore and --to mindformers: two MindSpore layouts of the same weights
  mindspore    MindSpore's Cell names on the Hugging Face module tree
               (embedding_table, LayerNorm gamma/beta, Dense [out, in]):
               what slimport.mindspore's models (and MindNLP) load
  mindformers  MindFormers' Llama names (tok_embeddings.embedding_weight,
               attention.wq/wk/wv/wo, feed_forward.w1/w2/w3, attention_norm):
               what MindFormers' LlamaForCausalLM reads; Llama family only
"""


def register(sub) -> None:
    # fmt: off
    sp = sub.add_parser("models", help="list the models slimport finds by name (installed packages, shared folder)",
                        epilog="example: slimport models\n         slimport inspect smollm2")
    sp.add_argument("--json", action="store_true", help="print JSON")
    sp.set_defaults(fn=_models)

    sp = sub.add_parser("inspect", help="show what a checkpoint holds",
                        epilog="example: slimport inspect smollm2 --json | head")
    sp.add_argument("path", metavar="MODEL", help="checkpoint file or folder, a `slimport models` name, or a hub id org/name")
    sp.add_argument("--json", action="store_true", help="print JSON")
    common_options(sp)
    sp.set_defaults(fn=_inspect)

    sp = sub.add_parser("convert", help="convert a checkpoint to another framework's layout",
                        epilog=DIALECTS + "\nexample: slimport convert smollm2 out/smollm2-ms --to mindspore\n"
                        "         slimport convert minilm out/minilm-f16.gguf --to gguf --gguf-type f16")
    sp.add_argument("src", metavar="MODEL", help="checkpoint file or folder, a `slimport models` name, or a hub id org/name")
    sp.add_argument("out", help="output folder (weights, config.json, conversion_report.json); "
                    "with --to gguf also a FILE.gguf, as llama.cpp's tools write")
    sp.add_argument("--to", required=True, choices=TO_CHOICES, help="target layout (mindspore vs mindformers: below)")
    sp.add_argument("--dtype", choices=CAST_DTYPES,
                    help="cast floating tensors (default: keep the source's; onnx: float32 or float16 storage, fp32 compute)")
    sp.add_argument("--gguf-type", choices=GGUF_TYPES,
                    help="GGUF tensor type of 2-D weights (default: the source precision, f32/f16/bf16, as llama.cpp's "
                    "converter; a quantized model: its scheme's type, integers kept)")
    sp.add_argument("--gguf-requantize", action="store_true", default=None, help="requantize a quantized "
                    "model's Linears with gguf-py where the type cannot hold its integers (lossy)")
    sp.add_argument("--accuracy-level", type=int, choices=range(5), metavar="0-4",
                    help="onnx, quantized folder: MatMulNBits accuracy_level (default 4: int8 "
                    "activations inside the kernel, fastest on CPU; 0: exact)")
    sp.add_argument("--embeddings", choices=("int8", "int4"),
                    help="onnx: quantize the token embedding (GatherBlockQuantized; a tied head "
                    "computes on the same integers): int8 per row, or 4-bit groups of 32 (default: float)")
    sp.add_argument("--max-shard-size", metavar="SIZE", help='hf: largest safetensors shard, bytes or '
                    'e.g. "500MB", "2GiB"; an index when there are several (default: 5GB, as transformers)')
    sp.add_argument("--mapping", help="YAML/JSON file of extra name mappings: "
                    "'layer_{}.q': 'model.layers.{}.self_attn.q_proj' (default: none)")
    sp.add_argument("--ignore-mismatched-sizes", action="store_true",
                    help="keep tensors whose shape disagrees with the config (reported)")
    sp.add_argument("--allow-missing", action="append", default=[], metavar="REGEX",
                    help="source tensor names allowed to be absent (reported; default: none)")
    sp.add_argument("--json", action="store_true", help="print the conversion report as one JSON object")
    sp.add_argument("--quiet", action="store_true", help="no progress bar")
    overwrite_option(sp)
    common_options(sp)
    sp.set_defaults(fn=_convert)

    sp = sub.add_parser("verify", help="compare a converted model with its source, tensor by tensor and end to end",
                        description="Run MODEL in transformers and TARGET in --runtime on the same tokens and "
                        "compare every hub tensor, the hidden state after each block, the outputs and, for "
                        "a causal LM, --tokens greedy tokens. TARGET passes when the outputs' relative error "
                        "max|Δ|/max|ref| is at most --rtol, the top-1 predictions agree on at least "
                        "--min-top1 of the positions and the greedy tokens are identical; --atol adds a "
                        "bound on max|Δ| of the outputs and of every tensor. Exit status 1 when it fails.",
                        epilog="example: slimport verify smollm2 out/smollm2-ms\n"
                        "         slimport verify out/smollm2-w4 out/smollm2-w4-onnx --runtime onnx --atol 1e-4")
    sp.add_argument("src", metavar="MODEL", help="the original checkpoint (run by transformers): path, name or hub id")
    sp.add_argument("target", help="the converted checkpoint (run by --runtime)")
    sp.add_argument("--runtime", choices=["mindspore", "torch", "onnx"],
                    help="default: onnx for an exported ONNX folder, else mindspore")
    sp.add_argument("--mode", choices=["pynative", "graph"], default="pynative", help="MindSpore execution mode")
    sp.add_argument("--rtol", type=float, default=1e-4, help="pass: outputs' max|Δ| / max|ref| at most this")
    sp.add_argument("--min-top1", type=float, default=1.0, help="pass: share of positions whose top-1 token agrees")
    sp.add_argument("--atol", type=float, help="pass also needs max|Δ| of the outputs and of every tensor at "
                    "most this (default: not checked; 1e-5 is fp32 bit-faithfulness)")
    sp.add_argument("--tokens", type=int, default=16, help="greedy tokens to compare for causal LMs (must be identical)")
    sp.add_argument("--prompt", default=DEFAULT_PROMPT, help="input text (tokenized by the model's tokenizer)")
    sp.add_argument("--json", nargs="?", const="-", metavar="FILE",
                    help="print the full report as JSON instead of tables (default: tables); with FILE: "
                    "write it there as well as the tables")
    sp.add_argument("--report", metavar="FILE.html", help="also write an HTML report (+ .md) with the per-layer parity plot (default: none)")
    sp.add_argument("--quiet", action="store_true", help="no progress bar")
    sp.set_defaults(fn=_verify)

    sp = sub.add_parser("analyze", help="migration feasibility: op inventory vs a target, memory for inference and training",
                        epilog="example: slimport analyze out/smollm2 --target ascend --batch 4 --seq 512 --report smollm2.html")
    sp.add_argument("model", metavar="MODEL", help="checkpoint file or folder, name or hub id (only its config is read)")
    sp.add_argument("--target", choices=("mindspore", "onnx", "ascend"), help="one target (default: all)")
    sp.add_argument("--batch", type=int, default=1, help="batch size of the memory estimates")
    sp.add_argument("--seq", type=int, default=128, help="sequence length of the memory estimates")
    sp.add_argument("--num-samples", type=int, default=64, help="calibration samples of the quantize-peak estimate (quantize's default)")
    sp.add_argument("--seq-len", type=int, default=512, help="calibration sequence length of the quantize-peak estimate")
    sp.add_argument("--baseline", action="store_true", help="also measure the import baseline of a fresh slimport process (a few seconds)")
    sp.add_argument("--json", action="store_true", help="print one JSON object")
    sp.add_argument("--report", metavar="FILE.html", help="also write an HTML report (+ .md) with plots (default: none)")
    sp.set_defaults(fn=_analyze)
    # fmt: on
