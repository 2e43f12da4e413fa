"""`slimport verify SRC TARGET`: does the converted model compute what the source computes?

The source runs in PyTorch/transformers (natively when transformers reads its format: an HF
folder or a GGUF file; otherwise through slimport's HF conversion, which the report says),
the target in the chosen runtime (MindSpore by default; ONNX Runtime for an exported ONNX folder,
whose tensors are its graph's initializers, integer Linears dequantized). Measured, not assumed:
* per tensor: every hub tensor of the two checkpoints (max|Δ|, L2 of Δ);
* per layer: the hidden state after every block;
* end to end: logits (or last_hidden_state) max|Δ|, max relative Δ, top-1 agreement, cosine;
* causal LMs: N greedy tokens compared token by token (RoPE layout bugs show only later).

The pass criterion is fidelity, scaled to the model (an fp32 conversion of SmolLM2 differs by
~8e-5 in logits of magnitude ~20: a fixed absolute bound fails faithful conversions of models
with large logits): relative error max|Δ| / max|ref| of the outputs and of every tensor at most
`rtol`, top-1 agreement at least `min_top1`, identical greedy tokens; `atol`, when given, bounds
max|Δ| of the outputs and every tensor as well.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from slimport.arch.layout import is_causal_lm
from slimport.errors import SlimportError, name_list
from slimport.evaluate.parity import checkpoint_diff_stats, delta
from slimport.runtime.torch.runner import Outputs, TorchRunner, describe

DEFAULT_PROMPT = "The quick brown fox jumps over the lazy dog. Once upon a time, there was"


class MindSporeRunner:
    """A checkpoint run by slimport's MindSpore models."""

    def __init__(self, path: str | Path, mode: str = "pynative"):
        import mindspore as ms  # optional and slow to import: only for --runtime mindspore

        from slimport.runtime.mindspore import auto as sms

        ms.set_context(mode=ms.GRAPH_MODE if mode == "graph" else ms.PYNATIVE_MODE)
        _, _, arch = describe(path)
        self.causal = is_causal_lm({"architectures": [arch]})
        auto = (
            sms.AutoModelForCausalLM
            if self.causal
            else sms.AutoModelForSequenceClassification
            if "ForSequenceClassification" in arch
            else sms.AutoModel
        )
        self.model = auto.from_pretrained(path)
        self.model.set_train(False)
        self.name = f"MindSpore {type(self.model).__name__} ({mode})"
        self.note = ""

    def forward(self, ids: np.ndarray, mask: np.ndarray) -> Outputs:
        import mindspore as ms

        out = self.model(
            ms.Tensor(ids.astype(np.int32)),
            ms.Tensor(mask.astype(np.int32)),
            output_hidden_states=True,
        )
        name = "logits" if "logits" in out else "last_hidden_state"
        hidden = out.get("hidden_states") or ()
        return Outputs(out[name].asnumpy(), name, [h.asnumpy() for h in hidden])

    def greedy(self, ids: np.ndarray, n: int, eos: int | None) -> list[int]:
        out = self.model.generate(
            ids.astype(np.int32), max_new_tokens=n, do_sample=False, eos_token_id=eos
        )
        out = out.asnumpy() if hasattr(out, "asnumpy") else np.asarray(out)
        return out[0, ids.shape[1] :].tolist()


def _inputs(src: Path, target: Path, prompt: str, vocab: int) -> tuple[np.ndarray, str]:
    """Token ids of `prompt` with the model's own tokenizer when one is beside either file."""
    from transformers import AutoTokenizer

    for p in (Path(src), Path(target)):
        try:
            if p.suffix == ".gguf":
                tok = AutoTokenizer.from_pretrained(p.parent, gguf_file=p.name)
            else:
                folder = p if p.is_dir() else p.parent
                if not any(
                    (folder / f).exists()
                    for f in ("tokenizer.json", "vocab.txt", "tokenizer.model")
                ):
                    continue
                tok = AutoTokenizer.from_pretrained(folder)
            return np.array(
                [tok(prompt).input_ids], dtype=np.int64
            ), f"tokenized by {p}'s tokenizer"
        except (OSError, ValueError):
            continue
    ids = (np.arange(16, dtype=np.int64) * 7919 + 1) % vocab  # no tokenizer: fixed spread of ids
    return ids[None, :], "fixed token ids (no tokenizer found)"


RUNTIMES = ("mindspore", "torch", "onnx")


def default_runtime(target: str | Path) -> str:
    """ONNX Runtime for an exported ONNX folder, MindSpore for anything else."""
    p = Path(target)
    return "onnx" if p.is_dir() and (p / "model.onnx").is_file() else "mindspore"


