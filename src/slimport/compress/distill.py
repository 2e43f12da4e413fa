"""Knowledge distillation: a smaller student trained to match a teacher (DistilBERT, MiniLM).

loss = alpha * T^2 * KL(teacher/T || student/T) + (1 - alpha) * CE(student, labels)
       [+ hidden_weight * MSE or cosine of mapped hidden states]
       [+ attention_weight * KL of mapped attention distributions (MiniLM)]

The student is made from the teacher by keeping some of its layers (`layers:0,2,4`, `every:2`
as DistilBERT's init, `depth:N` evenly spaced), built from a smaller config.json (random init), or
read from any checkpoint slimport reads; with `keep_sparsity` a pruned student (`slimport prune`)
keeps its zeros, so distillation from the dense model recovers what pruning cost without
undoing it. Two tasks: `sst2` (sequence classification, labels from
a .tsv/.jsonl) and `lm` (next-token prediction on random windows of a text, as calibration draws
them). With the logit loss alone the teacher runs once: its logits are cached on disk, keyed by
teacher, data and settings (for `lm`, the top-k logits of each position: a sparse KD target).
Hidden-state and attention losses need the teacher beside the student at every step.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F
from tqdm import tqdm

from slimport.compress.students import (
    blocks_of,
    check_compatible,
    hf_folder,
    layer_map,
    load_model,
    make_student,
)
from slimport.compress.training import (
    adamw,
    cache_root,
    length_grouped_batches,
    lr_factor,
    torch_threads,
)
from slimport.data import calibration_batches, read_labeled
from slimport.errors import SlimportError
from slimport.io.base import atomic_dir, atomic_path

TASKS = ("sst2", "lm")
HIDDEN_LOSSES = ("mse", "cosine")
Metric = Callable[[nn.Module, object], dict]  # (model, tokenizer) -> {"accuracy": 0.9, ...}


@dataclass(frozen=True)
class DistillSettings:
    alpha: float = 0.8  # share of the soft (teacher) loss; 0 = plain training on labels
    temperature: float = 2.0
    hidden_loss: str | None = None  # mse | cosine on mapped hidden states
    hidden_weight: float = 1.0
    hidden_projection: bool = False  # a learned Linear when student and teacher widths differ
    attention_weight: float = 0.0  # > 0: KL of the last layers' attention maps (MiniLM)
    max_steps: int = 800
    lr: float = 1e-4
    batch_size: int = 32
    warmup: float = 0.06
    weight_decay: float = 0.01
    max_length: int = 128  # sst2: tokens per sentence
    seq_len: int = 256  # lm: tokens per window
    top_k: int = 64  # lm: teacher logits kept per position in the cache
    freeze_embeddings: bool = True
    keep_sparsity: bool = False  # a pruned student: its blocks' zero weights stay zero
    seed: int = 0
    minutes: float = 15.0
    threads: int | None = 1
    eval_every: int = 0

    def check(self) -> None:
        def bad(what: str) -> SlimportError:
            return SlimportError(f"distill option {what}")

        if not 0 <= self.alpha <= 1:
            raise bad(f"alpha {self.alpha}: must be in [0, 1]")
        if self.temperature <= 0:
            raise bad(f"temperature {self.temperature}: must be positive")
        if self.hidden_loss not in (None, *HIDDEN_LOSSES):
            raise bad(f"hidden_loss {self.hidden_loss!r}: choose {' or '.join(HIDDEN_LOSSES)}")
        for name in ("max_steps", "batch_size", "max_length", "seq_len", "top_k"):
            if getattr(self, name) < 1:
                raise bad(f"{name} {getattr(self, name)}: must be a positive integer")
        if self.lr <= 0 or self.attention_weight < 0 or self.hidden_weight < 0:
            raise bad("lr must be positive, the loss weights non-negative")

    @property
    def needs_teacher_states(self) -> bool:
        return self.hidden_loss is not None or self.attention_weight > 0


def teacher_id(folder: Path) -> str:
    files = sorted(folder.glob("*.safetensors"))
    return json.dumps(
        [str(folder.resolve())] + [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in files]
    )


# ----------------------------------------------------------------- data and the teacher cache


@dataclass
class TaskData:
    """Training examples of one task: SST-2 token lists + labels, or LM windows [n, seq_len]."""

    task: str
    texts: list[str] | None = None
    labels: torch.Tensor | None = None
    windows: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.texts) if self.task == "sst2" else len(self.windows)

    def digest(self) -> str:
        h = hashlib.sha256()
        if self.task == "sst2":
            h.update("\n".join(self.texts).encode())
        else:
            h.update(self.windows.numpy().tobytes())
        return h.hexdigest()


def read_task_data(task, tokenizer, train: Path, settings: DistillSettings, windows: int):
    if task == "sst2":
        texts, labels = read_labeled(train)
        return TaskData(task, texts=texts, labels=torch.tensor(labels))
    ids = calibration_batches(tokenizer, train, windows, settings.seq_len, settings.seed)
    return TaskData(task, windows=ids)


class TeacherCache:
    """The teacher's logits for every example it was ever asked about, on disk. SST-2 keeps all
    classes; an LM the top-k logits and their token ids at each position (float16 / int32)."""

    def __init__(self, path: Path, n: int, shape: tuple[int, ...]) -> None:
        self.path = path
        if path.is_file():
            try:
                self.data = torch.load(path, weights_only=True)
            except (OSError, RuntimeError, EOFError) as e:
                raise SlimportError(
                    f"{path}: damaged teacher cache ({e})", hint="delete it"
                ) from None
        else:
            self.data = {
                "done": torch.zeros(n, dtype=torch.bool),
                "values": torch.zeros(n, *shape, dtype=torch.float16),
                "indices": torch.zeros(n, *shape, dtype=torch.int32),
            }

    def missing(self, needed: set[int]) -> list[int]:
        return sorted(i for i in needed if not self.data["done"][i])

    def store(self, rows: list[int], values: torch.Tensor, indices: torch.Tensor) -> None:
        self.data["values"][rows] = values.to(torch.float16)
        self.data["indices"][rows] = indices.to(torch.int32)
        self.data["done"][rows] = True

    def save(self) -> None:
        with atomic_path(self.path) as tmp:
            torch.save(self.data, tmp)

    def get(self, rows: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        return self.data["values"][rows].float(), self.data["indices"][rows].long()


def encode(tokenizer, data: TaskData, rows: list[int], settings: DistillSettings) -> dict:
    if data.task == "sst2":
        return dict(tokenizer(
            [data.texts[i] for i in rows], padding=True, truncation=True,
            max_length=settings.max_length, return_tensors="pt",
        ))  # fmt: skip
    return {"input_ids": data.windows[rows]}


def soft_targets(logits: torch.Tensor, task: str, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """What the cache keeps of teacher logits: all of a classifier's, an LM's top k."""
    if task == "sst2":
        idx = torch.arange(logits.shape[-1]).expand_as(logits)
        return logits, idx
    return logits.topk(min(top_k, logits.shape[-1]), dim=-1)


@torch.no_grad()
def fill_cache(cache: TeacherCache, teacher, tokenizer, data, rows, settings, progress) -> float:
    """Run the teacher on the `rows` the cache lacks; returns the seconds it took."""
    t0 = time.perf_counter()
    if data.task == "sst2":  # sorted by length: little padding
        rows = sorted(rows, key=lambda i: len(data.texts[i]))
    size = 64 if data.task == "sst2" else 1
    for start in tqdm(range(0, len(rows), size), desc="teacher logits", disable=not progress):
        chunk = rows[start : start + size]
        logits = teacher(**encode(tokenizer, data, chunk, settings)).logits.float()
        cache.store(chunk, *soft_targets(logits, data.task, settings.top_k))
    return time.perf_counter() - t0


# ----------------------------------------------------------------- losses


def kd_loss(student_logits, values, indices, temperature: float, mask=None) -> torch.Tensor:
    """T^2 * KL(teacher || student) at temperature T over the teacher's kept classes (all of
    them for a classifier; an LM's top k, the teacher renormalised over them)."""
    t = temperature
    log_q = F.log_softmax(student_logits.float() / t, dim=-1).gather(-1, indices)
    log_p = F.log_softmax(values / t, dim=-1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)
    if mask is not None:
        return t * t * (kl * mask).sum() / mask.sum()
    return t * t * kl.mean()


