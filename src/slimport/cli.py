"""`slimport` command line: a thin shell over slimport.api."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from slimport.errors import SlimportError

DEFAULT_PROMPT = "The quick brown fox jumps over the lazy dog. Once upon a time, there was"


def _inspect(args) -> int:
    from slimport import api

    info = api.inspect(args.path, args.from_format, args.config)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    width = max(len(k) for k in info)
    for key, value in info.items():
        if key == "config":
            for k, v in value.items():
                print(f"{'config.' + k:<{width + 8}} {v}")
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
    if args.gguf_type:
        options["gguf_type"] = args.gguf_type
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


def _verify(args) -> int:
    from slimport.evaluate.verify import markdown, verify

    report = verify(
        args.src, args.target, runtime=args.runtime, atol=args.atol, tokens=args.tokens,
        prompt=args.prompt, mode=args.mode,
    )  # fmt: skip
    print(markdown(report))
    if args.json:
        from slimport.io.base import atomic_path

        with atomic_path(Path(args.json)) as tmp:
            tmp.write_text(json.dumps(report, indent=2) + "\n")
    return 0 if report["passed"] else 1


def _generate(args) -> int:
    from slimport.runtime.text import generate_text

    sampling = {
        "max_new_tokens": args.max_new_tokens,
        "repetition_penalty": args.repetition_penalty,
    }
    if args.temperature is not None or args.top_k or args.top_p is not None:
        sampling.update(
            do_sample=True, temperature=args.temperature or 1.0, top_k=args.top_k or 0,
            top_p=1.0 if args.top_p is None else args.top_p, seed=args.seed,
        )  # fmt: skip
    texts = generate_text(
        args.model, args.prompt, runtime=args.runtime, mode=args.mode, chat=args.chat, **sampling
    )
    for prompt, text in zip(args.prompt, texts, strict=True):
        if len(args.prompt) > 1:
            print(f">>> {prompt}")
        print(text)
    return 0


def _demo(args) -> int:
    from slimport.demo import run

    return run(args.out)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="slimport", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp):
        sp.add_argument(
            "--from", dest="from_format", help="source format when the suffix is ambiguous"
        )
        sp.add_argument("--config", help="config.json to use instead of the one beside the weights")

    sp = sub.add_parser("inspect", help="show what a checkpoint holds")
    sp.add_argument("path", help="checkpoint file or HF-style folder")
    sp.add_argument("--json", action="store_true", help="print JSON")
    common(sp)
    sp.set_defaults(fn=_inspect)

    sp = sub.add_parser("convert", help="convert a checkpoint to another framework's layout")
    sp.add_argument("src", help="checkpoint file or HF-style folder")
    sp.add_argument("out", help="output folder (weights, config.json, conversion_report.json)")
    sp.add_argument(
        "--to", required=True, choices=["hf", "mindspore", "mindformers", "keras", "gguf"]
    )
    sp.add_argument(
        "--dtype", choices=["float32", "float16", "bfloat16"], help="cast floating tensors"
    )
    sp.add_argument(
        "--gguf-type", choices=["f32", "f16", "q8_0"], help="GGUF tensor type (2-D weights)"
    )
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
    common(sp)
    sp.set_defaults(fn=_convert)

    sp = sub.add_parser(
        "verify", help="compare a converted model with its source, tensor by tensor and end to end"
    )
    sp.add_argument("src", help="the original checkpoint (run by transformers)")
    sp.add_argument("target", help="the converted checkpoint (run by --runtime)")
    sp.add_argument("--runtime", choices=["mindspore", "torch"], default="mindspore")
    sp.add_argument(
        "--mode", choices=["pynative", "graph"], default="pynative", help="MindSpore execution mode"
    )
    sp.add_argument("--atol", type=float, default=1e-5, help="max |Δ| allowed (default 1e-5, fp32)")
    sp.add_argument(
        "--tokens", type=int, default=16, help="greedy tokens to compare for causal LMs"
    )
    sp.add_argument(
        "--prompt", default=DEFAULT_PROMPT, help="input text (tokenized by the model's tokenizer)"
    )
    sp.add_argument("--json", metavar="FILE", help="also write the full report as JSON")
    sp.set_defaults(fn=_verify)

    sp = sub.add_parser("generate", help="generate text with a causal LM in MindSpore or PyTorch")
    sp.add_argument("model", help="checkpoint file or folder (with its tokenizer)")
    sp.add_argument("--prompt", action="append", required=True, help="repeat for a batch")
    sp.add_argument("--runtime", choices=["mindspore", "torch"], default="mindspore")
    sp.add_argument(
        "--mode", choices=["pynative", "graph"], default="pynative", help="MindSpore execution mode"
    )
    sp.add_argument("--max-new-tokens", type=int, default=64)
    sp.add_argument(
        "--temperature", type=float, help="sample with this temperature (default: greedy)"
    )
    sp.add_argument("--top-k", type=int, help="sample from the k most likely tokens")
    sp.add_argument("--top-p", type=float, help="nucleus sampling threshold")
    sp.add_argument("--repetition-penalty", type=float, default=1.0)
    sp.add_argument("--seed", type=int, help="seed for sampling")
    sp.add_argument("--chat", action=argparse.BooleanOptionalAction, default=None,
                    help="wrap each prompt in the tokenizer's chat template (default: when it has one)")  # fmt: skip
    sp.set_defaults(fn=_generate)

    sp = sub.add_parser(
        "demo", help="convert the real MiniLM (TF) and SmolLM2 (GGUF) checkpoints and verify them"
    )
    sp.add_argument("--out", default=".cache/demo", help="where converted models go")
    sp.set_defaults(fn=_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except SlimportError as e:
        print(f"slimport: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("slimport: interrupted; no partial output was kept", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
