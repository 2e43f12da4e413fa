"""A checkpoint run by transformers in PyTorch: the reference runtime of `verify` and the torch
runtime of `generate`. transformers reads HF folders and GGUF files itself; any other format goes
through slimport's HF conversion first (the runner's `note` says so). A compressed-tensors folder
runs on the packed runtime (`runtime.torch.quantized`): integers only, computed in compute_dtype."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from slimport.arch.layout import is_causal_lm
from slimport.convert.loader import convert, model_config
from slimport.errors import SlimportError
from slimport.io import open_checkpoint, pruned_heads
from slimport.runtime.torch.quantized import DTYPES, load_quantized


def describe(path: str | Path) -> tuple[str, Path, str]:
    """(format, weights file, first architecture) of a checkpoint, reading only its header;
    the format of a compressed-tensors folder is "compressed-tensors"."""
    with open_checkpoint(path) as ckpt:
        config = model_config(ckpt) or {}
        # open_checkpoint reads a quantized folder as the float model it computes, and says so
        fmt = "compressed-tensors" if "dequantized_from" in ckpt.metadata else ckpt.format
        return fmt, ckpt.path, (config.get("architectures") or [""])[0]


@dataclass
class Outputs:
    main: np.ndarray  # logits, or last_hidden_state for encoders
    main_name: str
    hidden_states: list[np.ndarray] = field(default_factory=list)


class TorchRunner:
    """A checkpoint run by transformers."""

    def __init__(self, path: str | Path, work: Path, compute_dtype: str = "float32"):
        from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification

        path = Path(path)
        self.note = ""
        if compute_dtype not in DTYPES:
            raise SlimportError(f"compute_dtype {compute_dtype!r} is not supported", hint="float32 or bfloat16")  # fmt: skip
        fmt, weights, arch = describe(path)
        self.causal = is_causal_lm({"architectures": [arch]})
        cls = (
            AutoModelForCausalLM
            if self.causal
            else AutoModelForSequenceClassification
            if "ForSequenceClassification" in arch
            else AutoModel
        )
        if fmt == "compressed-tensors":
            self.model, info = load_quantized(weights.parent, compute_dtype)
            self.note = f"packed {info['scheme']} runtime, {compute_dtype} compute"
        elif fmt == "gguf":
            self.model = cls.from_pretrained(path.parent, gguf_file=path.name)
        elif fmt in ("safetensors", "pytorch"):
            self.model = pruned_heads.from_pretrained(cls, weights.parent)
        else:  # transformers cannot read it: go through our own HF conversion, and say so
            folder = work / "torch-reference"
            convert(path, folder, to="hf", progress=False)
            self.model = cls.from_pretrained(folder)
            self.note = f"{path} is {fmt}: transformers ran slimport's HF conversion of it"
        if fmt != "compressed-tensors":  # the packed runtime already holds compute_dtype
            self.model.to(DTYPES[compute_dtype])
        self.model.eval()
        self.name = f"transformers {type(self.model).__name__}"

    def forward(self, ids: np.ndarray, mask: np.ndarray) -> Outputs:
        with torch.no_grad():
            out = self.model(
                input_ids=torch.from_numpy(ids).long(),
                attention_mask=torch.from_numpy(mask).long(),
                output_hidden_states=True,
            )
        name = "logits" if "logits" in out else "last_hidden_state"
        return Outputs(
            out[name].float().numpy(), name, [h.float().numpy() for h in out.hidden_states or ()]
        )

    def greedy(self, ids: np.ndarray, n: int, eos: int | None) -> list[int]:
        with torch.no_grad():
            out = self.model.generate(
                torch.from_numpy(ids).long(),
                attention_mask=torch.ones(ids.shape, dtype=torch.long),
                max_new_tokens=n,
                do_sample=False,
                eos_token_id=eos,
                pad_token_id=eos if eos is not None else 0,
            )
        return out[0, ids.shape[1] :].tolist()
