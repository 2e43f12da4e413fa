"""Text in, text out: tokenizer + model + generate, for `slimport generate`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from slimport.errors import SlimportError
from slimport.io.hf import load_tokenizer
from slimport.runtime.torch.runner import TorchRunner


def encode_prompts(tok, prompts: list[str], chat: bool | None = None):
    """(input_ids, attention_mask) as NumPy arrays for a batch padded on the tokenizer's side;
    each prompt wrapped as one user turn of the chat template when the tokenizer has one (or
    `chat` says so), whose text already holds the special tokens."""
    if chat is None:
        chat = bool(getattr(tok, "chat_template", None))
    texts = [
        tok.apply_chat_template(
            [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True
        )
        if chat
        else p
        for p in prompts
    ]
    enc = tok(texts, return_tensors="np", padding=True, add_special_tokens=not chat)
    return enc["input_ids"], enc["attention_mask"]


class _TokenBar:
    """A transformers streamer that only counts: the new tokens as a bar on stderr."""

    def __init__(self, total: int):
        self.bar = tqdm(total=total, desc="generating", unit="token", leave=False, disable=None)
        self.prompt, self.steps = True, 0

    def put(self, value) -> None:
        if self.prompt:  # transformers puts the prompt first
            self.prompt = False
        else:
            self.steps += 1
            self.bar.update(1)

    def end(self) -> None:
        self.bar.close()


def generate_text(
    model_path: str | Path,
    prompts: list[str],
    runtime: str | None = None,
    mode: str = "pynative",
    chat: bool | None = None,
    compute_dtype: str = "float32",
    progress: bool = False,
    **sampling,
) -> list[str]:
    """Generate a continuation for each prompt (batched, left padded); returns new text only.
    runtime: mindspore, torch or onnx (default: onnx for an exported ONNX folder, else mindspore).
    compute_dtype: torch's float32 or bfloat16 (a quantized folder runs on the packed runtime).
    progress: a bar of the new tokens on stderr (when it is a terminal)."""
    tok = load_tokenizer(model_path)
    ids, mask = encode_prompts(tok, prompts, chat)
    common = {"eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id, **sampling}
    if runtime is None:  # an exported ONNX folder runs in ONNX Runtime
        runtime = "onnx" if (Path(model_path) / "model.onnx").is_file() else "mindspore"
    if runtime == "onnx":
        from slimport.runtime.onnx.session import OnnxModel

        if compute_dtype != "float32":
            raise SlimportError(f"--compute-dtype {compute_dtype} is for --runtime torch",
                                hint="an ONNX folder computes as exported")  # fmt: skip
        kw = {k: v for k, v in common.items() if k != "pad_token_id"}
        out = OnnxModel(model_path).generate(ids, attention_mask=mask, progress=progress, **kw)
    elif runtime == "mindspore":
        import mindspore as ms  # optional and slow to import: only for --runtime mindspore

        from slimport.runtime.mindspore.auto import AutoModelForCausalLM

        ms.set_context(mode=ms.GRAPH_MODE if mode == "graph" else ms.PYNATIVE_MODE)
        model = AutoModelForCausalLM.from_pretrained(model_path)
        out = model.generate(ids.astype(np.int32), attention_mask=mask.astype(np.int32),
                             progress=progress, **common)  # fmt: skip
        out = out.asnumpy() if hasattr(out, "asnumpy") else np.asarray(out)
    elif runtime == "torch":
        runner = TorchRunner(model_path, Path("."), compute_dtype)
        if sampling.get("seed") is not None:
            torch.manual_seed(sampling["seed"])
        kw = {k: v for k, v in common.items() if k != "seed"}
        kw["do_sample"] = kw.get("do_sample", False)
        if progress:
            kw["streamer"] = _TokenBar(kw.get("max_new_tokens", 20))
        with torch.no_grad():
            out = runner.model.generate(
                torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(mask).long(), **kw
            ).numpy()
    else:
        raise SlimportError(f"unknown --runtime {runtime!r}", hint="mindspore, torch or onnx")
    return [tok.decode(row[ids.shape[1] :], skip_special_tokens=True) for row in out]
