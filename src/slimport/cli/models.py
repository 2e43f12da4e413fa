"""Commands on model files: inspect, convert, verify, analyze."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from slimport.cli.options import (
    DEFAULT_PROMPT,
    common_options,
    overwrite_option,
)
from slimport.errors import SlimportError
from slimport.io.formats import CAST_DTYPES, GGUF_TYPES, TO_CHOICES

# Each command imports what it runs inside its function: those modules pull in torch,
# transformers or MindSpore (seconds each), which `slimport --help` and the other commands never
# need. The choices come from modules that import none of them.


def _inspect(args) -> int:
    from slimport import api

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
    report = api.convert(
        args.src,
        args.out,
        to=args.to,
        from_format=args.from_format,
        dtype=args.dtype,
        config=args.config,
        mapping=args.mapping,
        ignore_mismatched_sizes=args.ignore_mismatched_sizes,
        allow_missing=tuple(args.allow_missing),
        options=options,
        overwrite=args.overwrite,
    )
    print(
        f"converted {report['tensor_count']} tensors ({report['parameter_count']:,} parameters) "
        f"{report['source_format']}/{report['source_dialect']} -> {report['target']} "
        f"in {report['seconds']:.2f} s"
    )
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
WRITER_OPTIONS = {"gguf_type": "gguf", "gguf_requantize": "gguf", "accuracy_level": "onnx", "embeddings": "onnx"}  # fmt: skip


def _verify(args) -> int:
    from slimport.evaluate.verify import markdown, verify

    report = verify(
        args.src, args.target, runtime=args.runtime, atol=args.atol, tokens=args.tokens,
        prompt=args.prompt, mode=args.mode,
    )  # fmt: skip
    print(markdown(report))
    if args.report:
        from slimport.evaluate.verify_report import save_report

        print("wrote " + ", ".join(map(str, save_report(report, args.report))))
    if args.json:
        from slimport.io.base import atomic_path

        with atomic_path(Path(args.json)) as tmp:
            tmp.write_text(json.dumps(report, indent=2) + "\n")
    return 0 if report["passed"] else 1


def _analyze(args) -> int:
    from slimport.analyze import analyze, markdown, report

    result = analyze(args.model, args.target, args.batch, args.seq)
    print(json.dumps(result, indent=1) if args.json else markdown(result))
    if args.report:
        print("wrote " + ", ".join(map(str, report(result, args.report))), file=sys.stderr)
    return 0


def register(sub) -> None:
    sp = sub.add_parser("inspect", help="show what a checkpoint holds")
    sp.add_argument("path", help="checkpoint file or HF-style folder")
    sp.add_argument("--json", action="store_true", help="print JSON")
    common_options(sp)
    sp.set_defaults(fn=_inspect)

    sp = sub.add_parser("convert", help="convert a checkpoint to another framework's layout")
    sp.add_argument("src", help="checkpoint file or HF-style folder")
    sp.add_argument("out", help="output folder (weights, config.json, conversion_report.json)")
    sp.add_argument("--to", required=True, choices=TO_CHOICES)
    sp.add_argument("--dtype", choices=CAST_DTYPES,
                    help="cast floating tensors (onnx: float32 or float16 storage, fp32 compute)")  # fmt: skip
    sp.add_argument("--gguf-type", choices=GGUF_TYPES,
                    help="GGUF tensor type of 2-D weights (a quantized model: its scheme's type)")  # fmt: skip
    sp.add_argument("--gguf-requantize", action="store_true", default=None, help="requantize a quantized "
                    "model's Linears with gguf-py where the type cannot hold its integers (lossy)")  # fmt: skip
    sp.add_argument(
        "--accuracy-level",
        type=int,
        choices=range(5),
        metavar="0-4",
        help="onnx, quantized folder: MatMulNBits accuracy_level (default 4: int8 "
        "activations inside the kernel, fastest on CPU; 0: exact)",
    )
    sp.add_argument("--embeddings", choices=("int8", "int4"),
                    help="onnx: quantize the token embedding (GatherBlockQuantized; a tied head "
                    "computes on the same integers): int8 per row, or 4-bit groups of 32")  # fmt: skip
    sp.add_argument(
        "--mapping",
        help="YAML/JSON file of extra name mappings: 'layer_{}.q': 'model.layers.{}.self_attn.q_proj'",
    )
    sp.add_argument(
        "--ignore-mismatched-sizes",
        action="store_true",
        help="keep tensors whose shape disagrees with the config (reported)",
    )
    sp.add_argument(
        "--allow-missing",
        action="append",
        default=[],
        metavar="REGEX",
        help="source tensor names allowed to be absent (reported)",
    )
    overwrite_option(sp)
    common_options(sp)
    sp.set_defaults(fn=_convert)

    sp = sub.add_parser(
        "verify", help="compare a converted model with its source, tensor by tensor and end to end"
    )
    sp.add_argument("src", help="the original checkpoint (run by transformers)")
    sp.add_argument("target", help="the converted checkpoint (run by --runtime)")
    sp.add_argument("--runtime", choices=["mindspore", "torch", "onnx"],
                    help="default: onnx for an exported ONNX folder, else mindspore")  # fmt: skip
    sp.add_argument(
        "--mode", choices=["pynative", "graph"], default="pynative", help="MindSpore execution mode"
    )
    sp.add_argument("--atol", type=float, default=1e-5, help="max |Δ| allowed (default 1e-5, fp32)")
    sp.add_argument("--tokens", type=int, default=16, help="greedy tokens to compare for causal LMs")  # fmt: skip
    sp.add_argument("--prompt", default=DEFAULT_PROMPT, help="input text (tokenized by the model's tokenizer)")  # fmt: skip
    sp.add_argument("--json", metavar="FILE", help="also write the full report as JSON")
    sp.add_argument("--report", metavar="FILE.html", help="also write an HTML report (+ .md) with the per-layer parity plot")  # fmt: skip
    sp.set_defaults(fn=_verify)

    # fmt: off
    sp = sub.add_parser("analyze", help="migration feasibility: op inventory vs a target, memory for inference and training",
                        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                        epilog="example: slimport analyze out/smollm2 --target ascend --batch 4 --seq 512 --report smollm2.html")
    sp.add_argument("model", help="checkpoint file or folder (only its config is read)")
    sp.add_argument("--target", choices=("mindspore", "onnx", "ascend"), help="one target (default: all)")
    sp.add_argument("--batch", type=int, default=1, help="batch size of the memory estimates")
    sp.add_argument("--seq", type=int, default=128, help="sequence length of the memory estimates")
    sp.add_argument("--json", action="store_true", help="print one JSON object")
    sp.add_argument("--report", metavar="FILE.html", help="also write an HTML report (+ .md) with plots")
    sp.set_defaults(fn=_analyze)
    # fmt: on