def hidden_loss(hs, ht, mask, kind: str, proj: nn.Module | None) -> torch.Tensor:
    if proj is not None:
        hs = proj(hs)
    per = (hs - ht).pow(2).mean(-1) if kind == "mse" else 1 - F.cosine_similarity(hs, ht, dim=-1)
    return (per * mask).sum() / mask.sum()


def attention_loss(att_s, att_t, mask) -> torch.Tensor:
    """KL(teacher || student) of each head's attention distribution, over real query tokens."""
    kl = (att_t * (att_t.clamp_min(1e-12).log() - att_s.clamp_min(1e-12).log())).sum(-1)
    return (kl.mean(1) * mask).sum() / mask.sum()  # [batch, heads, query] -> per token


def task_loss(logits, batch: dict, labels, task: str) -> torch.Tensor:
    if task == "sst2":
        return F.cross_entropy(logits.float(), labels)
    ids = batch["input_ids"]
    return F.cross_entropy(logits[:, :-1].float().flatten(0, 1), ids[:, 1:].flatten())


# ----------------------------------------------------------------- training


def distill(
    teacher: str | Path,
    out: str | Path,
    student: str | Path | None = None,
    task: str = "sst2",
    train: str | Path | None = None,
    settings: DistillSettings | None = None,
    metric: Metric | None = None,
    cache_dir: str | Path | None = None,
    progress: bool = True,
) -> dict:
    """Distil `teacher` (a `task` model, any checkpoint slimport reads) into `student` trained
    on `train`; save it to `out` (HF folder + distill_report.json, atomically).

    `metric(model, tokenizer)` (e.g. dev accuracy, held-out perplexity) is reported every `eval_every`
    steps and at the end. `alpha=0` without hidden/attention losses trains the same student
    on labels alone, without running the teacher: the baseline distillation is measured against.
    """
    settings = settings or DistillSettings()
    settings.check()
    if task not in TASKS:
        raise SlimportError(f"unknown distill task {task!r}; choose {', '.join(TASKS)}")
    if train is None:
        raise SlimportError("distill needs training data", hint="pass --train FILE")
    t0 = time.perf_counter()
    budget = settings.minutes * 60
    deadline = t0 + budget - min(30.0, 0.1 * budget)  # keep time to evaluate and save
    out, train = Path(out), Path(train)
    from slimport.io.base import check_output_dir

    check_output_dir(out)
    with atomic_dir(out) as tmp, torch_threads(settings.threads):
        report = _distill(teacher, tmp, student, task, train, settings, metric, cache_dir,
                          progress, t0, deadline)  # fmt: skip
    return report


