"""Where static W8A8 PTQ's flips come from, on the MiniLM SST-2 classifier: the min_max PTQ model
(int8 per-channel weights, int8 static per-tensor inputs, 256 calibration sentences) evaluated
with only some kinds of Linear input quantizers on (weights always int8), counting disagreements
with fp32 on the held-out SST-2 train sentences `benchmarks/qat.py --holdout` uses.

    python benchmarks/w8a8_flips.py [--holdout 8000]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch
from transformers import AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import header  # noqa: E402
from qat import flips, split_train, w8a8_config  # noqa: E402

from slimport.compress.api import quantize  # noqa: E402
from slimport.compress.quant.compressed import load_simulated  # noqa: E402
from slimport.compress.quant.modules import QuantLinear  # noqa: E402
from slimport.compress.quant.qat import float_model  # noqa: E402
from slimport.evaluate.classification import sst2_accuracy  # noqa: E402
from slimport.finetune import ensure_sst2_classifier, sst2_path  # noqa: E402

# which Linears keep their input quantizer, by the end of their BERT name
KINDS = {
    "all (the PTQ model)": lambda n: True,
    "none (int8 weights only)": lambda n: False,
    "query": lambda n: n.endswith("query"),
    "key": lambda n: n.endswith("key"),
    "value": lambda n: n.endswith("value"),
    "attention output projection": lambda n: n.endswith("attention.output.dense"),
    "FFN up-projection (intermediate.dense)": lambda n: n.endswith("intermediate.dense"),
    "FFN down-projection (output.dense, GELU's output)": lambda n: (
        n.endswith("output.dense") and "attention" not in n
    ),
} | {  # the GELU output one layer at a time: which layer's range costs the most
    f"layer {i} FFN down-projection only": lambda n, i=i: (
        n == f"bert.encoder.layer.{i}.output.dense"
    )
    for i in range(6)
}


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--holdout", type=int, default=8000)
    ap.add_argument("--recipe", default="full", help="the classifier's finetune recipe")
    args = ap.parse_args()
    torch.set_num_threads(1)
    model = ensure_sst2_classifier(recipe=args.recipe)
    tok = AutoTokenizer.from_pretrained(model)
    with tempfile.TemporaryDirectory() as scratch:
        pool, held = split_train(sst2_path("train"), args.holdout, Path(scratch))
        quantize(model, Path(scratch) / "ptq", w8a8_config(pool, 0), progress=False)
        ref = sst2_accuracy(float_model(model), tok, held)
        q, _ = load_simulated(Path(scratch) / "ptq")
        lins = {n: m for n, m in q.named_modules() if isinstance(m, QuantLinear)}
        inputs = {n: m.input_args for n, m in lins.items()}
        print(
            header(
                "python benchmarks/w8a8_flips.py " + " ".join(sys.argv[1:]),
                ("torch", "transformers"),
            )
        )
        print(
            f"\nMiniLM SST-2 classifier ({model.name}), W8A8 static min_max; {ref['n']} held-out sentences\n"
        )
        print("| quantized inputs | held-out flips |")
        print("|---|---|")
        for kind, keep in KINDS.items():
            for n, m in lins.items():
                m.input_args = inputs[n] if keep(n) else None
            r = sst2_accuracy(q, tok, held, reference=ref)
            print(f"| {kind} | {flips(r)} of {r['n']} |", flush=True)


if __name__ == "__main__":
    main()
