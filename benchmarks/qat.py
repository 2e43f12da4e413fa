"""Quantization-aware training against the PTQ it starts from: how much of the PTQ loss it wins
back, on two cases.

* smollm2: SmolLM2-135M W4 g64 RTN (576 = hidden size: 128 divides no q_proj row); QAT on WikiText-2 *valid* windows (never test); WikiText-2
  raw test perplexity (non-overlapping windows) of fp32, PTQ and QAT.
* minilm: the MiniLM SST-2 classifier, static W8A8 (min_max, no SmoothQuant), QAT on SST-2 train
  sentences; SST-2 dev accuracy and agreement with fp32.

    python benchmarks/qat.py --case smollm2 --steps 100 --minutes 20
    python benchmarks/qat.py --case minilm --steps 100
    python benchmarks/qat.py --case minilm --steps 300 --loss mse --hidden-weight 1 --sort-by-length

`--seed` draws other calibration and QAT sentences (minilm). `--qat-observer` starts QAT from ranges of another observer (the PTQ row stays min_max; that
observer's own PTQ is printed as a row too, so what QAT adds is visible).

recovered = (PTQ loss - QAT loss) / PTQ loss, loss = perplexity above fp32 (smollm2) or
disagreement with fp32 (minilm).
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import header  # noqa: E402

from slimport.compress.api import make_config, quantize  # noqa: E402
from slimport.compress.quant.compressed import load_simulated  # noqa: E402
from slimport.compress.quant.qat import QATSettings, float_model, quantize_aware  # noqa: E402
from slimport.compress.training import cache_root  # noqa: E402
from slimport.data import shared_dir  # noqa: E402


def smollm2(args, scratch: Path) -> None:
    from slimport.data import wikitext_windows
    from slimport.evaluate.perplexity import perplexity
    from slimport.io.hf import load_tokenizer

    model = Path(args.model or cache_root() / "models/smollm2-135m")
    data = shared_dir() / "data"
    config = make_config(bits=4, group_size=args.group_size, method="rtn", seq_len=args.seq_len,
                         calib_data=str(data / "wikitext-2/valid.txt"))  # fmt: skip
    windows = wikitext_windows(load_tokenizer(model), data / "wikitext-2-raw/wiki.test.raw",
                               512, args.windows)  # fmt: skip
    quantize(model, scratch / "ptq", config, progress=False)
    report = quantize_aware(model, scratch / "qat", config, settings(args), overwrite=True)
    rows = {"fp32": float_model(model)}
    rows[f"W4 g{args.group_size} RTN (PTQ)"] = load_simulated(scratch / "ptq")[0]
    rows[f"W4 g{args.group_size} RTN + QAT {report['qat']['steps']} steps"] = load_simulated(
        scratch / "qat"
    )[0]
    ppl = {}
    for name, m in rows.items():
        ppl[name] = perplexity(m, windows, progress=False)["perplexity"]
        rows[name] = None  # one model in memory at a time
    base, (ptq, qat) = ppl["fp32"], list(ppl.values())[1:]
    _print(args, report, f"SmolLM2-135M ({model.name}); QAT on {report['qat']['steps']} (of {args.steps} planned) x {args.seq_len} "
           f"WikiText-2 valid tokens; {args.windows} x 512 WikiText-2 raw test windows")  # fmt: skip
    print("| model | WikiText-2 ppl | vs fp32 |")
    print("|---|---|---|")
    for name, p in ppl.items():
        print(f"| {name} | {p:.3f} | {p / base - 1:+.2%} |")
    print(f"\nQAT recovers {(ptq - qat) / (ptq - base):.0%} of the perplexity PTQ lost")


def minilm(args, scratch: Path) -> None:
    from transformers import AutoTokenizer

    from slimport.evaluate.classification import sst2_accuracy
    from slimport.finetune import ensure_sst2_classifier, sst2_path

    model = Path(args.model) if args.model else ensure_sst2_classifier(recipe=args.recipe)
    pool, held_out = split_train(sst2_path("train"), args.holdout, scratch)
    config = w8a8_config(pool, args.seed)
    quantize(model, scratch / "ptq", config, progress=False)
    start = config
    if args.qat_observer != config.observer:
        start = dataclasses.replace(config, observer=args.qat_observer)
        quantize(model, scratch / "ptq-start", start, progress=False)
    report = quantize_aware(model, scratch / "qat", start, settings(args), overwrite=True)
    tok = AutoTokenizer.from_pretrained(model)
    sets = {"dev": sst2_path("dev")} | ({"held-out": held_out} if held_out else {})
    folders = {"fp32": None, "W8A8 static min_max (PTQ)": "ptq"}
    if start is not config:
        folders[f"W8A8 static {start.observer} (PTQ, QAT's start)"] = "ptq-start"
    folders[f"W8A8 + QAT {report['qat']['steps']} steps"] = "qat"
    res: dict[str, dict[str, dict]] = {}
    for name, folder in folders.items():
        m = float_model(model) if folder is None else load_simulated(scratch / folder)[0]
        ref = res.get("fp32", {})
        res[name] = {k: sst2_accuracy(m, tok, f, reference=ref.get(k)) for k, f in sets.items()}
    for r in res["fp32"].values():
        r["agreement"] = 1.0
    _print(args, report, f"MiniLM SST-2 classifier ({model.name}); W8A8 = int8 per-channel symmetric "
           "weights, int8 static per-tensor asymmetric inputs (min_max, 256 SST-2 train sentences); "
           f"QAT on {report['qat']['steps']} (of {args.steps} planned) x 32 SST-2 train sentences")  # fmt: skip
    if held_out:
        n = res["fp32"]["held-out"]["n"]
        print(f"held-out: {n} SST-2 train sentences ({args.holdout} drawn with seed 0, less those "
              "whose text the rest repeats) that neither calibration nor QAT draws from; the fp32 "
              "classifier was fine-tuned on them\n")  # fmt: skip
    print("| model | " + " | ".join(f"{k} accuracy | {k} disagreements" for k in sets) + " |")
    print("|---|" + "---|---|" * len(sets))
    for name, by_set in res.items():
        cells = [f"{r['accuracy']:.2%} | {flips(r)} of {r['n']}" for r in by_set.values()]
        print(f"| {name} | " + " | ".join(cells) + " |")
    ptq, qat = res["W8A8 static min_max (PTQ)"], list(res.values())[-1]
    for k in sets:
        if flips(ptq[k]):
            won = (flips(ptq[k]) - flips(qat[k])) / flips(ptq[k])
            print(f"\n{k}: QAT recovers {won:.0%} of the disagreement PTQ introduced "
                  f"({flips(ptq[k])} -> {flips(qat[k])}; binomial s.e. of a count c ~ sqrt(c))")  # fmt: skip


def w8a8_config(calib: Path, seed: int):
    """The MiniLM case: static W8A8, min_max ranges on 256 sentences of `calib`, no SmoothQuant."""
    return make_config(bits=8, activations="static", observer="min_max", num_samples=256,
                       calib_data=str(calib), seed=seed)  # fmt: skip


def flips(r: dict) -> int:
    return round((1 - r["agreement"]) * r["n"])


def split_train(train: Path, holdout: int, scratch: Path) -> tuple[Path, Path | None]:
    """SST-2 train split once (seed 0): `holdout` sentences kept out of calibration and QAT, on
    which agreement is counted too. Dev has 872 sentences and PTQ flips only 10-17 of them, so
    a handful either way is noise; a held-out set of thousands resolves a halving."""
    if not holdout:
        return train, None
    header, *rows = train.read_text().splitlines()
    if holdout >= len(rows):
        raise SystemExit(f"--holdout {holdout}: SST-2 train has {len(rows)} sentences")
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(0)).tolist()
    pool = [rows[i] for i in sorted(order[holdout:])]
    seen = {r.split("\t")[0] for r in pool}  # SST-2 repeats phrases: none held out is trained on
    held = [rows[i] for i in sorted(order[:holdout]) if rows[i].split("\t")[0] not in seen]
    out = []
    for name, part in (("pool", pool), ("held-out", held)):
        (path := scratch / f"sst2-{name}.tsv").write_text("\n".join([header, *part]) + "\n")
        out.append(path)
    return out[0], out[1]


def settings(args) -> QATSettings:
    return QATSettings(steps=args.steps, lr=args.lr, scale_lr=args.scale_lr, lsq=not args.no_lsq,
                       batch_size=args.batch_size, minutes=args.minutes, loss=args.loss,
                       temperature=args.temperature, margin_weight=args.margin_weight,
                       margin=args.margin, hidden_weight=args.hidden_weight, zero_lr=args.zero_lr,
                       float_lr=args.float_lr, sort_by_length=args.sort_by_length,
                       boundary=args.boundary)  # fmt: skip


def _print(args, report, what: str) -> None:
    q = report["qat"]
    print(header("python benchmarks/qat.py " + " ".join(sys.argv[1:]), ("torch", "transformers")))
    print()
    print(f"{what}; lr {args.lr}, log-scale lr {args.scale_lr}, LSQ {not args.no_lsq}, "
          f"zero-point lr {args.zero_lr}, float-parameter lr {args.float_lr}; loss {args.loss} (T {args.temperature}) + "
          f"{args.margin_weight} x margin hinge ({args.margin}) + {args.hidden_weight} x hidden MSE; "
          f"sorted by length {args.sort_by_length}; boundary share {args.boundary}; "
          f"{q['steps']} steps in {q['seconds'] / 60:.1f} min (1 thread, shared machine), "
          f"loss {sum(q['losses'][:5]) / 5:.4g} (first 5 steps) -> "
          f"{sum(q['losses'][-5:]) / 5:.4g} (last 5); {q['integers_changed']:.2%} of the integers changed")  # fmt: skip
    print()


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--case", choices=("smollm2", "minilm"), required=True)
    ap.add_argument(
        "--model", help="default: .cache/models/smollm2-135m, or the finetune classifier"
    )
    ap.add_argument("--recipe", default="full", help="minilm: the classifier's finetune recipe")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--scale-lr", type=float, default=1e-3)
    ap.add_argument("--no-lsq", action="store_true")
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--loss", choices=("kl", "mse"), default="kl")
    ap.add_argument("--temperature", type=float, default=1.0, help="of the KL loss")
    ap.add_argument("--margin-weight", type=float, default=0.0)
    ap.add_argument("--margin", type=float, default=1.0)
    ap.add_argument("--hidden-weight", type=float, default=0.0)
    ap.add_argument("--zero-lr", type=float, default=0.0, help="static input zero points")
    ap.add_argument("--float-lr", type=float, default=0.0, help="norms, biases, float Linears")
    ap.add_argument("--sort-by-length", action="store_true", help="encoders: less padding")
    ap.add_argument(
        "--boundary",
        type=float,
        default=0.0,
        help="minilm: share of QAT sentences drawn from the least decided (fp32 margin)",
    )
    ap.add_argument("--qat-observer", default="min_max", choices=("min_max", "ema_min_max",
                    "percentile", "mse", "kl"), help="minlm: the ranges QAT starts from")  # fmt: skip
    ap.add_argument(
        "--group-size", type=int, default=64, help="smollm2: 64 (128 does not divide 576)"
    )
    ap.add_argument("--seq-len", type=int, default=256, help="smollm2: QAT window tokens")
    ap.add_argument("--windows", type=int, default=16, help="smollm2: test windows of 512 tokens")
    ap.add_argument("--minutes", type=float, default=20.0)
    ap.add_argument(
        "--seed", type=int, default=0, help="minilm: of the calibration and QAT sentences"
    )
    ap.add_argument("--holdout", type=int, default=8000, help="minilm: SST-2 train sentences "
                    "kept out of calibration and QAT to count agreement on (0: dev only)")  # fmt: skip
    ap.add_argument("--scratch", default=".cache/bench-qat")
    ap.add_argument("--keep", action="store_true", help="keep the PTQ and QAT folders in --scratch")
    args = ap.parse_args()
    torch.set_num_threads(1)
    scratch = Path(args.scratch) / args.case
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    (smollm2 if args.case == "smollm2" else minilm)(args, scratch)
    if not args.keep:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
