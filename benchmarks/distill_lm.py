"""Distilling SmolLM2-135M into a shallower student (layers kept evenly, `depth:N`): WikiText-2
raw test perplexity of the teacher, the student as cut (before training), after distillation,
and after the same steps of plain next-token training (alpha 0). Training text: WikiText-2
valid (or --train, e.g. tinyshakespeare), never the test split.

    python benchmarks/distill_lm.py --student depth:21 --steps 200 --minutes 20
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import header  # noqa: E402

from slimport.compress.distill import DistillSettings, distill  # noqa: E402
from slimport.compress.students import make_student  # noqa: E402
from slimport.compress.training import cache_root  # noqa: E402
from slimport.data import shared_dir, wikitext_windows  # noqa: E402
from slimport.evaluate.perplexity import perplexity  # noqa: E402
from slimport.io.hf import load_tokenizer  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--model", help="default: .cache/models/smollm2-135m")
    ap.add_argument("--student", default="depth:21", help="30 -> 21 layers: 30%% fewer")
    ap.add_argument("--train", default=str(shared_dir() / "data/wikitext-2/valid.txt"))
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument("--windows", type=int, default=8, help="test windows of 512 tokens")
    ap.add_argument("--minutes", type=float, default=20.0, help="budget of each training run")
    ap.add_argument("--scratch", default=".cache/bench-distill-lm")
    args = ap.parse_args()
    torch.set_num_threads(1)
    from transformers import AutoModelForCausalLM

    model = Path(args.model or cache_root() / "models/smollm2-135m")
    scratch = Path(args.scratch)
    windows = wikitext_windows(load_tokenizer(model),
                               shared_dir() / "data/wikitext-2-raw/wiki.test.raw", 512, args.windows)  # fmt: skip
    teacher = AutoModelForCausalLM.from_pretrained(model).eval()
    ppl = {"teacher (30 layers)": perplexity(teacher, windows, progress=False)["perplexity"]}
    cut, _, described = make_student(teacher, args.student, "lm", scratch, 0)
    ppl[f"student as cut: {described}"] = perplexity(cut.eval(), windows, progress=False)[
        "perplexity"
    ]
    del teacher, cut
    base = DistillSettings(max_steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len,
                           lr=args.lr, minutes=args.minutes)  # fmt: skip
    reports = {}
    for name, alpha in (("distilled (alpha 0.8, T 2)", 0.8), ("plain LM training (alpha 0)", 0.0)):
        out = scratch / name.split()[0]
        shutil.rmtree(out, ignore_errors=True)
        s = DistillSettings(**{**base.__dict__, "alpha": alpha})
        reports[name] = distill(model, out, args.student, "lm", args.train, s)
        net = AutoModelForCausalLM.from_pretrained(out).eval()
        ppl[name] = perplexity(net, windows, progress=False)["perplexity"]
        shutil.rmtree(out, ignore_errors=True)
    print(
        header(
            "python benchmarks/distill_lm.py " + " ".join(sys.argv[1:]), ("torch", "transformers")
        )
    )
    print()
    r = next(iter(reports.values()))
    print(f"{args.steps} steps x {args.batch_size} x {args.seq_len} tokens of {Path(args.train).name}, "
          f"lr {args.lr}, frozen embeddings; {args.windows} x 512 WikiText-2 raw test windows")  # fmt: skip
    print()
    print("| model | WikiText-2 ppl | steps | train min |")
    print("|---|---|---|---|")
    for name, p in ppl.items():
        rep = reports.get(name)
        steps = f"{rep['steps']}/{rep['planned_steps']}" if rep else "-"
        mins = f"{rep['train_seconds'] / 60:.1f}" if rep else "-"
        print(f"| {name} | {p:.3f} | {steps} | {mins} |")
    print(
        f"\nparameters: teacher {r['parameters']['teacher'] / 1e6:.1f}M, student {r['parameters']['student'] / 1e6:.1f}M"
    )


if __name__ == "__main__":
    main()
