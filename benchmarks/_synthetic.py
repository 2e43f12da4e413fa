"""Synthetic Llama-shaped checkpoints for the memory benchmarks: only shapes matter there."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file


def llama_shapes(
    hidden: int, inter: int, layers: int, heads: int, kv_heads: int, vocab: int
) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape of a Llama with an untied head, in checkpoint order."""
    head = hidden // heads
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes |= {
            p + "input_layernorm.weight": (hidden,),
            p + "self_attn.q_proj.weight": (heads * head, hidden),
            p + "self_attn.k_proj.weight": (kv_heads * head, hidden),
            p + "self_attn.v_proj.weight": (kv_heads * head, hidden),
            p + "self_attn.o_proj.weight": (hidden, heads * head),
            p + "post_attention_layernorm.weight": (hidden,),
            p + "mlp.gate_proj.weight": (inter, hidden),
            p + "mlp.up_proj.weight": (inter, hidden),
            p + "mlp.down_proj.weight": (hidden, inter),
        }
    return shapes | {"model.norm.weight": (hidden,), "lm_head.weight": (vocab, hidden)}


def write_sharded(folder: Path, shapes: dict, config: dict, shard_bytes: int) -> int:
    """fp32 safetensors shards of at most `shard_bytes` + index + config.json (written last, so
    its presence marks a complete folder). Norms are 1 and matrices N(0, 0.02), seed 0: a model
    that computes finitely. Returns the tensor bytes."""
    folder.mkdir(parents=True, exist_ok=True)
    shards, current, size = [], {}, 0
    for name, shape in shapes.items():
        n = 4 * int(torch.Size(shape).numel())
        if current and size + n > shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = shape
        size += n
    shards.append(current)
    gen = torch.Generator().manual_seed(0)
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {
            n: torch.ones(s) if len(s) == 1 else torch.randn(s, generator=gen) * 0.02
            for n, s in shard.items()
        }
        save_file(tensors, folder / fname, metadata={"format": "pt"})
        total += sum(t.numel() * 4 for t in tensors.values())
        weight_map |= dict.fromkeys(shard, fname)
        del tensors
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map})
    )
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return total
