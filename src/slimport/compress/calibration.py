"""Calibration inputs for the pipeline: model-input batches drawn from a task file, seeded."""

from __future__ import annotations

from pathlib import Path

import torch

from slimport.compress.quant.config import QuantizationConfig
from slimport.data import calibration_batches, read_texts
from slimport.errors import SlimportError


def calibration_inputs(
    tokenizer,
    path: str | Path,
    config: QuantizationConfig,
    causal: bool,
    batch_size: int = 8,
    sort_by_length: bool = False,
    texts: list[str] | None = None,
) -> list[dict]:
    """Causal LMs get `num_samples` random windows of `seq_len` tokens (the GPTQ/AWQ protocol);
    encoders get `num_samples` random sentences, padded per batch (how a classifier is used).
    sort_by_length (encoders): the same sentences, batched with like-length ones (a batch costs
    its longest sentence times its size) and the batches in a seeded random order. `texts`
    (encoders): the pool to draw from instead of the file's texts."""
    if causal:
        ids = calibration_batches(tokenizer, path, config.num_samples, config.seq_len, config.seed)
        return [{"input_ids": ids[i : i + batch_size]} for i in range(0, len(ids), batch_size)]
    texts = read_texts(path) if texts is None else texts
    if len(texts) < config.num_samples:
        raise SlimportError(
            f"{path}: {len(texts)} text(s), fewer than the {config.num_samples} calibration samples asked for",
            hint="lower --num-samples or give a larger file",
        )
    gen = torch.Generator().manual_seed(config.seed)
    picked = [
        texts[i] for i in torch.randperm(len(texts), generator=gen)[: config.num_samples].tolist()
    ]
    batch_size = max(batch_size, 32)
    if sort_by_length:
        lengths = [len(ids) for ids in tokenizer(picked, truncation=True,
                                                 max_length=config.seq_len)["input_ids"]]  # fmt: skip
        by_length = sorted(range(len(picked)), key=lambda i: (lengths[i], i))
        chunks = [by_length[i : i + batch_size] for i in range(0, len(picked), batch_size)]
        order = torch.randperm(len(chunks), generator=gen).tolist()
        picked = [picked[i] for c in order for i in chunks[c]]
    # padded on the right whatever the tokenizer's default (ours pads left, for generation): with
    # absolute position embeddings (BERT) left padding would shift every real token's position
    return [
        dict(tokenizer(picked[i : i + batch_size], padding=True, truncation=True,
                       max_length=config.seq_len, return_tensors="pt", padding_side="right"))
        for i in range(0, len(picked), batch_size)
    ]  # fmt: skip
