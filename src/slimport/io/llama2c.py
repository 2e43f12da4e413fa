"""llama2.c checkpoints (Karpathy's run.c format): a 7 x int32 header then fp32 weights.

Header: dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size (negative = separate
classifier), seq_len. Then, stacked over layers: token embedding, attention norms, wq, wk, wv,
wo, ffn norms, w1, w2, w3, final norm, the legacy freq_cis_real/imag tables, and the classifier
when not shared. Tensors are exposed per layer under llama2.c's model.py names.
"""

from __future__ import annotations

import math
import struct
from pathlib import Path

import numpy as np
import torch

from slimport.errors import SlimportError
from slimport.io.base import Checkpoint, TensorInfo, regular_file
from slimport.io.formats import FORMATS


def read(path: Path) -> Checkpoint:
    size = regular_file(path).stat().st_size
    with open(path, "rb") as f:
        raw = f.read(28)
    if len(raw) < 28:
        raise SlimportError(f"{path}: truncated llama2.c file (no 28-byte header)")
    dim, hidden, n_layers, n_heads, n_kv, vocab, seq_len = struct.unpack("<7i", raw)
    shared = vocab > 0
    vocab = abs(vocab)
    if (
        min(dim, hidden, n_layers, n_heads, n_kv, vocab, seq_len) <= 0
        or dim % n_heads
        or n_heads % n_kv
    ):
        raise SlimportError(
            f"{path}: not a llama2.c checkpoint (implausible header {dim, hidden, n_layers, n_heads, n_kv, vocab, seq_len})"
        )
    head = dim // n_heads
    kv_dim = n_kv * head
    # (name, per-layer shape or None for global, stacked over layers?)
    plan = [
        ("tok_embeddings.weight", (vocab, dim), False),
        ("attention_norm.weight", (dim,), True),
        ("attention.wq.weight", (dim, dim), True),
        ("attention.wk.weight", (kv_dim, dim), True),
        ("attention.wv.weight", (kv_dim, dim), True),
        ("attention.wo.weight", (dim, dim), True),
        ("ffn_norm.weight", (dim,), True),
        ("feed_forward.w1.weight", (hidden, dim), True),
        ("feed_forward.w2.weight", (dim, hidden), True),
        ("feed_forward.w3.weight", (hidden, dim), True),
        ("norm.weight", (dim,), False),
        ("freq_cis_real", (seq_len, head // 2), False),
        ("freq_cis_imag", (seq_len, head // 2), False),
    ]
    if not shared:
        plan.append(("output.weight", (vocab, dim), False))
    # the size the header implies, in exact integers before any per-layer loop: a 28-byte
    # header may declare 2^31 layers, and only the file's real size can say it lies
    pos = 28 + sum(
        4 * math.prod(shape) * (n_layers if stacked else 1) for _, shape, stacked in plan
    )
    if pos > size:
        raise SlimportError(
            f"{path}: truncated llama2.c file: header implies {pos} bytes, file has {size}",
            hint="the file is incomplete or the header is wrong",
        )
    if pos < size:
        raise SlimportError(
            f"{path}: {size - pos} unexpected trailing bytes after the llama2.c weights"
        )

    offsets: dict[str, tuple[int, tuple[int, ...]]] = {}
    pos = 28
    for name, shape, stacked in plan:
        for layer in range(n_layers) if stacked else [None]:
            full = name if layer is None else f"layers.{layer}.{name}"
            offsets[full] = (pos, shape)
            pos += 4 * math.prod(shape)

    def load(name: str) -> torch.Tensor:
        offset, shape = offsets[name]
        data = np.fromfile(path, dtype="<f4", count=int(np.prod(shape)), offset=offset)
        return torch.from_numpy(data.reshape(shape).copy())

    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": dim,
        "intermediate_size": hidden,
        "num_hidden_layers": n_layers,
        "num_attention_heads": n_heads,
        "num_key_value_heads": n_kv,
        "vocab_size": vocab,
        "max_position_embeddings": seq_len,
        "rms_norm_eps": 1e-5,  # run.c / model.py use 1e-5
        "rope_theta": 10000.0,
        "hidden_act": "silu",
        "tie_word_embeddings": shared,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": "float32",
    }
    infos = {n: TensorInfo(shape, torch.float32) for n, (_, shape) in offsets.items()}
    rope_tables = [n for n in infos if n.startswith("freq_cis")]
    for n in rope_tables:  # precomputed RoPE tables, not weights
        del infos[n]
    return Checkpoint(
        path,
        "llama2c",
        infos,
        load,
        FORMATS["llama2c"].dialects,
        config=config,
        skipped=rope_tables,
    )
