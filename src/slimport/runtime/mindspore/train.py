"""Training our MindSpore Cells: one `ms.value_and_grad` step (compiled with `ms.jit` in graph
mode), AdamW (MindSpore's torch-semantics `experimental.optim.AdamW`), global-norm clipping,
O2 mixed precision with a dynamic loss scaler, and checkpoints that resume bit for bit.

O2 is MindSpore's `auto_mixed_precision(net, "O2")`: matmuls in float16, norms in float32, the
parameters (the master weights the optimizer updates) stay float32. The loss is multiplied by the
scale before the backward pass and the gradients divided after; a step whose gradients overflow
is skipped and halves the scale, `scale_window` good steps double it (torch's GradScaler rules).

A checkpoint is a folder written atomically (temp folder, one rename): `state.ckpt` holds the
trainable parameters and the optimizer's moments and step; `trainer.json` the step count, the
loss scale (also in state.ckpt, with its counter) and a fingerprint of the model (every parameter's name and shape), so resuming
into another model is refused instead of loading half of it.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import mindspore as ms
import numpy as np
from mindspore import ops
from mindspore.experimental.optim import AdamW

from slimport.errors import SlimportError
from slimport.io import train_state
from slimport.io.base import atomic_dir

AMP_LEVELS = ("O0", "O2")
STATE = "state.ckpt"


def cpu_threads(n: int) -> None:
    """MindSpore's CPU kernel threads. One thread makes runs repeat bit for bit (a resumed run's
    losses equal the uninterrupted run's); MindSpore allows setting it once per process."""
    with contextlib.suppress(RuntimeError):  # set already in this process
        ms.device_context.cpu.op_tuning.threads_num(n)


def logits_of(net, *inputs):
    """The first output of our Cell: a ModelOutput in pynative (its __call__, which also applies
    the Cell's mixed-precision casts), the construct's tuple inside a compiled graph."""
    out = net(*inputs)
    if isinstance(out, dict):
        return out[net.output_names[0]]
    return out[0]


def causal_lm_loss(net, input_ids):
    """Mean next-token cross-entropy (transformers' loss with labels=input_ids), float32."""
    logits = logits_of(net, input_ids).astype(ms.float32)
    vocab = logits.shape[-1]
    return ops.cross_entropy(logits[:, :-1].reshape(-1, vocab), input_ids[:, 1:].reshape(-1))


def classification_loss(net, input_ids, attention_mask, labels):
    logits = logits_of(net, input_ids, attention_mask).astype(ms.float32)
    return ops.cross_entropy(logits, labels)


def fingerprint(net) -> str:
    return train_state.fingerprint({p.name: tuple(p.shape) for p in net.get_parameters()})


class Trainer:
    """Trains `net` on `loss_fn(net, *batch)` with AdamW over `groups` (dicts: params,
    weight_decay), clipping the global gradient norm to `clip`."""

    def __init__(
        self,
        net,
        loss_fn,
        groups: list[dict],
        lr: float,
        clip: float = 1.0,
        amp: str = "O0",
        loss_scale: float = 2.0**16,
        scale_window: int = 2000,
        graph: bool = True,
    ):
        if amp not in AMP_LEVELS:
            raise SlimportError(f"amp level {amp!r}: choose {' or '.join(AMP_LEVELS)}")
        groups = [g for g in groups if g["params"]]
        if not groups:
            raise SlimportError("nothing to train: the model has no trainable parameters")
        if amp == "O2":
            # converts net's cells in place (norms stay float32); the float32-output wrapper
            # it returns is not used: the losses cast the logits themselves
            ms.amp.auto_mixed_precision(net, "O2")
        self.net, self.amp, self.steps = net, amp, 0
        self.optimizer = AdamW(groups, lr=lr)
        self.params = [p for g in groups for p in g["params"]]
        self.scaler = ms.amp.DynamicLossScaler(loss_scale, 2, scale_window) if amp != "O0" else None
        scaler = self.scaler

        def forward(*batch):
            loss = loss_fn(net, *batch)
            return scaler.scale(loss) if scaler is not None else loss

        grad_fn = ms.value_and_grad(forward, None, self.optimizer.parameters)
        optimizer = self.optimizer

        def step(*batch):
            loss, grads = grad_fn(*batch)
            if scaler is not None:
                loss, grads = scaler.unscale(loss), scaler.unscale(grads)
                finite = ms.amp.all_finite(grads)
                scaler.adjust(finite)
                if finite:
                    optimizer(ops.clip_by_global_norm(grads, clip))
                return loss, finite
            optimizer(ops.clip_by_global_norm(grads, clip))
            return loss, ms.Tensor(True)

        def gradients(*batch):
            return grad_fn(*batch)

        self._step = ms.jit(step) if graph else step
        self.gradients = gradients

    def step(self, *batch: np.ndarray) -> float:
        """One optimizer step on a batch of numpy arrays; returns the (unscaled) loss."""
        self.net.set_train(True)
        loss, _ = self._step(*(ms.Tensor(b) for b in batch))
        self.steps += 1
        return float(loss.asnumpy())

    @property
    def loss_scale(self) -> float | None:
        return None if self.scaler is None else float(self.scaler.scale_value.asnumpy())

    # --- checkpoints -------------------------------------------------------------------
    def _state(self) -> dict[str, ms.Parameter]:
        state = {p.name: p for p in self.params}
        for name, p in self.optimizer.parameters_and_names():
            if name.startswith(("exp_avg", "state_step")):  # its moments and step
                state["optimizer." + name] = p
        if self.scaler is not None:  # the scale and its count of good steps
            state["loss_scaler.scale_value"] = self.scaler.scale_value
            state["loss_scaler.counter"] = self.scaler.counter
        return state

    def save(self, folder: str | Path, extra: dict | None = None) -> Path:
        """Write the checkpoint folder atomically (a kill mid-write leaves the previous one);
        `extra` (JSON) is kept in trainer.json for the caller (e.g. the losses so far)."""
        folder = Path(folder)
        meta = {
            "runtime": "mindspore",
            "step": self.steps,
            "loss_scale": self.loss_scale,
            "amp": self.amp,
            "model": fingerprint(self.net),
            "extra": extra or {},
        }
        with atomic_dir(folder, overwrite=True) as tmp:
            ms.save_checkpoint(
                [{"name": k, "data": p.value()} for k, p in self._state().items()],
                str(tmp / STATE),
            )
            train_state.write_meta(tmp, meta)
        return folder

    def restore(self, folder: str | Path) -> dict:
        """Load a checkpoint written by `save`; returns its trainer.json (`step`: where to go on)."""
        folder = Path(folder)
        meta = train_state.read_meta(folder, "mindspore", STATE, fingerprint(self.net))
        if meta["amp"] != self.amp:
            raise SlimportError(
                f"{folder}: a checkpoint of an amp {meta['amp']} run; this run is {self.amp}",
                hint="resume with the precision the checkpoint was trained with",
            )
        saved = ms.load_checkpoint(str(folder / STATE))
        state = self._state()
        if set(saved) != set(state):
            raise SlimportError(
                f"{folder}: holds other trainable tensors than this run "
                f"({len(saved)} vs {len(state)})",
                hint="resume with the same LoRA targets and trainable parameters",
            )
        for name, p in state.items():
            p.set_data(ms.Tensor(saved[name].asnumpy()))
        self.steps = int(meta["step"])
        return meta
