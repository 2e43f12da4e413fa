"""One-shot pruning of SmolLM2-135M: slimport's magnitude / Wanda / SparseGPT against
llm-compressor's SparseGPTModifier and WandaPruningModifier (issue #16).

Protocol (benchmarks/quant_vs_peers.py's): every Linear of the blocks pruned, the (tied)
embedding / lm_head dense in every row; calibration = `--calib` windows of 512 tokens from the
WikiText-2 *valid* split (uniform random starts, seed 0, `slimport.data.calibration_batches`);
evaluation = the first 16 non-overlapping 512-token windows of WikiText-2 raw *test*, perplexity
= exp(mean per-window NLL). The tokens are cut once, here, and every row gets the very same
tensors. Rows: dense; 50% unstructured and 2:4 for magnitude, Wanda, SparseGPT (ours and the
peer's); SparseGPT 50% then GPTQ W4 g64 asymmetric on the kept weights (pruned stay zero);
SparseGPT 50% / 2:4 + KD: the pruned folder distilled from the dense model with its zeros kept
(`slimport distill --keep-sparsity`, `--recover-steps` steps of 4 WikiText-2 valid windows).

Each row runs in its own subprocess; "prune s" is the wall time of the pruning call alone (ours:
`slimport.compress.prune.api.prune` from the checkpoint folder to the written output folder,
tokenizing the calibration text itself; the peer: `llmcompressor.oneshot` on the loaded model
and the tokens, nothing saved; both after their imports). "sparsity" is measured on the
resulting model: the zero fraction of the blocks' Linear weights. Every model is evaluated on CPU
in float32 with the same code.

llm-compressor lives in its own venv (its pins differ from slimport's .venv; torch is the same
2.13.0 CPU wheel):

    python3 -m venv /work/venv-llmc && /work/venv-llmc/bin/pip install torch==2.13.0 llmcompressor
    .venv/bin/python benchmarks/prune_vs_peers.py --peer-python /work/venv-llmc/bin/python
    .venv/bin/python benchmarks/prune_vs_peers.py --windows 2 --calib 4 --only dense,magnitude  # smoke
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))  # workers in the peer venv import slimport from the checkout
sys.path.insert(0, str(Path(__file__).parent))

from quant_vs_peers import MODEL, SEQ_LEN, VALID, _load_fp32, ensure_model, make_data  # noqa: E402

GROUP = 64
# row -> (label, runner, options)
ROWS = {
    "dense": ("dense fp32", "dense", {}),
    "magnitude": ("slimport magnitude 50%", "ours", {"method": "magnitude"}),
    "wanda": ("slimport Wanda 50%", "ours", {"method": "wanda"}),
    "sparsegpt": ("slimport SparseGPT 50%", "ours", {"method": "sparsegpt"}),
    "magnitude-2:4": ("slimport magnitude 2:4", "ours", {"method": "magnitude", "pattern": "2:4"}),
    "wanda-2:4": ("slimport Wanda 2:4", "ours", {"method": "wanda", "pattern": "2:4"}),
    "sparsegpt-2:4": ("slimport SparseGPT 2:4", "ours", {"method": "sparsegpt", "pattern": "2:4"}),
    "sparsegpt+w4": (
        "slimport SparseGPT 50% + GPTQ W4 g64",
        "ours",
        {"method": "sparsegpt", "bits": 4, "group_size": GROUP, "symmetric": False},
    ),
    # recovery: the pruned row's folder (re-pruned if that row did not run first) distilled from
    # the dense model with its zeros kept (slimport distill --keep-sparsity)
    "sparsegpt+kd": ("slimport SparseGPT 50% + KD", "ours", {"method": "sparsegpt", "recover": "sparsegpt"}),
    "sparsegpt-2:4+kd": ("slimport SparseGPT 2:4 + KD", "ours", {"method": "sparsegpt", "pattern": "2:4", "recover": "sparsegpt-2:4"}),
    "llmc-sparsegpt": ("llm-compressor SparseGPTModifier 50%", "llmc", {"kind": "sparsegpt", "mask": "0:0"}),
    "llmc-wanda": ("llm-compressor WandaPruningModifier 50%", "llmc", {"kind": "wanda", "mask": "0:0"}),
    "llmc-sparsegpt-2:4": ("llm-compressor SparseGPTModifier 2:4", "llmc", {"kind": "sparsegpt", "mask": "2:4"}),
    "llmc-wanda-2:4": ("llm-compressor WandaPruningModifier 2:4", "llmc", {"kind": "wanda", "mask": "2:4"}),
}  # fmt: skip
# the targets: ours <= the peer's perplexity at equal sparsity, in <= its time
PAIRS = {"sparsegpt": "llmc-sparsegpt", "wanda": "llmc-wanda",
         "sparsegpt-2:4": "llmc-sparsegpt-2:4", "wanda-2:4": "llmc-wanda-2:4"}  # fmt: skip
RATIO = {"sparsegpt": 1.6, "sparsegpt-2:4": 2.0, "sparsegpt+kd": 1.6, "sparsegpt-2:4+kd": 2.0}
# the compared pairs first: a run cut short still answers the targets
ORDER = ("dense", *(x for pair in PAIRS.items() for x in pair), "magnitude", "magnitude-2:4",
         "sparsegpt+w4")  # fmt: skip


# ----------------------------------------------------------------- workers (one per subprocess)
def _sparsity(model) -> float:
    """Zero fraction of the blocks' Linear weights (QuantLinear: the dequantized weight)."""
    zeros = total = 0
    for m in model.model.layers.modules():
        w = getattr(m, "weight", None)
        if w is not None and w.dim() == 2:
            zeros += int((w == 0).sum())
            total += w.numel()
    return zeros / total


