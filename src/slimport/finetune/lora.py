"""LoRA fine-tuning of a causal LM on one document, in torch (peft) or in MindSpore (our Cells).

Both runtimes see the same thing: the same token windows (the document's first 90% trains, the
rest measures perplexity), the same batch order (numpy, seeded), the same initial adapter (lora_A
drawn from numpy, lora_B zero), the same loss (mean next-token cross-entropy), AdamW with the
LoRA parameters in their own group without weight decay, and global-norm gradient clipping; so
their fp32 loss curves agree step by step. The output folder is peft's adapter layout plus
finetune_report.json.
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from slimport.compress import lora
from slimport.convert import loader
from slimport.data import lm_windows
from slimport.errors import SlimportError
from slimport.evaluate.perplexity import perplexity
from slimport.io import train_state
from slimport.io.base import atomic_dir
from slimport.io.locate import resolve_model

RUNTIMES = ("torch", "mindspore")


@dataclass(frozen=True)
class LoraTrainSettings:
    steps: int = 50
    lr: float = 1e-3
    batch_size: int = 4
    seq_len: int = 128
    clip: float = 1.0  # global gradient norm
    seed: int = 0  # adapter init and batch order
    held_out: float = 0.1  # share of the document's tokens kept for perplexity
    eval_windows: int = 16  # held-out windows scored before and after
    threads: int | None = 1  # CPU threads (a shared 2-core machine: see finetune SST-2)
    ms_graph: bool = True  # MindSpore: the train step compiled by ms.jit (graph mode)
    checkpoint_every: int = 0  # steps between checkpoints (with a checkpoint folder)

    def check(self) -> None:
        if self.steps < 1 or self.batch_size < 1 or not self.lr > 0 or self.eval_windows < 1:
            raise SlimportError(
                "LoRA fine-tuning needs steps, batch size, eval windows and lr > 0 "
                f"(got {self.steps}, {self.batch_size}, {self.eval_windows}, {self.lr})"
            )


def batch_order(n: int, batch_size: int, steps: int, seed: int) -> list[np.ndarray]:
    """`steps` batches of window indices: epoch after epoch of a seeded permutation."""
    rng, order, batches = np.random.default_rng(seed), np.empty(0, np.int64), []
    while len(batches) < steps:
        if len(order) < batch_size:
            order = np.concatenate([order, rng.permutation(n)])
        batches.append(order[:batch_size])
        order = order[batch_size:]
    return batches


class TorchLora:
    """peft LoRA on a transformers causal LM, trained with torch AdamW."""

    def __init__(self, model: Path, settings: lora.LoraSettings, train: LoraTrainSettings):
        from transformers import AutoModelForCausalLM

        base = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
        self.net = lora.add_lora(base, settings, train.seed)
        self.params = [p for p in self.net.parameters() if p.requires_grad]
        self.total = sum(p.numel() for p in self.net.parameters())
        self.trainable = sum(p.numel() for p in self.params)
        self.optimizer = torch.optim.AdamW(
            [{"params": self.params, "weight_decay": 0.0}], lr=train.lr
        )
        self.clip, self.steps = train.clip, 0

    def step(self, ids: np.ndarray) -> float:
        self.steps += 1
        self.net.train()
        batch = torch.from_numpy(ids)
        loss = self.net(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, self.clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.item()

    def perplexity(self, windows: torch.Tensor) -> float:
        return perplexity(self.net, windows, progress=False, batch_size=4)["perplexity"]

    def _fingerprint(self) -> str:
        return train_state.fingerprint({n: tuple(p.shape) for n, p in self.net.named_parameters()})

    def save(self, folder: Path, extra: dict) -> None:
        trainable = {
            n: p.detach().clone() for n, p in self.net.named_parameters() if p.requires_grad
        }
        meta = {
            "runtime": "torch",
            "step": self.steps,
            "model": self._fingerprint(),
            "extra": extra,
        }
        with atomic_dir(folder, overwrite=True) as tmp:
            torch.save(
                {"params": trainable, "optimizer": self.optimizer.state_dict()}, tmp / "state.pt"
            )
            train_state.write_meta(tmp, meta)

    def restore(self, folder: Path) -> dict:
        meta = train_state.read_meta(folder, "torch", "state.pt", self._fingerprint())
        state = torch.load(folder / "state.pt", weights_only=True)
        self.net.load_state_dict(state["params"], strict=False)
        self.optimizer.load_state_dict(state["optimizer"])
        self.steps = meta["step"]
        return meta

    def adapter(self) -> dict[str, np.ndarray]:
        return lora.lora_tensors(self.net)


class MindSporeLora:
    """LoraDense on our MindSpore causal LM, trained by runtime.mindspore.train.Trainer."""

    def __init__(self, model: Path, settings: lora.LoraSettings, train: LoraTrainSettings):
        from slimport.runtime.mindspore import lora as ms_lora
        from slimport.runtime.mindspore.auto import AutoModelForCausalLM
        from slimport.runtime.mindspore.train import Trainer, causal_lm_loss, cpu_threads

        cpu_threads(train.threads or 1)
        self.net = AutoModelForCausalLM.from_pretrained(model)
        ms_lora.add_lora(self.net, settings, train.seed)
        groups = ms_lora.param_groups(self.net, weight_decay=0.0)
        self.trainer = Trainer(
            self.net, causal_lm_loss, groups, lr=train.lr, clip=train.clip, graph=train.ms_graph
        )
        self.total = sum(int(np.prod(p.shape)) for p in self.net.get_parameters())
        self.trainable = sum(int(np.prod(p.shape)) for p in self.net.trainable_params())
        self._adapter = ms_lora.lora_tensors

    def step(self, ids: np.ndarray) -> float:
        return self.trainer.step(ids.astype(np.int32))

    def perplexity(self, windows: torch.Tensor) -> float:
        import mindspore as ms

        self.net.set_train(False)

        def logits(batch: torch.Tensor) -> torch.Tensor:
            out = self.net(ms.Tensor(batch.numpy().astype(np.int32)))["logits"]
            return torch.from_numpy(out.asnumpy())

        return perplexity(logits, windows, progress=False, batch_size=4)["perplexity"]

    def adapter(self) -> dict[str, np.ndarray]:
        return self._adapter(self.net)

    def save(self, folder: Path, extra: dict) -> None:
        self.trainer.save(folder, extra)

    def restore(self, folder: Path) -> dict:
        return self.trainer.restore(folder)


def finetune_lora(
    model: str | Path,
    out: str | Path,
    data: str | Path,
    settings: lora.LoraSettings | None = None,
    train: LoraTrainSettings | None = None,
    runtime: str = "torch",
    progress: bool = True,
    checkpoint: str | Path | None = None,
) -> dict:
    """Train a LoRA adapter for the causal LM folder `model` on the document `data`; write it
    to `out` in peft's layout with finetune_report.json (losses, perplexity before/after).

    `checkpoint`: a folder written every `checkpoint_every` steps (adapter, optimizer state,
    step, losses so far; atomically); when it exists, training resumes from it and continues
    the same loss curve (same batches, same optimizer state)."""
    settings, train = settings or lora.LoraSettings(), train or LoraTrainSettings()
    settings.check()
    train.check()
    if runtime not in RUNTIMES:
        raise SlimportError(f"--runtime {runtime!r}: choose {' or '.join(RUNTIMES)}")
    name = str(model)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="slimport-lora-", dir=Path(out).parent) as tmp:
        model = _hf_folder(resolve_model(model), Path(tmp))
        return _train(model, name, out, data, settings, train, runtime, progress, checkpoint)


def _hf_folder(model: Path, tmp: Path) -> Path:
    """`model` as a Hugging Face folder (both runtimes read one, and its tokenizer): a GGUF or
    other checkpoint file (`smollm2`) is converted into `tmp` first (seconds)."""
    if (model / "config.json").is_file():
        return model
    if model.is_dir():
        raise SlimportError(f"{model}: not a model folder (no config.json)")
    loader.convert(model, tmp / "hf", to="hf", progress=False)
    return tmp / "hf"


def _train(model, name, out, data, settings, train, runtime, progress, checkpoint) -> dict:
    from transformers import AutoTokenizer

    t0 = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(model)
    windows, held = lm_windows(tokenizer, data, train.seq_len, train.held_out)
    held = held[: train.eval_windows]
    config = json.loads((model / "config.json").read_text())
    before = torch.get_num_threads()
    if train.threads:
        torch.set_num_threads(train.threads)
    try:
        session = (TorchLora if runtime == "torch" else MindSporeLora)(model, settings, train)
        ppl_before, losses = session.perplexity(held), []
        if checkpoint is not None and Path(checkpoint).exists():
            meta = session.restore(Path(checkpoint))
            losses, ppl_before = meta["extra"]["losses"], meta["extra"]["perplexity_before"]
        order = batch_order(len(windows), train.batch_size, train.steps, train.seed)
        bar = tqdm(order[len(losses) :], desc=f"lora {runtime}", unit="step",
                   initial=len(losses), total=train.steps, disable=not progress)  # fmt: skip
        for idx in bar:
            losses.append(session.step(windows[idx].numpy()))
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
            if (
                checkpoint is not None
                and train.checkpoint_every
                and (len(losses) % train.checkpoint_every == 0)
            ):
                extra = {"losses": losses, "perplexity_before": ppl_before}
                session.save(Path(checkpoint), extra)
        ppl_after = session.perplexity(held)
        tensors = session.adapter()
    finally:
        torch.set_num_threads(before)
    report = {
        "task": "causal-lm-lora",
        "runtime": runtime,
        "base_model": name,
        "train_data": str(data),
        "train_windows": len(windows),
        "held_out_windows": len(held),
        "trainable_params": session.trainable,
        "total_params": session.total,
        "trainable_percent": 100 * session.trainable / session.total,
        "losses": losses,
        "held_out_perplexity_before": ppl_before,
        "held_out_perplexity_after": ppl_after,
        "seconds": round(time.perf_counter() - t0, 1),
        "lora": asdict(settings),
        "settings": asdict(train),
    }
    if not all(math.isfinite(v) for v in losses):
        raise SlimportError(f"LoRA training diverged (loss {losses[-1]}); lower --lr")
    pattern = lora.target_pattern(settings, config.get("model_type"))
    lora.write_adapter(
        out, tensors, lora.peft_config(settings, pattern, name, "CAUSAL_LM"),
        extra={"finetune_report.json": json.dumps(report, indent=2) + "\n"},
    )  # fmt: skip
    return report
