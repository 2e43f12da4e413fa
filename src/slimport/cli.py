"""`slimport` command line: a thin shell over slimport.api."""

from __future__ import annotations

import argparse
import json
import sys

from slimport.errors import SlimportError


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