def work_dense(a, calib, out):
    return _load_fp32(a.model), None


def work_ours(a, calib, out):
    from slimport.compress.prune import api

    opts = dict(ROWS[a.worker][2])
    recover = opts.pop("recover", None)
    pruned = out.parent / _folder(recover) if recover else out
    _warm_imports(a.model)
    seconds = None  # a folder an earlier row (or a kept --work) pruned: no time of its own
    if not (pruned / "config.json").is_file():
        t0 = time.perf_counter()
        api.prune(
            a.model, pruned, progress=False, calib_data=str(a.shared / VALID),
            num_samples=len(calib), seq_len=SEQ_LEN, seed=0, **opts,
        )  # fmt: skip
        seconds = time.perf_counter() - t0
    if recover:
        return _recover(a, pruned, out), seconds
    if "bits" in opts:
        from slimport.compress.quant.compressed import load_simulated

        return load_simulated(out)[0], seconds
    return _load_fp32(str(out)), seconds


def _warm_imports(model: Path) -> None:
    """The modules our pruning imports, imported before its clock starts: the peer's clock
    starts after `import llmcompressor` and the model's load, which import them too."""
    import transformers

    from slimport.compress import pipeline  # noqa: F401

    config = transformers.AutoConfig.from_pretrained(model)
    getattr(transformers, config.architectures[0])


def _recover(a, pruned: Path, out: Path):
    """Distil the dense model into the pruned one, zeros kept; WikiText-2 *valid* windows (the
    calibration split, never the test one), T = 1, the teacher's top-64 logits cached."""
    from slimport.compress.distill import DistillSettings, distill

    s = DistillSettings(alpha=1.0, temperature=1.0, max_steps=a.recover_steps, batch_size=4,
                        seq_len=a.recover_seq_len, lr=a.recover_lr, top_k=64, keep_sparsity=True,
                        threads=a.threads, minutes=10_000, seed=0)  # fmt: skip
    report = distill(a.model, out, student=str(pruned), task="lm", train=a.shared / VALID,
                     settings=s, cache_dir=out.parent / "kd-cache", progress=False)  # fmt: skip
    a.recover_info = {"steps": report["steps"], "train_seconds": report["train_seconds"],
                      "teacher_seconds": report["teacher_cache"]["seconds"],
                      "first_loss": report["losses"][0], "last_loss": report["losses"][-1]}  # fmt: skip
    return _load_fp32(str(out))


def _folder(name: str) -> str:
    return name.replace(":", "_").replace("+", "_")


def work_llmc(a, calib, out):
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.pruning import SparseGPTModifier, WandaPruningModifier

    opts = ROWS[a.worker][2]
    cls = SparseGPTModifier if opts["kind"] == "sparsegpt" else WandaPruningModifier
    extra = {"dampening_frac": 0.01, "block_size": 128} if opts["kind"] == "sparsegpt" else {}
    recipe = cls(sparsity=0.5, mask_structure=opts["mask"], targets=["Linear"],
                 ignore=["lm_head"], **extra)  # fmt: skip
    model = _load_fp32(a.model)
    ds = Dataset.from_dict({"input_ids": calib.tolist(), "attention_mask": [[1] * calib.shape[1]] * len(calib)})  # fmt: skip
    t0 = time.perf_counter()
    model = oneshot(
        model=model, dataset=ds, recipe=recipe, num_calibration_samples=len(calib),
        max_seq_length=calib.shape[1], shuffle_calibration_samples=False,
    )  # fmt: skip
    return model, time.perf_counter() - t0


WORKERS = {"dense": work_dense, "ours": work_ours, "llmc": work_llmc}