def _distill(
    teacher, tmp, student, task, train, settings, metric, cache_dir, progress, t0, deadline
):
    from transformers import AutoTokenizer

    s = settings
    scratch = tmp / ".scratch"
    t_folder = hf_folder(teacher, scratch)
    tokenizer = AutoTokenizer.from_pretrained(t_folder)  # right padding: BERT positions
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    teacher_net = load_model(t_folder, task, attention=s.attention_weight > 0).eval()
    for p in teacher_net.parameters():
        p.requires_grad_(False)
    torch.manual_seed(s.seed)  # classifier head or config init, dropout masks
    net, keep, described = make_student(teacher_net, student, task, scratch, s.seed)
    for p in net.parameters():  # a copy of the frozen teacher is frozen too
        p.requires_grad_(True)
    if s.attention_weight > 0:
        net.config._attn_implementation = "eager"
    proj = check_compatible(net, teacher_net, s, task)
    data = read_task_data(task, tokenizer, train, s, s.max_steps * s.batch_size)
    if task == "sst2":
        bad = [int(y) for y in data.labels if not 0 <= y < teacher_net.config.num_labels]
        if bad:
            raise SlimportError(
                f"{train}: label {bad[0]} is not one of the teacher's "
                f"{teacher_net.config.num_labels} classes"
            )
    n_t, n_s = len(blocks_of(teacher_net)[1]), len(blocks_of(net)[1])
    mapping = layer_map(n_s, n_t, keep)

    gen = torch.Generator().manual_seed(s.seed)
    if task == "sst2":  # whitespace words track wordpiece counts closely, at no cost
        lengths = [len(t.split()) for t in data.texts]
        schedule = list(length_grouped_batches(lengths, s.batch_size, s.max_steps, gen))
    else:
        order = torch.randperm(len(data), generator=gen).tolist()
        schedule = [order[i : i + s.batch_size] for i in range(0, len(order), s.batch_size)]
        schedule = schedule[: s.max_steps]

    cache_info = None
    cache = None
    if s.alpha > 0 and not s.needs_teacher_states:
        shape = (teacher_net.config.num_labels,) if task == "sst2" else (s.seq_len, s.top_k)
        key = hashlib.sha256(
            json.dumps([teacher_id(t_folder), data.digest(), task, s.max_length, s.top_k]).encode()
        ).hexdigest()[:16]
        root = Path(cache_dir) if cache_dir else cache_root() / "distill"
        cache = TeacherCache(root / f"{task}-{key}.pt", len(data), shape)
        todo = cache.missing({i for b in schedule for i in b})
        seconds = (
            fill_cache(cache, teacher_net, tokenizer, data, todo, s, progress) if todo else 0.0
        )
        if todo:
            cache.save()
        cache_info = {"file": str(cache.path), "computed": len(todo), "seconds": round(seconds, 1)}

    if s.freeze_embeddings:
        emb = net.get_input_embeddings()
        emb.weight.requires_grad_(False)
    masks = sparsity_masks(net, student) if s.keep_sparsity else {}
    params = nn.ModuleList([net] + ([proj] if proj is not None else []))
    optimizer = adamw(params, s.lr, s.weight_decay)
    warmup = max(1, round(s.warmup * len(schedule)))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda i: lr_factor(i, len(schedule), warmup)
    )
    curve, evals, done, loss_ema = [], [], 0, None
    net.train()
    bar = tqdm(total=len(schedule), desc=f"distill {task}", unit="step", disable=not progress)
    for rows in schedule:
        if time.perf_counter() > deadline:
            break
        batch = encode(tokenizer, data, rows, s)
        labels = data.labels[rows] if task == "sst2" else None
        loss = _step_loss(net, teacher_net, cache, batch, rows, labels, s, task, mapping, proj)
        loss.backward()
        optimizer.step()
        _reapply(masks)
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        done += 1
        loss_ema = loss.item() if loss_ema is None else 0.95 * loss_ema + 0.05 * loss.item()
        bar.update()
        curve.append(round(loss.item(), 5))
        if done % 10 == 0:
            bar.set_postfix(loss=f"{loss_ema:.3f}")
        if metric and s.eval_every and done % s.eval_every == 0 and done < len(schedule):
            evals.append({"step": done, **metric(net, tokenizer)})
            bar.set_postfix(loss=f"{loss_ema:.3f}", **_shown(evals[-1]))
            net.train()
    bar.close()
    train_seconds = time.perf_counter() - t0
    net.eval()
    final = metric(net, tokenizer) if metric else {}
    if done < len(schedule):
        print(f"distill: the {s.minutes:g}-minute budget ran out after {done} of "
              f"{len(schedule)} steps; the student was evaluated and saved as it is")  # fmt: skip
    report = {
        "task": task,
        "teacher": str(teacher),
        "student": described,
        "student_layers": n_s,
        "teacher_layers": n_t,
        "layer_map": mapping if s.needs_teacher_states else None,
        "parameters": {"teacher": _count(teacher_net), "student": _count(net)},
        "steps": done,
        "planned_steps": len(schedule),
        "stopped_early": done < len(schedule),
        "train_seconds": round(train_seconds, 1),
        "threads": torch.get_num_threads(),
        "teacher_cache": cache_info,
        "sparsity": _sparsity(masks) if masks else None,
        "settings": dataclasses.asdict(s),
        "train_data": str(train),
        "losses": curve,  # one per step
        "evals": evals,
        **final,
    }
    import shutil

    shutil.rmtree(scratch, ignore_errors=True)
    net.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "distill_report.json").write_text(json.dumps(report, indent=2) + "\n")
    report["seconds"] = round(time.perf_counter() - t0, 1)
    return report


