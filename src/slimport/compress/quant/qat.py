"""Quantization-aware training: fine-tune a PTQ result through its own rounding.

Starts from what post-training quantization wrote (RTN/GPTQ/AWQ integers, observers' input
ranges): every QuantLinear becomes a `FakeQuantLinear` whose float weight starts at the
dequantized integers (so step 0 computes exactly the PTQ model) and whose forward rounds it onto
the grid with the straight-through estimator; static activations are fake-quantized the same
way, dynamic ones per token as at run time. With `lsq` the weight and input scales train too
(LSQ, log-parametrised so one learning rate fits every layer's magnitude); with `zero_lr` the
static inputs' zero points train too (rounded in the forward, so they stay integers). The loss
is the float model's own outputs: QAT as self-distillation, so no labels are needed and the
calibration text is the training text (never a test split). `loss` picks KL at temperature T
(default) or MSE of the logits; `margin_weight` adds a hinge on the float model's decision and
`hidden_weight` a relative MSE of every layer's hidden states (see `qat_loss`). The result is
rounded once more and written by the PTQ path's writer: the same compressed-tensors folder.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F
from tqdm.auto import tqdm

from slimport.compress.fields import check_field_types
from slimport.compress.quant import primitives as P
from slimport.compress.quant.config import QuantArgs, QuantizationConfig
from slimport.compress.quant.modules import QuantLinear
from slimport.compress.training import lr_factor, torch_threads
from slimport.errors import SlimportError

REPORT = "qat_report.json"


@dataclass(frozen=True)
class QATSettings:
    steps: int = 100
    lr: float = 1e-5  # latent weights (Adam)
    scale_lr: float = 1e-3  # log-scales with lsq: ~0.1% change per step
    lsq: bool = True
    batch_size: int = 1  # LM windows (of the recipe's seq_len) or sentences x 32 per step
    temperature: float = 1.0
    warmup: float = 0.05
    minutes: float = 20.0
    threads: int | None = 1
    loss: str = "kl"  # kl (at `temperature`) or mse of the logits
    # hinge on the float model's argmax: the student's margin (its logit of that class minus its
    # best other) should reach min(margin, the float model's margin); what a flip violates
    margin_weight: float = 0.0
    margin: float = 1.0
    hidden_weight: float = 0.0  # relative MSE of every layer's output (dense signal per token)
    zero_lr: float = 0.0  # static input zero points (integer units per step); 0 keeps PTQ's
    # every other float parameter but the embeddings (norms, biases, float Linears such as a
    # classifier head) trains at this lr, as in torch.ao / NNCF QAT; 0 keeps them as PTQ left
    # them. A norm's gain is what can shrink the outlier channels a per-tensor input grid clips
    float_lr: float = 0.0
    sort_by_length: bool = False  # encoders: batches of like-length sentences, less padding
    # classifiers: share of the QAT sentences drawn from the pool's least decided ones (smallest
    # float-model logit margin), the rest at random. A fine-tuned classifier is sure of nearly
    # every training sentence, so there its logits barely constrain the decision boundary,
    # where quantization error flips predictions
    boundary: float = 0.0

    @classmethod
    def from_dict(cls, values: dict, where: str = "QAT option") -> QATSettings:
        """Settings from a recipe's `qat:` mapping or CLI flags; unknown names and wrong types
        are refused naming the option."""
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(values) - set(names))
        if unknown:
            raise SlimportError(f"{where} {', '.join(map(str, unknown))}: unknown",
                                hint="known: " + ", ".join(names))  # fmt: skip
        check_field_types(cls, values, where)
        return cls(**values)

    def __post_init__(self) -> None:
        if self.loss not in LOSSES:
            raise SlimportError(f"QAT loss {self.loss!r}: unknown", hint=" or ".join(LOSSES))
        for name in ("margin_weight", "hidden_weight", "zero_lr", "float_lr"):
            if getattr(self, name) < 0:
                raise SlimportError(f"QAT {name} {getattr(self, name)}: must be >= 0")
        for name in ("batch_size", "minutes"):
            if getattr(self, name) <= 0:
                raise SlimportError(f"QAT {name} {getattr(self, name)}: must be positive")
        if self.temperature <= 0:
            raise SlimportError(f"QAT temperature {self.temperature}: must be positive")
        if not 0 <= self.boundary <= 1:
            raise SlimportError(f"QAT boundary {self.boundary}: a share, in [0, 1]")


LOSSES = ("kl", "mse")


class FakeQuantLinear(nn.Module):
    """A QuantLinear that trains: latent float weight, (learnable) scales, fixed zero points."""

    def __init__(
        self,
        ql: QuantLinear,
        lsq: bool,
        float_weight: torch.Tensor | None = None,
        learn_zero: bool = False,
    ) -> None:
        super().__init__()
        self.weight_args: QuantArgs = ql.weight_args
        self.input_args: QuantArgs | None = ql.input_args
        w = ql.weight.detach().clone()
        if float_weight is not None:
            # the float weight moved into its PTQ integer's rounding bin: it rounds to the very
            # integer PTQ chose (RTN's: itself) yet keeps how far from a flip it sits; started
            # at the bin centres instead, no weight would flip in the first s/(2 lr) steps
            half = P.expand(ql.weight_scale.float(), w.shape, ql.weight_args) * (0.5 - 1e-3)
            w = torch.maximum(torch.minimum(float_weight.detach().float(), w + half), w - half)
        self.weight = nn.Parameter(w)
        self.bias = ql.bias
        log_s = ql.weight_scale.detach().float().log()
        self.log_scale = nn.Parameter(log_s, requires_grad=lsq)
        self.register_buffer("zero", ql.weight_zero_point.float())
        self.log_input_scale = None
        self.input_zero = None
        if ql.input_scale is not None:
            self.log_input_scale = nn.Parameter(ql.input_scale.float().log(), requires_grad=lsq)
            # a float that the forward rounds: gradients reach it only through the clamp (where
            # the integer window cuts values off), which is what moving the window trades
            self.input_zero = nn.Parameter(ql.input_zero_point.float(), requires_grad=learn_zero)

    def quantized_weight(self) -> torch.Tensor:
        return P.fake_quantize_ste(self.weight, self.weight_args, self.log_scale.exp(), self.zero)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.input_args
        if a is not None and a.dynamic:  # per-token scales: not learned, rounding passed straight
            x = x + (P.dynamic_fake_quantize(x.detach(), a) - x).detach()
        elif self.log_input_scale is not None:
            qmin, qmax = P.qrange(a.bits)
            s, z = self.log_input_scale.exp(), self._input_zero()
            x = (torch.clamp(P.round_ste(x / s) + z, qmin, qmax) - z) * s
        return F.linear(x, self.quantized_weight(), self.bias)

    def _input_zero(self) -> torch.Tensor:
        qmin, qmax = P.qrange(self.input_args.bits)
        return P.round_ste(torch.clamp(self.input_zero, qmin, qmax))

    def to_quant_linear(self, name: str) -> QuantLinear:
        """Round the trained weight onto the trained grid: the integers a loader will read."""
        with torch.no_grad():
            scale = self.log_scale.exp()
            P.check_scale(f"{name}.weight", scale)
            q = P.quantize_tensor(self.weight, self.weight_args, scale, self.zero)
            ql = QuantLinear(q, scale, self.zero, self.bias, self.weight_args, self.input_args)
            if self.log_input_scale is not None:
                s = self.log_input_scale.exp()
                P.check_scale(f"{name} input", s)
                ql.set_input_qparams(s, self._input_zero())
        return ql


def float_parameters(model: nn.Module, fq: dict[str, FakeQuantLinear]) -> list[nn.Parameter]:
    """What `float_lr` trains: every parameter but the fake-quantized weights and their scales
    (trained by their own groups) and embedding tables (a tied head's weight is one of them)."""
    skip = {
        id(p) for m in fq.values() for p in (m.weight, m.log_scale, m.log_input_scale, m.input_zero)
    }
    skip |= {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    return [p for p in model.parameters() if id(p) not in skip and p.is_floating_point()]


def _swap(model: nn.Module, kind: type, make) -> dict[str, nn.Module]:
    from slimport.io.hf import set_module

    done = {}
    for name, m in list(model.named_modules()):
        if isinstance(m, kind):
            done[name] = make(name, m)
            set_module(model, name, done[name])
    return done


def kd_loss(student: torch.Tensor, teacher: torch.Tensor, t: float, mask=None) -> torch.Tensor:
    """T^2 * KL(teacher/T || student/T) over the last dim, averaged over rows (real tokens)."""
    log_q = F.log_softmax(student.float() / t, dim=-1)
    log_p = F.log_softmax(teacher.float() / t, dim=-1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)
    if mask is not None:
        return t * t * (kl * mask).sum() / mask.sum()
    return t * t * kl.mean()


def _margins(logits: torch.Tensor, cls: torch.Tensor) -> torch.Tensor:
    """Each row's logit of class `cls` minus its largest other logit."""
    own = logits.gather(-1, cls.unsqueeze(-1)).squeeze(-1)
    others = logits.scatter(-1, cls.unsqueeze(-1), float("-inf"))
    return own - others.amax(-1)


def qat_loss(student, teacher, settings: QATSettings, mask=None) -> torch.Tensor:
    """The QAT objective between the student's and the float model's outputs (HF outputs with
    `logits`, and `hidden_states` when hidden_weight > 0); `mask` [batch, tokens] leaves
    padding out of per-token terms.

    kl: T^2 KL at temperature T. On a fine-tuned classifier's training text the float model is
    sure of most rows, so KL's gradient (p(1-p) times the logit error) is near zero there; mse
    weighs every row's logit error alike (KL as T grows: the same up to centring).
    margin_weight * mean relu(min(margin, teacher margin) - student margin), margins taken at
    the teacher's argmax: nonzero only where the student is less decided than the teacher.
    hidden_weight * mean over layers of |h_s - h_t|^2 / |h_t|^2 (real tokens only)."""
    s, t = student.logits.float(), teacher.logits.float()
    m = None if mask is None or s.ndim != 3 else mask.float()
    if settings.loss == "kl":
        loss = kd_loss(s, t, settings.temperature, m)
    else:
        err = (s - t).pow(2).mean(-1)
        loss = err.mean() if m is None else (err * m).sum() / m.sum()
    if settings.margin_weight:
        cls = t.argmax(-1)
        goal = torch.clamp(_margins(t, cls), max=settings.margin)
        hinge = F.relu(goal - _margins(s, cls))
        hinge = hinge.mean() if m is None else (hinge * m).sum() / m.sum()
        loss = loss + settings.margin_weight * hinge
    if settings.hidden_weight:
        w = None if mask is None else mask.float().unsqueeze(-1)
        terms = []
        for hs, ht in zip(student.hidden_states[1:], teacher.hidden_states[1:], strict=True):
            d, r = (hs.float() - ht.float()).pow(2), ht.float().pow(2)
            if w is not None:
                d, r = d * w, r * w
            terms.append(d.sum() / r.sum().clamp_min(1e-12))
        loss = loss + settings.hidden_weight * torch.stack(terms).mean()
    return loss


def train_qat(
    model: nn.Module,
    teacher: nn.Module,
    batches: list[dict],
    settings: QATSettings,
    progress: bool = True,
) -> dict:
    """QAT of a model holding QuantLinears, in place (they come back as QuantLinears holding the
    trained integers); `teacher` is the float model. Returns the training record."""
    s = settings
    t0 = time.perf_counter()
    deadline = t0 + s.minutes * 60
    for p in list(model.parameters()) + list(teacher.parameters()):
        p.requires_grad_(False)
    ptq_ints = {
        n: m.qweight.clone() for n, m in model.named_modules() if isinstance(m, QuantLinear)
    }
    floats = dict(teacher.named_modules())
    fq = _swap(
        model,
        QuantLinear,
        lambda n, m: FakeQuantLinear(m, s.lsq, floats[n].weight, learn_zero=s.zero_lr > 0),
    )
    if not fq:
        raise SlimportError("QAT: the model has no quantized Linear layers")
    weights = [m.weight for m in fq.values()]
    scales = [p for m in fq.values() for p in (m.log_scale, m.log_input_scale)
              if p is not None and p.requires_grad]  # fmt: skip
    groups = [{"params": weights, "lr": s.lr}]
    if scales:
        # scale gradients are ~1e-12 (a sum of tiny terms): Adam's default eps 1e-8 would
        # swallow them; with eps ~0 each log-scale moves ~scale_lr per step
        groups.append({"params": scales, "lr": s.scale_lr, "eps": 1e-30})
    zeros = [m.input_zero for m in fq.values() if m.input_zero is not None and s.zero_lr > 0]
    if zeros:  # Adam: ~zero_lr integer units per step, whatever the gradient's size
        groups.append({"params": zeros, "lr": s.zero_lr, "eps": 1e-30})
    rest = float_parameters(model, fq) if s.float_lr > 0 else []
    for p in rest:
        p.requires_grad_(True)
    if rest:
        groups.append({"params": rest, "lr": s.float_lr})
    optimizer = torch.optim.Adam(groups)
    warmup = max(1, round(s.warmup * s.steps))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda i: lr_factor(i, s.steps, warmup)
    )
    teacher.eval()
    model.eval()  # no dropout: the student should match the teacher's deterministic logits
    losses: list[float] = []
    with torch_threads(s.threads):
        bar = tqdm(total=s.steps, desc="qat", unit="step", disable=not progress or None)
        for step in range(s.steps):
            if time.perf_counter() > deadline:
                break
            batch = batches[step % len(batches)]
            mask = batch.get("attention_mask")
            hidden = {"output_hidden_states": True} if s.hidden_weight else {}
            with torch.no_grad():
                target = teacher(**batch, **hidden)
            loss = qat_loss(model(**batch, **hidden), target, s, mask)
            loss.backward()
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(round(loss.item(), 6))
            bar.update()
            bar.set_postfix(loss=f"{sum(losses[-10:]) / len(losses[-10:]):.4f}")
        bar.close()
    quantized = _swap(model, FakeQuantLinear, lambda n, m: m.to_quant_linear(n))
    changed = sum(int((q.qweight != ptq_ints[n]).sum()) for n, q in quantized.items())
    return {
        "steps": len(losses),
        "stopped_early": len(losses) < s.steps,
        "losses": losses,
        "integers_changed": changed / sum(q.qweight.numel() for q in quantized.values()),
        "seconds": round(time.perf_counter() - t0, 1),
    }


def training_batches(
    source, config: QuantizationConfig, settings: QATSettings, teacher: nn.Module | None = None
) -> list[dict]:
    """The QAT steps' inputs from the recipe's calibration text: `steps * batch_size` windows of
    seq_len tokens (LMs) or batches of 32 sentences (encoders), seeded by the recipe; with
    `boundary`, that share of the sentences are those `teacher` is least sure of."""
    from slimport.arch.layout import is_causal_lm
    from slimport.compress.calibration import calibration_inputs
    from slimport.convert.loader import model_config
    from slimport.io.auto import open_checkpoint
    from slimport.io.hf import load_tokenizer

    if not config.calib_data:
        raise SlimportError(
            "QAT trains on text and no calib_data was given",
            hint="pass --calib-data FILE (task text such as WikiText-2 train/valid or SST-2 "
            "train; never the test split)",
        )
    with open_checkpoint(source) as ckpt:
        causal = is_causal_lm(model_config(ckpt) or {})
    if causal and settings.boundary:
        raise SlimportError(
            "QAT boundary: draws classifier sentences by the float model's margin; a causal LM "
            "has no decision boundary to draw from",
            hint="leave boundary at 0 for language models",
        )
    per_batch = settings.batch_size if causal else 32 * settings.batch_size
    n = settings.steps * per_batch
    tokenizer = load_tokenizer(source)
    pool = None
    if not causal:  # as many sentences as the file has, reused in order after that
        from slimport.data import read_texts

        pool = read_texts(config.calib_data)
        n = min(n, len(pool))
    cfg = dataclasses.replace(config, num_samples=n, seed=config.seed + 1)  # not the PTQ sample
    if settings.boundary:
        with torch_threads(settings.threads):
            pool = boundary_pool(pool, n, settings.boundary, teacher, tokenizer, cfg)
    return calibration_inputs(
        tokenizer, config.calib_data, cfg, causal, per_batch,
        sort_by_length=settings.sort_by_length, texts=pool,
    )  # fmt: skip


@torch.no_grad()
def boundary_pool(pool, n, share, teacher, tokenizer, config) -> list[str]:
    """`n` sentences of `pool`: the round(share * n) with the smallest top-1 minus top-2 logit
    of the float `teacher`, the rest drawn at random (seeded) from the others."""
    order = sorted(range(len(pool)), key=lambda i: len(pool[i]))  # little padding per batch
    margin = torch.empty(len(pool))
    for start in range(0, len(order), 256):
        rows = order[start : start + 256]
        enc = tokenizer([pool[i] for i in rows], padding=True, truncation=True,
                        max_length=config.seq_len, return_tensors="pt", padding_side="right")  # fmt: skip
        top = teacher(**enc).logits.float().topk(2, dim=-1).values
        margin[rows] = top[:, 0] - top[:, 1]
    k = round(share * n)
    near = margin.argsort()[:k].tolist()
    rest = sorted(set(range(len(pool))) - set(near))
    gen = torch.Generator().manual_seed(config.seed)
    rest = [rest[i] for i in torch.randperm(len(rest), generator=gen)[: n - k].tolist()]
    return [pool[i] for i in near + rest]


def float_model(source) -> nn.Module:
    """The float model QAT distils from (the PTQ source, any checkpoint slimport reads)."""
    import tempfile

    from slimport.compress.students import hf_folder
    from slimport.io.hf import model_class

    with tempfile.TemporaryDirectory(prefix="slimport-qat-") as scratch:
        folder = hf_folder(source, Path(scratch))
        config = json.loads((folder / "config.json").read_text())
        cls = model_class((config.get("architectures") or [None])[0])
        return cls.from_pretrained(folder, dtype=torch.float32).eval()


def quantize_aware(
    source: str | Path,
    out: str | Path,
    config: QuantizationConfig,
    settings: QATSettings,
    progress: bool = True,
    overwrite: bool = False,
) -> dict:
    """PTQ by the recipe, then QAT: the compressed-tensors folder `out` (as `quantize` writes
    it, + qat_report.json). Returns the PTQ report with a `qat` entry."""
    import tempfile

    from slimport.compress import pipeline
    from slimport.compress.quant.compressed import load_simulated
    from slimport.compress.writer import save_quantized
    from slimport.io.base import atomic_dir, check_output_dir

    out = Path(out)
    check_output_dir(out, overwrite, Path(source))
    if settings.steps < 1:
        raise SlimportError(f"--qat {settings.steps}: the number of steps must be positive")
    if config.gguf_compatible and settings.lsq:
        raise SlimportError(
            "learned scales are not float16 values: QAT with gguf_compatible needs lsq off",
            hint="pass --no-lsq",
        )
    teacher = float_model(source) if settings.boundary else None
    batches = training_batches(source, config, settings, teacher)
    with tempfile.TemporaryDirectory(prefix="slimport-ptq-", dir=out.parent) as scratch:
        from slimport.compress.api import quantize

        ptq = Path(scratch) / "ptq"
        report = quantize(source, ptq, config, progress=progress)
        model, qconfig = load_simulated(ptq)
        teacher = teacher or float_model(source)
        record = train_qat(model, teacher, batches, settings, progress)
        del teacher
        with atomic_dir(out, overwrite, Path(source)) as tmp:
            files = save_quantized(model, tmp, qconfig, tokenizer_dir=ptq)
            record.update(settings=dataclasses.asdict(settings), files=files["files"])
            report = {**report, "qat": record, "bytes_after": files["bytes_after"]}
            (tmp / pipeline.report_file(config)).write_text(json.dumps(report, indent=2) + "\n")
            (tmp / REPORT).write_text(json.dumps(record, indent=2) + "\n")
    return report
