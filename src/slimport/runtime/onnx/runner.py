"""An exported folder where the rest of slimport expects a model: called like a transformers model
on torch tensors (perplexity, SST-2 accuracy), and as `verify`'s candidate runtime, whose
per-tensor comparison reads the graph's initializers (dequantizing the integer ones)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from slimport.errors import SlimportError
from slimport.runtime.onnx.session import OnnxModel
from slimport.runtime.torch.runner import Outputs


def is_export(path: str | Path) -> bool:
    """Whether `path` is a folder ONNX Runtime runs: an exported model.onnx with its config."""
    p = Path(path)
    return p.is_dir() and (p / "model.onnx").is_file() and (p / "config.json").is_file()


class TorchView:
    """`model(input_ids=..., attention_mask=..., token_type_ids=...)` -> logits as a torch tensor,
    computed by ONNX Runtime: a decoder's through its KV-cache graph (empty cache, one pass), an
    encoder's through its classification head."""

    def __init__(self, folder: str | Path, threads: int | None = None):
        self.onnx = OnnxModel(folder, threads)
        self.is_decoder = self.onnx.is_decoder
        self.has_logits = "logits" in self.onnx.outputs

    def __call__(self, input_ids, attention_mask=None, token_type_ids=None, **_) -> torch.Tensor:
        arr = _numpy
        logits = self.onnx.logits(arr(input_ids), arr(attention_mask), arr(token_type_ids))
        return torch.from_numpy(np.ascontiguousarray(logits))


def _numpy(t) -> np.ndarray | None:
    return None if t is None else np.asarray(t.cpu() if isinstance(t, torch.Tensor) else t)


class OnnxRunner:
    """An exported folder run by ONNX Runtime, for `slimport verify`."""

    def __init__(self, folder: str | Path, threads: int | None = None):
        if not is_export(folder):
            raise SlimportError(
                f"{folder}: not an exported ONNX folder (model.onnx + config.json)",
                hint="export it: slimport convert SRC OUT --to onnx",
            )
        self.folder = Path(folder)
        self.model = OnnxModel(folder, threads)
        self.causal = self.model.is_decoder
        self.name = "ONNX Runtime (CPU) " + ("decoder, KV cache" if self.causal else "encoder")
        self.note = ""

    def forward(self, ids: np.ndarray, mask: np.ndarray) -> Outputs:
        out = self.model.logits(ids, mask)
        name = "logits" if "logits" in self.model.outputs else "last_hidden_state"
        return Outputs(out, name, [])  # the graph outputs no per-layer states

    def greedy(self, ids: np.ndarray, n: int, eos: int | None) -> list[int]:
        return self.model.generate(ids, n, eos_token_id=eos)[0, ids.shape[1] :].tolist()

    def tensors(self) -> dict[str, np.ndarray]:
        """Hub-named float tensors as the graph holds them: float initializers as stored, every
        integer Linear's weight dequantized from its integers (MatMulNBits or MatMulInteger)."""
        proto = onnx.load(str(self.folder / "model.onnx"))
        init = {t.name: t for t in proto.graph.initializer}

        def arrays(*names):
            return [None if n not in init else numpy_helper.to_array(init[n]) for n in names]

        out = {n: numpy_helper.to_array(t).astype(np.float32) for n, t in init.items()
               if not n.startswith("/") and t.data_type in (1, 10)}  # fmt: skip
        # a packed MatMulNBits (q/k/v, gate/up) reads Concat-ed initializers: one part each
        concat = {n.output[0]: list(n.input) for n in proto.graph.node if n.op_type == "Concat"}
        for node in proto.graph.node:
            if node.op_type != "MatMulNBits":
                continue
            a = {x.name: x.i for x in node.attribute}
            b_names, s_names = (concat.get(n, [n]) for n in node.input[1:3])
            z = node.input[3] if len(node.input) > 3 and node.input[3] else None
            z_names = concat.get(z, [z]) if z else [None] * len(b_names)
            for b_name, s_name, z_name in zip(b_names, s_names, z_names, strict=True):
                b, s, z = arrays(b_name, s_name, z_name or "-")
                prefix = b_name.removesuffix(".weight_packed")
                out.pop(prefix + ".weight_scale", None)
                out[prefix + ".weight"] = _nbits_weight(b, s, z, a["bits"], a["block_size"], a["K"])
        for name in [n for n in init if n.endswith(".weight_int8")]:
            prefix = name.removesuffix(".weight_int8")
            q, s, z = arrays(name, prefix + ".weight_scale", prefix + ".weight_zero_point")
            q = q.T.astype(np.float32)
            out.pop(prefix + ".weight_scale", None)
            out[prefix + ".weight"] = (q - (0 if z is None else z[:, None])) * s[:, None]
        for n in [n for n in out if n.endswith((".input_scale", ".input_zero_point"))]:
            del out[n]
        return out


def _nbits_weight(b, scale, zero, bits: int, block: int, k: int) -> np.ndarray:
    """A MatMulNBits weight [N, K] in float: (u - zero point) * scale per block."""
    n, n_blocks = scale.shape
    per = 8 // bits
    u = b.reshape(n, -1)
    u = np.stack([(u >> (bits * i)) & ((1 << bits) - 1) for i in range(per)], -1).reshape(n, -1)
    if zero is None:
        z = np.full((n, n_blocks), 1 << (bits - 1))
    else:
        z = zero.reshape(n, -1)
        z = np.stack([(z >> (bits * i)) & ((1 << bits) - 1) for i in range(per)], -1)
        z = z.reshape(n, -1)[:, :n_blocks]
    w = (u.reshape(n, n_blocks, block).astype(np.float32) - z[:, :, None]) * scale[:, :, None]
    return w.reshape(n, -1)[:, :k]