def worker(a) -> None:
    import importlib.metadata as md

    import torch

    from slimport.evaluate.perplexity import perplexity

    torch.set_num_threads(a.threads)
    data = torch.load(a.data, weights_only=True)
    calib, windows = data["calib"], data["windows"]
    runner = ROWS[a.worker][1]
    version = ""
    if runner == "llmc":
        try:
            version = md.version("llmcompressor")
            import llmcompressor  # noqa: F401
        except (md.PackageNotFoundError, ImportError) as e:
            print("RESULT " + json.dumps({"skipped": f"llmcompressor not installed ({e})"}))
            return
    model, seconds = WORKERS[runner](a, calib, Path(a.out))
    model.eval()
    ppl = perplexity(model, windows, progress=False)
    result = {"perplexity": ppl["perplexity"], "seconds": seconds, "sparsity": _sparsity(model),
              "version": version, "recovery": getattr(a, "recover_info", None)}  # fmt: skip
    print("RESULT " + json.dumps(result))


# ----------------------------------------------------------------- driver
def run_one(name: str, a, data: Path, work: Path) -> dict:
    python = a.peer_python if ROWS[name][1] == "llmc" and a.peer_python else sys.executable
    from _workers import run_row

    argv = [__file__, "--worker", name, "--model", str(a.model), "--data", str(data),
            "--out", str(work / _folder(name)), "--threads", str(a.threads),
            "--shared", str(a.shared), "--recover-steps", str(a.recover_steps),
            "--recover-lr", str(a.recover_lr), "--recover-seq-len", str(a.recover_seq_len)]  # fmt: skip
    return run_row(python, argv, a.threads, name)


def verdicts(rows: dict[str, dict]) -> list[str]:
    """The issue's targets, each with the measured numbers and met / not met."""
    out = []
    dense = rows.get("dense", {}).get("perplexity")
    for ours, peer in PAIRS.items():
        r, p = rows.get(ours, {}), rows.get(peer, {})
        if "perplexity" in r and "perplexity" in p and None not in (r["seconds"], p["seconds"]):
            ok_ppl = r["perplexity"] <= p["perplexity"]
            ok_time = r["seconds"] <= p["seconds"]
            out.append(
                f"- {ROWS[ours][0]} vs {ROWS[peer][0]}: perplexity {r['perplexity']:.2f} vs "
                f"{p['perplexity']:.2f} ({'met' if ok_ppl else 'NOT met'}), time "
                f"{r['seconds']:.0f} s vs {p['seconds']:.0f} s ({'met' if ok_time else 'NOT met'})"
            )
    for name, ratio in RATIO.items():
        r = rows.get(name, {})
        if dense and "perplexity" in r:
            got = r["perplexity"] / dense
            out.append(
                f"- {ROWS[name][0]} <= {ratio}x dense: {got:.2f}x ({'met' if got <= ratio else 'NOT met'})"
            )
    return out


def _when(r: dict) -> str:
    return f"{r['started_utc']}-{r['finished_utc']}" if "started_utc" in r else "-"


def _load(r: dict) -> str:
    return " / ".join(f"{x:.1f}" for x in r["loadavg"]) if "loadavg" in r else "-"


