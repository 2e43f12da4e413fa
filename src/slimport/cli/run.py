"""Commands that run a model: generate, eval."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from slimport.cli.options import compute_dtype_option, stdout_kept_for_json
from slimport.errors import SlimportError

# Each command imports what it runs inside its function: those modules pull in torch,
# transformers or MindSpore (seconds each), which `slimport --help` and the other commands never
# need. The choices come from modules that import none of them.


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
        compute_dtype=args.compute_dtype, progress=not args.quiet, **sampling,
    )  # fmt: skip
    for prompt, text in zip(args.prompt, texts, strict=True):
        if len(args.prompt) > 1:
            print(f">>> {prompt}")
        print(text)
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
    with stdout_kept_for_json(args.json):
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


def register(sub) -> None:
    # fmt: off
    sp = sub.add_parser("generate", help="generate text with a causal LM in MindSpore, PyTorch or ONNX Runtime",
                        epilog='example: slimport generate smollm2 --prompt "What is the capital of France?" --max-new-tokens 32')
    sp.add_argument("model", metavar="MODEL", help="checkpoint file or folder (with its tokenizer), a `slimport models` name, or a hub id org/name")
    sp.add_argument("--prompt", action="append", required=True, help="repeat for a batch")
    sp.add_argument("--runtime", choices=["mindspore", "torch", "onnx"],
                    help="default: onnx for an exported ONNX folder, else mindspore")
    sp.add_argument("--mode", choices=["pynative", "graph"], default="pynative", help="MindSpore execution mode")
    sp.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate per prompt")
    sp.add_argument("--temperature", type=float, help="sample with this temperature (default: greedy)")
    sp.add_argument("--top-k", type=int, help="sample from the k most likely tokens (default: all)")
    sp.add_argument("--top-p", type=float, help="nucleus sampling threshold (default: 1.0 when sampling)")
    sp.add_argument("--repetition-penalty", type=float, default=1.0, help="divide repeated tokens' logits by this")
    sp.add_argument("--seed", type=int, help="seed for sampling (default: unseeded)")
    sp.add_argument("--chat", action=argparse.BooleanOptionalAction, default=None,
                    help="wrap each prompt in the tokenizer's chat template (default: when it has one)")
    sp.add_argument("--quiet", action="store_true", help="no progress bar")
    compute_dtype_option(sp)
    sp.set_defaults(fn=_generate)

    sp = sub.add_parser("eval", help="perplexity (WikiText-2) or accuracy (SST-2) of a model folder",
                        epilog="example: slimport eval out/smollm2-w4 --task wikitext2 --windows 16\n"
                        "         slimport eval minilm-sst2/ --task sst2 --json")
    sp.add_argument("model", metavar="MODEL", help="Hugging Face or exported ONNX model folder (with its tokenizer), "
                    "a `slimport models` name, or a hub id org/name")
    sp.add_argument("--task", choices=("wikitext2", "sst2"), required=True)
    sp.add_argument("--data", help="task file (default: shared WikiText-2 raw test / SST-2 dev)")
    sp.add_argument("--seq-len", type=int, default=512, help="wikitext2 window length in tokens")
    sp.add_argument("--windows", type=int, help="wikitext2: score only the first N windows (default: all)")
    sp.add_argument("--batch-size", type=int, default=64, help="sst2 sentences per batch")
    sp.add_argument("--reference", help="sst2: an earlier --json output; adds prediction agreement (default: none)")
    sp.add_argument("--runtime", choices=("torch", "onnx"),
                    help="default: onnx for an exported ONNX folder, else torch")
    sp.add_argument("--threads", type=int, help="CPU threads, torch or ONNX Runtime (default: the library's)")
    compute_dtype_option(sp)
    sp.add_argument("--json", action="store_true", help="print one JSON object")
    sp.set_defaults(fn=_eval)
    # fmt: on