def sparsity_masks(net: nn.Module, student) -> dict[nn.Linear, torch.Tensor]:
    """The nonzero pattern of each block Linear that has zeros; their gradients are masked, so
    AdamW's moments stay zero there too, and the weights are re-masked after every step."""
    masks = {}
    for m in blocks_of(net)[1].modules():
        if isinstance(m, nn.Linear) and not bool((keep := m.weight != 0).all()):
            masks[m] = keep
            m.weight.register_hook(functools.partial(torch.mul, other=keep))
    if not masks:
        raise SlimportError(
            f"keep_sparsity: the student ({student or 'cut from the teacher'}) has no zero "
            "weights in its blocks' Linear layers",
            hint="pass a pruned checkpoint as --student (slimport prune MODEL OUT ...)",
        )
    return masks


@torch.no_grad()
def _reapply(masks: dict[nn.Linear, torch.Tensor]) -> None:
    for m, keep in masks.items():
        m.weight.mul_(keep)


def _sparsity(masks: dict[nn.Linear, torch.Tensor]) -> dict:
    kept = sum(int((m.weight != 0).sum()) for m in masks)
    total = sum(m.weight.numel() for m in masks)
    return {"modules": len(masks), "zeros": round(1 - kept / total, 6)}


def _shown(values: dict) -> dict:
    return {k: f"{v:.4g}" for k, v in values.items() if isinstance(v, float)}


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _step_loss(net, teacher, cache, batch, rows, labels, s: DistillSettings, task, mapping, proj):
    states = s.needs_teacher_states
    out = net(**batch, output_hidden_states=states, output_attentions=s.attention_weight > 0)
    loss = task_loss(out.logits, batch, labels, task) if s.alpha < 1 else 0.0
    if s.alpha == 0 and not states:
        return loss
    mask = batch.get("attention_mask", torch.ones_like(batch["input_ids"])).float()
    if cache is not None:
        values, indices = cache.get(rows)
    else:
        with torch.no_grad():
            t_out = teacher(**batch, output_hidden_states=states,
                            output_attentions=s.attention_weight > 0)  # fmt: skip
        values, indices = soft_targets(t_out.logits.float(), task, s.top_k)
    total = (1 - s.alpha) * loss
    if s.alpha > 0:
        logits = out.logits if task == "sst2" else out.logits[:, :-1]
        kd_mask = None if task == "sst2" else mask[:, 1:]
        if task == "lm":
            values, indices = values[:, :-1], indices[:, :-1]
        total = total + s.alpha * kd_loss(logits, values, indices, s.temperature, kd_mask)
    if s.hidden_loss:
        pairs = [(0, 0)] + [(k + 1, t + 1) for k, t in enumerate(mapping)]  # 0: embeddings
        h = sum(
            hidden_loss(out.hidden_states[a], t_out.hidden_states[b], mask, s.hidden_loss, proj)
            for a, b in pairs
        )
        total = total + s.hidden_weight * h / len(pairs)
    if s.attention_weight > 0:  # MiniLM: the last layers' self-attention distributions
        total = total + s.attention_weight * attention_loss(
            out.attentions[-1], t_out.attentions[-1], mask
        )
    return total