def _onnx_tensor_stats(src: str | Path, runner) -> dict[str, dict]:
    """Per hub tensor max|Δ| and L2 of Δ between SRC and the graph's initializers (integer
    Linears dequantized from the integers the graph holds)."""
    from slimport.convert.loader import load

    model = load(src, integer_linears=True)
    try:
        theirs = runner.tensors()
        missing = set(model.hub) - set(theirs)
        if missing:
            raise SlimportError(f"{runner.folder}: the graph lacks tensor(s) {name_list(missing)}")
        out = {}
        for name, planned in model.hub.items():
            a = planned.compute().double()
            b = torch.from_numpy(theirs[name]).double()
            if a.shape != b.shape:
                raise SlimportError(f"{name}: shape {list(a.shape)} in {src}, {list(b.shape)} in {runner.folder}")  # fmt: skip
            d = a - b
            out[name] = {"max_abs": d.abs().max().item() if d.numel() else 0.0,
                         "l2": torch.linalg.vector_norm(d).item(),
                         "max_ref": a.abs().max().item() if a.numel() else 0.0}  # fmt: skip
        return out
    finally:
        model.source.close()


def verify(
    src: str | Path,
    target: str | Path,
    runtime: str | None = None,
    rtol: float = 1e-4,
    min_top1: float = 1.0,
    atol: float | None = None,
    tokens: int = 16,
    prompt: str = DEFAULT_PROMPT,
    mode: str = "pynative",
    progress: bool = False,
) -> dict:
    """Compare `target` (run in `runtime`; default: ONNX Runtime for an exported ONNX folder,
    else MindSpore) against `src` (run in transformers); a report dict whose `checks` list each
    measure against its limit and `passed` says whether all held (see the module docstring)."""
    runtime = runtime or default_runtime(target)
    if runtime not in RUNTIMES:
        raise SlimportError(f"unknown --runtime {runtime!r}", hint="one of: " + ", ".join(RUNTIMES))
    tgt = None
    if runtime == "onnx":
        from slimport.runtime.onnx.runner import OnnxRunner

        tgt = OnnxRunner(target)  # first: a folder that is no export fails before any work
    report: dict = {
        "source": str(src),
        "target": str(target),
        "runtime": runtime,
        "criterion": {"rtol": rtol, "min_top1": min_top1, "greedy": "identical", "atol": atol},
        "notes": [],
    }
    steps = ["tensors", "reference model", f"{runtime} model", "forward", "greedy"]
    bar = tqdm(total=len(steps), desc="verify", unit="step", disable=not progress or None)

    def step(i: int) -> None:
        bar.update(i - bar.n)
        bar.set_postfix_str(steps[i] if i < len(steps) else "done")

    step(0)
    report["tensors"] = (
        _onnx_tensor_stats(src, tgt) if tgt is not None else checkpoint_diff_stats(src, target)
    )
    with bar, tempfile.TemporaryDirectory() as tmp:
        step(1)
        ref = TorchRunner(src, Path(tmp))
        step(2)
        if runtime == "mindspore":
            tgt = MindSporeRunner(target, mode)
        elif runtime == "torch":
            tgt = TorchRunner(target, Path(tmp) / "t")
        report["reference"], report["candidate"] = ref.name, tgt.name
        report["notes"] += [n for n in (ref.note, tgt.note) if n]
        vocab = int(ref.model.config.vocab_size)
        ids, how = _inputs(Path(src), Path(target), prompt, vocab)
        report["inputs"] = {"tokens": int(ids.shape[1]), "how": how}
        mask = np.ones_like(ids)
        step(3)
        a, b = ref.forward(ids, mask), tgt.forward(ids, mask)
        report["layers"] = [
            {"layer": i, "max_abs": delta(torch.from_numpy(x), torch.from_numpy(y)).max_abs}
            for i, (x, y) in enumerate(zip(a.hidden_states, b.hidden_states, strict=False))
        ]
        d = delta(torch.from_numpy(b.main), torch.from_numpy(a.main))  # max_rel: over max|ref|
        top1 = (
            float((a.main.argmax(-1) == b.main.argmax(-1)).mean())
            if a.main_name == "logits"
            else None
        )
        report["output"] = {
            "name": a.main_name, "max_abs": d.max_abs, "max_rel": d.max_rel, "cosine": d.cosine,
            "top1_agreement": top1,
        }  # fmt: skip
        step(4)
        if ref.causal and tgt.causal and tokens > 0:
            eos = getattr(ref.model.generation_config, "eos_token_id", None)
            eos = eos[0] if isinstance(eos, list) else eos
            ra, rb = ref.greedy(ids, tokens, eos), tgt.greedy(ids, tokens, eos)
            first = next((i for i, (x, y) in enumerate(zip(ra, rb, strict=False)) if x != y), None)
            if first is None and len(ra) != len(rb):
                first = min(len(ra), len(rb))
            report["greedy"] = {
                "tokens": tokens,
                "reference": ra,
                "candidate": rb,
                "first_difference": first,
            }
        step(5)
    report["checks"] = _checks(report, rtol, min_top1, atol)
    report["passed"] = all(c["passed"] for c in report["checks"])
    return report


