"""Structured pruning that shrinks (issue #16): accuracy / perplexity cost and fp32 torch speed of
the smaller models, with and without a short recovery fine-tune.

sst2  the MiniLM SST-2 classifier (`slimport finetune`, recipe `ci`) with `--heads` of every
      layer's attention heads (0: none; the folder says so in transformers 4's `pruned_heads`)
      then `ratio` of its FFN channels removed (Wanda importance on 128 SST-2 *train*
      sentences); recovery = `slimport.finetune.finetune` from the pruned classifier (`--steps`
      steps, SST-2 train). Accuracy on SST-2 dev (872); ms per sentence = batch 1 over the first
      `--sentences` dev sentences, 1 torch thread, best of `--reps` interleaved passes (every
      model in each pass). `--tf4-python`: a python with transformers 4 loads every pruned
      folder with plain `from_pretrained` and its logits are compared with ours.
lm    SmolLM2-135M: heads (query heads per KV group) then FFN channels removed, Wanda importance
      on `--calib` 512-token WikiText-2 *valid* windows; perplexity on the first `--windows`
      512-token windows of WikiText-2 raw test (quant_vs_peers.py's protocol); recovery =
      `--steps` steps of LM loss on tinyshakespeare (never the test split). Speed: one 512-token
      window forward, best of `--reps`, 1 thread.

    .venv/bin/python benchmarks/structured_prune.py --task sst2 --heads 0.3 --ratios 0.3
    .venv/bin/python benchmarks/structured_prune.py --task lm --heads 0.33 --ratios 0.3
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(Path(__file__).parent))

from _machine import header  # noqa: E402

from slimport.compress.prune import structured  # noqa: E402
from slimport.data import shared_dir  # noqa: E402


@torch.no_grad()
def _best_seconds(models: dict, inputs: list[dict], reps: int) -> dict[str, float]:
    """Per model: the fastest of `reps` passes over `inputs`, the models interleaved so that
    load on the machine hits every model alike."""
    best = {k: float("inf") for k in models}
    for _ in range(reps):
        for name, m in models.items():
            t0 = time.perf_counter()
            for x in inputs:
                m(**x)
            best[name] = min(best[name], time.perf_counter() - t0)
    return best


def sst2(a) -> list[dict]:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from slimport.data import read_labeled
    from slimport.evaluate.classification import sst2_accuracy
    from slimport.finetune import (
        FinetuneSettings,
        default_model,
        ensure_sst2_classifier,
        finetune,
        sst2_path,
    )
    from slimport.io import pruned_heads

    dense_dir = ensure_sst2_classifier(recipe="ci", model=default_model(), progress=False)
    dev, train = sst2_path("dev"), sst2_path("train")
    tok = AutoTokenizer.from_pretrained(dense_dir)
    folders = {"dense": dense_dir}
    if a.steps:  # the control: what the same extra steps give the unpruned model
        rec = a.work / "dense-rec"
        settings = FinetuneSettings(max_steps=a.steps, lr=a.lr, minutes=30.0, seed=0)
        finetune(rec, dense_dir, settings, progress=False)
        folders[f"dense + {a.steps} steps"] = rec
    opts = dict(calib_data=train, num_samples=128, seq_len=128, overwrite=True)
    src, stem = dense_dir, ""
    if a.heads:
        src, stem = a.work / f"heads{a.heads}", f"heads {a.heads:.0%} + "
        structured.prune_structured(dense_dir, src, "heads", a.heads, **opts)
    for r in a.ratios:
        out = a.work / f"heads{a.heads}-ffn{r}"
        structured.prune_structured(src, out, "ffn", r, **opts)
        folders[f"{stem}ffn {r:.0%}"] = out
        if a.steps:
            rec = a.work / f"heads{a.heads}-ffn{r}-rec"
            settings = FinetuneSettings(max_steps=a.steps, lr=a.lr, minutes=30.0, seed=0)
            finetune(rec, out, settings, progress=False)
            folders[f"{stem}ffn {r:.0%} + {a.steps} steps"] = rec
    models = {k: pruned_heads.from_pretrained(AutoModelForSequenceClassification, f,
                                              dtype=torch.float32) for k, f in folders.items()}  # fmt: skip
    rows = [{"model": k, "accuracy": sst2_accuracy(m, tok, dev)["accuracy"],
             "params": structured.parameters(m)} for k, m in models.items()]  # fmt: skip
    texts = read_labeled(dev)[0]
    if a.tf4_python:
        for r in rows:
            r["tf4"] = _plain_transformers_4(a.tf4_python, folders[r["model"]], models[r["model"]],
                                             tok, texts[:32])  # fmt: skip
    return speed(rows, models, tok, texts[: a.sentences], a.reps)


TF4_PROBE = """
import sys, numpy as np, torch, transformers
m = transformers.AutoModelForSequenceClassification.from_pretrained(sys.argv[1]).eval()
x = np.load(sys.argv[2])
with torch.no_grad():
    y = m(input_ids=torch.from_numpy(x["ids"]), attention_mask=torch.from_numpy(x["mask"])).logits
