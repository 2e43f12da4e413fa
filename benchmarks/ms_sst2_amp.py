"""MindSpore O2 mixed precision + dynamic loss scaling vs fp32 on the SST-2 head of MiniLM:
the same init, batches and steps; SST-2 dev accuracy of each.

    .venv/bin/python benchmarks/ms_sst2_amp.py [--steps 200] [--batch-size 16]

Recipe (both runs): BertForSequenceClassification from all-MiniLM-L6-v2 with a new head, word
embeddings frozen (as finetune.py does), AdamW lr 1e-4 (constant), weight decay 0.01 on matrices,
none on biases and norms, clipping at 1.0, length-grouped batches (finetune.py's sampler), no
dropout (our Cells have none). O2: MindSpore's auto_mixed_precision "O2" (fp16 compute, fp32
master weights and norms), DynamicLossScaler from 2**16.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import mindspore as ms  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from slimport.compress.training import length_grouped_batches  # noqa: E402
from slimport.data import read_labeled  # noqa: E402
from slimport.finetune import default_model, sst2_path  # noqa: E402
from slimport.runtime.mindspore.bert import BertForSequenceClassification  # noqa: E402
from slimport.runtime.mindspore.train import Trainer, classification_loss, cpu_threads  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from _machine import header  # noqa: E402


def encode(tokenizer, texts):
    enc = tokenizer(texts, padding=True, truncation=True, max_length=128, return_tensors="np")
    return enc["input_ids"].astype(np.int32), enc["attention_mask"].astype(np.int32)


def accuracy(net, tokenizer, texts, labels, batch=64) -> float:
    net.set_train(False)
    right = 0
    for i in range(0, len(texts), batch):
        ids, mask = encode(tokenizer, texts[i : i + batch])
        logits = net(ms.Tensor(ids), ms.Tensor(mask))["logits"].asnumpy()
        right += int((logits.argmax(-1) == np.array(labels[i : i + batch])).sum())
    return right / len(texts)


def run(amp: str, steps: int, batch_size: int, seed: int = 0) -> dict:
    from transformers import AutoTokenizer

    model = default_model()
    tokenizer = AutoTokenizer.from_pretrained(model)
    ms.set_seed(seed)  # the new head's init: the same for both runs
    net = BertForSequenceClassification.from_pretrained(model, num_labels=2)
    net.bert.embeddings.word_embeddings.embedding_table.requires_grad = False
    params = net.trainable_params()
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": 0.01},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    trainer = Trainer(net, classification_loss, groups, lr=1e-4, amp=amp, graph=False)
    texts, labels = read_labeled(sst2_path("train"))
    gen = torch.Generator().manual_seed(seed)
    lengths = [len(t.split()) for t in texts]
    t0, losses, skipped = time.perf_counter(), [], 0
    for idx in length_grouped_batches(lengths, batch_size, steps, gen):
        ids, mask = encode(tokenizer, [texts[i] for i in idx])
        scale = trainer.loss_scale
        losses.append(trainer.step(ids, mask, np.array([labels[i] for i in idx], np.int32)))
        skipped += scale is not None and trainer.loss_scale < scale
    seconds = time.perf_counter() - t0
    dev_texts, dev_labels = read_labeled(sst2_path("dev"))
    return {
        "amp": amp,
        "accuracy": accuracy(net, tokenizer, dev_texts, dev_labels),
        "final_loss": float(np.mean(losses[-20:])),
        "loss_scale": trainer.loss_scale,
        "skipped": skipped,
        "seconds": seconds,
    }


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=16)
    args = p.parse_args()
    cpu_threads(1)
    rows = [run(amp, args.steps, args.batch_size) for amp in ("O0", "O2")]
    print(header(" ".join(sys.argv)))
    print(
        "\n| precision | SST-2 dev accuracy | mean loss, last 20 steps | final loss scale | skipped steps | train s |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        name = "fp32 (O0)" if r["amp"] == "O0" else "O2 + dynamic loss scale"
        print(
            f"| {name} | {r['accuracy']:.4f} | {r['final_loss']:.4f} | {r['loss_scale'] or '-'} | "
            f"{r['skipped']} | {r['seconds']:.0f} |"
        )
    gap = 100 * (rows[0]["accuracy"] - rows[1]["accuracy"])
    print(f"\nO2 vs fp32: {gap:+.2f} accuracy points ({args.steps} steps, batch {args.batch_size})")


if __name__ == "__main__":
    main()