def table(rows: dict[str, dict], a, command: str) -> str:
    from _machine import header

    lines = [
        header(command, ("torch", "transformers", "compressed-tensors")),
        *([f"peer: {a.peer_versions}"] if a.peer_versions else []),
        f"protocol: blocks' Linears pruned, lm_head/embedding dense; {a.calib} x {SEQ_LEN} "
        f"calibration tokens (WikiText-2 valid, seed 0); {a.windows} x {SEQ_LEN} test windows "
        f"(WikiText-2 raw test); {a.threads} thread(s) per row",
        "",
        "| method | perplexity | x dense | prune s | sparsity (measured) | row wall s | UTC | load avg (1/5/15 min, at its end) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    dense = rows.get("dense", {}).get("perplexity")
    for name, r in rows.items():
        label = ROWS[name][0]
        if "perplexity" not in r:
            why = r.get("skipped") or f"failed: {r.get('error', '?')}"
            lines.append(f"| {label} | {why} | - | - | - | - | {_when(r)} | {_load(r)} |")
            continue
        secs = "-" if r["seconds"] is None else f"{r['seconds']:.1f}"
        x = f"{r['perplexity'] / dense:.2f}" if dense else "-"
        wall = f"{r['wall_seconds']:.0f}" if "wall_seconds" in r else "-"
        lines.append(f"| {label} | {r['perplexity']:.2f} | {x} | {secs} | {r['sparsity']:.4f} "
                     f"| {wall} | {_when(r)} | {_load(r)} |")  # fmt: skip
    for name, r in rows.items():
        if r.get("recovery"):
            k = r["recovery"]
            lines.append(f"- {ROWS[name][0]}: {k['steps']} distillation steps from the dense model "
                         f"(teacher logits {k['teacher_seconds']:.0f} s, training "
                         f"{k['train_seconds']:.0f} s; KD loss {k['first_loss']:.3f} -> "
                         f"{k['last_loss']:.3f}); 'prune s' is the pruning alone")  # fmt: skip
    return "\n".join([*lines, "", *verdicts(rows)])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--windows", type=int, default=16, help="test windows of 512 tokens")
    ap.add_argument("--calib", type=int, default=64, help="calibration windows of 512 tokens")
    ap.add_argument("--only", default=None, help="comma-separated subset of: " + ",".join(ROWS))
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads per row (1: on a shared 2-core machine 2 threads ran "
                    "SparseGPT's column loop 18x slower)")  # fmt: skip
    ap.add_argument("--peer-python", default="/work/venv-llmc/bin/python",
                    help="python of the venv with llmcompressor")  # fmt: skip
    ap.add_argument("--json", default=None,
                    help="also write the rows as JSON here (after every row: a run cut short keeps "
                    "the rows it finished)")  # fmt: skip
    ap.add_argument("--from-json", default=None,
                    help="print the table of a JSON written by --json (e.g. of a run cut short)")  # fmt: skip
    ap.add_argument(
        "--recover-steps",
        type=int,
        default=200,
        help="+kd rows: distillation steps (4 windows a step)",
    )
    ap.add_argument("--recover-lr", type=float, default=1e-4, help="+kd rows: AdamW learning rate")
    ap.add_argument("--recover-seq-len", type=int, default=256, help="+kd rows: tokens per window")
    ap.add_argument("--model", type=Path, default=MODEL, help="fp32 SmolLM2 HF folder")
    ap.add_argument(
        "--work",
        default=None,
        help="a folder kept after the run (pruned folders, teacher cache) to resume in",
    )
    ap.add_argument("--shared", type=Path, default=None, help="the shared data folder")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.shared is None:
        from slimport.data import shared_dir

        a.shared = shared_dir()
    if a.worker:
        return worker(a)
    if a.from_json:
        saved = json.loads(Path(a.from_json).read_text())
        for k, v in saved["meta"].items():
            setattr(a, k, v)
        print(table(saved["rows"], a, a.command))
        return
    if a.peer_python and not Path(a.peer_python).exists():
        a.peer_python = None
    names = ORDER if a.only is None else tuple(a.only.split(","))
    unknown = [n for n in names if n not in ROWS]
    if unknown:
        raise SystemExit(f"unknown row(s) {', '.join(unknown)}; choose from {', '.join(ROWS)}")
    ensure_model(a.model)
    command = "python benchmarks/prune_vs_peers.py " + shlex.join(sys.argv[1:])
    # --work keeps the pruned folders and the teacher's logit cache: a cut-off +kd run restarted
    # with the same --work skips the pruning and the teacher pass
    work = Path(a.work) if a.work else Path(tempfile.mkdtemp(prefix="prune-vs-peers-"))
    work.mkdir(parents=True, exist_ok=True)
    rows: dict[str, dict] = {}
    a.peer_versions = peer_versions(a.peer_python) if a.peer_python else ""
    meta = {"command": command, "windows": a.windows, "calib": a.calib, "threads": a.threads,
            "peer_versions": a.peer_versions}  # fmt: skip
    try:
        data = work / "tokens.pt"
        make_data(a.model, a.shared, a.windows, a.calib, data)
        for name in names:
            print(f"{name} ...", file=sys.stderr, flush=True)
            started = time.strftime("%H:%M:%S", time.gmtime())
            rows[name] = r = run_one(name, a, data, work)
            # wall clock and the machine's load: on a shared machine the times need both
            r.update(started_utc=started, finished_utc=time.strftime("%H:%M:%S", time.gmtime()),
                     loadavg=os.getloadavg())  # fmt: skip
            if "perplexity" in r:
                print(f"  ppl {r['perplexity']:.2f}, prune {r['seconds'] or 0:.1f} s, "
                      f"sparsity {r['sparsity']:.4f}", file=sys.stderr, flush=True)  # fmt: skip
            if a.json:  # rows so far, in case the run is cut short
                Path(a.json).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    finally:
        if not a.work:
            shutil.rmtree(work, ignore_errors=True)
    text = table(rows, a, command)
    print()
    print(text)


def peer_versions(python: str) -> str:
    """llm-compressor's version and its venv's torch / transformers / compressed-tensors."""
    v = subprocess.run(
        [python, "-c", "import importlib.metadata as m; print(*(m.version(p) for p in "
         "('llmcompressor', 'torch', 'transformers', 'compressed-tensors')))"],
        capture_output=True, text=True, check=False,
    ).stdout.split()  # fmt: skip
    if len(v) != 4:
        return ""
    return (f"llmcompressor {v[0]} (its venv: torch {v[1]}, transformers {v[2]}, "
            f"compressed-tensors {v[3]})")  # fmt: skip


if __name__ == "__main__":
    main()