np.save(sys.argv[3], y.numpy())
print(transformers.__version__)
"""


def _plain_transformers_4(python: str, folder: Path, model, tok, texts: list[str]) -> str:
    """Load `folder` with plain transformers 4 in another python; max |Δlogits| vs `model`."""
    import subprocess
    import tempfile

    import numpy as np

    x = tok(texts, padding=True, return_tensors="pt")
    with tempfile.TemporaryDirectory() as d:
        np.savez(f"{d}/x.npz", ids=x["input_ids"].numpy(), mask=x["attention_mask"].numpy())
        run = subprocess.run([python, "-c", TF4_PROBE, str(folder), f"{d}/x.npz", f"{d}/y.npy"],
                             capture_output=True, text=True)  # fmt: skip
        if run.returncode:
            return "fails: " + run.stderr.strip().splitlines()[-1][:120]
        with torch.no_grad():
            ours = model(**x).logits.numpy()
        diff = float(np.abs(np.load(f"{d}/y.npy") - ours).max())
    return f"{run.stdout.strip()}: {diff:.1e}"


def speed(rows: list[dict], models: dict, tok, texts: list[str], reps: int) -> list[dict]:
    """ms per sentence at batch 1 (latency: per-op overhead weighs in) and in padded batches of
    32 (throughput: the matrix products dominate)."""
    one = [dict(tok(t, return_tensors="pt")) for t in texts]
    many = [dict(tok(texts[i : i + 32], padding=True, return_tensors="pt"))
            for i in range(0, len(texts), 32)]  # fmt: skip
    s1, s32 = _best_seconds(models, one, reps), _best_seconds(models, many, reps)
    for r in rows:
        r["ms"], r["ms32"] = 1e3 * s1[r["model"]] / len(texts), 1e3 * s32[r["model"]] / len(texts)
    return rows


def _lm_recover(folder: Path, out: Path, steps: int, lr: float, data: Path, seq: int = 256,
                batch: int = 4):  # fmt: skip
    """`steps` steps of next-token loss on windows of `data` (AdamW, linear decay); an `out`
    that holds a model already (an earlier run's) is reused."""
    if (out / "config.json").is_file() and (out / "tokenizer.json").is_file():
        return
    from transformers import AutoModelForCausalLM

    from slimport.data import calibration_batches
    from slimport.io.hf import load_tokenizer

    tok = load_tokenizer(folder)
    ids = calibration_batches(tok, data, steps * batch, seq, seed=1)
    net = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    net.model.embed_tokens.weight.requires_grad_(False)  # tied with lm_head: half the parameters
    net.train()
    opt = torch.optim.AdamW(
        [p for p in net.parameters() if p.requires_grad], lr=lr, weight_decay=0.0
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 - s / steps)
    for i in range(steps):
        x = ids[i * batch : (i + 1) * batch]
        net(input_ids=x, labels=x).loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    net.eval().save_pretrained(out)
    for f in folder.iterdir():
        if f.name.startswith("tokenizer") or f.suffix == ".jinja":
            shutil.copy2(f, out / f.name)


def lm(a) -> list[dict]:
    from quant_vs_peers import MODEL, SEQ_LEN, TEST, VALID, ensure_model
    from transformers import AutoModelForCausalLM

    from slimport.data import wikitext_windows
    from slimport.evaluate.perplexity import perplexity
    from slimport.io.hf import load_tokenizer

    ensure_model(MODEL)
    shared = shared_dir()
    windows = wikitext_windows(load_tokenizer(MODEL), shared / TEST, SEQ_LEN, a.windows)
    folders = {"dense": MODEL}
    for r in a.ratios:
        heads = a.work / f"heads{a.heads}"
        opts = dict(calib_data=shared / VALID, num_samples=a.calib, seq_len=SEQ_LEN, overwrite=True)
        if a.heads:
            structured.prune_structured(MODEL, heads, "heads", a.heads, **opts)
        out = a.work / f"heads{a.heads}-ffn{r}"
        structured.prune_structured(heads if a.heads else MODEL, out, "ffn", r, **opts)
        name = f"heads {a.heads:.0%} + ffn {r:.0%}" if a.heads else f"ffn {r:.0%}"
        folders[name] = out
        if a.steps:
            rec = a.work / f"{out.name}-rec"
            _lm_recover(out, rec, a.steps, a.lr, shared / a.lm_data)
            folders[f"{name} + {a.steps} steps"] = rec
    if a.steps:  # the control: the same steps on the dense model (what training alone buys)
        control = a.work / "dense-rec"
        _lm_recover(MODEL, control, a.steps, a.lr, shared / a.lm_data)
        folders[f"dense + {a.steps} steps"] = control
    rows = []
    for k, f in folders.items():
        m = AutoModelForCausalLM.from_pretrained(f, dtype=torch.float32).eval()
        ppl = perplexity(m, windows, progress=False)["perplexity"]
        rows.append({"model": k, "perplexity": ppl, "params": structured.parameters(m)})
        del m
    models = {
        k: AutoModelForCausalLM.from_pretrained(f, dtype=torch.float32).eval()
        for k, f in folders.items()
    }
    secs = _best_seconds(models, [{"input_ids": windows[:1]}], a.reps)
    for row in rows:
        row["ms"] = 1e3 * secs[row["model"]]
    return rows


def table(rows: list[dict], metric: str, unit: str) -> str:
    d = rows[0]
    cols = ["model", metric, "params (M)", unit, "speed-up"]
    if "ms32" in d:
        cols += ["ms / sentence, batch 32", "speed-up"]
    if "tf4" in d:
        cols.append("plain transformers 4 loads it: max |Δlogits| vs ours")
    lines = ["| " + " | ".join(cols) + " |", "|---" * len(cols) + "|"]
    for r in rows:
        v = f"{r[metric]:.2%}" if metric == "accuracy" else f"{r[metric]:.2f}"
        cells = [
            r["model"],
            v,
            f"{r['params'] / 1e6:.2f}",
            f"{r['ms']:.2f}",
            f"{d['ms'] / r['ms']:.2f}x",
        ]
        if "ms32" in d:
            cells += [f"{r['ms32']:.3f}", f"{d['ms32'] / r['ms32']:.2f}x"]
        if "tf4" in d:
            cells.append(r["tf4"])
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--task", choices=("sst2", "lm"), default="sst2")
    ap.add_argument("--ratios", default="0.3", help="comma-separated FFN ratios")
    ap.add_argument("--heads", type=float, default=None,
                    help="head ratio removed first (0: none; default lm 0.33, sst2 0.3)")  # fmt: skip
    ap.add_argument("--tf4-python", help="sst2: a python with transformers 4 (see the docstring)")
    ap.add_argument("--steps", type=int, default=200, help="recovery fine-tune steps (0: none)")
    ap.add_argument("--lr", type=float, default=None, help="recovery lr (sst2 1e-4, lm 5e-5)")
    ap.add_argument("--lm-data", default="data/tinyshakespeare/input.txt",
                    help="lm: recovery text under ../shared (never the test split)")  # fmt: skip
    ap.add_argument("--sentences", type=int, default=200)
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--calib", type=int, default=32)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--work", type=Path, default=ROOT / ".cache" / "structured")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    a.ratios = [float(x) for x in a.ratios.split(",")]
    a.lr = a.lr or (1e-4 if a.task == "sst2" else 5e-5)
    a.heads = a.heads if a.heads is not None else (0.3 if a.task == "sst2" else 0.33)
    torch.set_num_threads(a.threads)
    a.work.mkdir(parents=True, exist_ok=True)
    rows = sst2(a) if a.task == "sst2" else lm(a)
    print(
        header(
            "python benchmarks/structured_prune.py " + " ".join(sys.argv[1:]),
            ("torch", "transformers"),
        )
    )
    print()
    print(
        table(
            rows,
            *(("accuracy", "ms / sentence") if a.task == "sst2" else ("perplexity", "ms / window")),
        )
    )
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