def _checks(report: dict, rtol: float, min_top1: float, atol: float | None) -> list[dict]:
    """Each measure of the pass criterion with its limit: what `passed` is the AND of."""
    o, tensors = report["output"], report["tensors"].values()
    worst_rel = max((t["max_abs"] / t["max_ref"] if t.get("max_ref") else (0.0 if t["max_abs"] == 0 else float("inf")) for t in tensors), default=0.0)  # fmt: skip
    checks = [
        (f"{o['name']} max|Δ| / max|ref|", o["max_rel"], "<=", rtol),
        ("worst tensor max|Δ| / max|ref|", worst_rel, "<=", rtol),
    ]
    if o["top1_agreement"] is not None:
        checks.append(("top-1 agreement", o["top1_agreement"], ">=", min_top1))
    if "greedy" in report:
        g = report["greedy"]
        same = g["first_difference"] is None
        checks.append(("greedy tokens identical", "yes" if same else f"no (token {g['first_difference']})", "==", "yes"))  # fmt: skip
    if atol is not None:
        worst = max((t["max_abs"] for t in tensors), default=0.0)
        checks += [(f"{o['name']} max|Δ|", o["max_abs"], "<=", atol), ("worst tensor max|Δ|", worst, "<=", atol)]  # fmt: skip
    ok = {"<=": lambda v, lim: v <= lim, ">=": lambda v, lim: v >= lim, "==": lambda v, lim: v == lim}  # fmt: skip
    return [
        {"measure": m, "value": v, "limit": f"{op} {_num(lim)}", "passed": bool(ok[op](v, lim))}
        for m, v, op, lim in checks
    ]


def criterion(report: dict) -> str:
    """The pass criterion in words, as the report header prints it."""
    c = report["criterion"]
    text = f"rel Δ <= {c['rtol']:g}, top-1 >= {c['min_top1']:g}, greedy identical"
    return text + (f", max|Δ| <= {c['atol']:g}" if c["atol"] is not None else "")


def markdown(report: dict, top: int = 5) -> str:
    """The report as Markdown tables (worst tensors, every layer, end to end, greedy)."""
    lines = [
        f"# slimport verify: {'PASSED' if report['passed'] else 'FAILED'} ({criterion(report)})",
        "",
        f"- reference: {report['reference']} on `{report['source']}`",
        f"- candidate: {report['candidate']} on `{report['target']}`",
        f"- inputs: {report['inputs']['tokens']} tokens, {report['inputs']['how']}",
        *[f"- note: {n}" for n in report["notes"]],
        "",
        f"## Tensors ({len(report['tensors'])} compared in the hub layout; worst {top})",
        "",
        "| tensor | max abs Δ | L2 of Δ |",
        "|---|---|---|",
    ]
    worst = sorted(report["tensors"].items(), key=lambda kv: -kv[1]["max_abs"])[:top]
    lines += [f"| {n} | {s['max_abs']:.3g} | {s['l2']:.3g} |" for n, s in worst]
    lines += ["", "## Hidden state after each block", ""]
    if report["layers"]:
        lines += ["| layer | max abs Δ |", "|---|---|"]
    else:  # an ONNX graph outputs logits and the cache only
        lines += [f"({report['candidate']} reports no per-layer states)"]
    lines += [
        f"| {'embeddings' if r['layer'] == 0 else r['layer']} | {r['max_abs']:.3g} |"
        for r in report["layers"]
    ]
    o = report["output"]
    top1 = "—" if o["top1_agreement"] is None else f"{o['top1_agreement']:.2%}"
    lines += [
        "",
        "## End to end",
        "",
        "| output | max abs Δ | max rel Δ | cosine | top-1 agreement |",
        "|---|---|---|---|---|",
        f"| {o['name']} | {o['max_abs']:.3g} | {o['max_rel']:.3g} | {o['cosine']:.9f} | {top1} |",
    ]
    if "greedy" in report:
        g = report["greedy"]
        same = (
            "identical"
            if g["first_difference"] is None
            else f"first difference at token {g['first_difference']}"
        )
        lines += ["", f"## Greedy decoding: {len(g['reference'])} tokens, {same}"]
    lines += ["", "## Pass criterion", "", "| measure | value | limit | |", "|---|---|---|---|"]
    lines += [
        f"| {c['measure']} | {_num(c['value'])} | {c['limit']} | {'pass' if c['passed'] else 'FAIL'} |"
        for c in report["checks"]
    ]
    return "\n".join(lines) + "\n"


def _num(v) -> str:
    return f"{v:.3g}" if isinstance(v, float | int) else str(v)
