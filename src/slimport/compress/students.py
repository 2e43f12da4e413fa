"""Students for distillation: cut from the teacher (DistilBERT's layer selection), built from a
smaller config, or read from any checkpoint; and how a student's layers map onto the teacher's."""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn

from slimport.arch.layout import layout_for
from slimport.compress.skeleton import find_blocks
from slimport.errors import SlimportError


def hf_folder(path: str | Path, scratch: Path) -> Path:
    """A Hugging Face folder for any checkpoint slimport reads (converted into `scratch`)."""
    path = Path(path)
    if path.is_dir() and (path / "config.json").is_file() and any(path.glob("*.safetensors")):
        return path
    from slimport.convert.loader import convert

    out = scratch / path.stem
    convert(path, out, to="hf", progress=False)
    return out


def load_model(folder: Path, task: str, attention: bool = False) -> nn.Module:
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    cls = AutoModelForSequenceClassification if task == "sst2" else AutoModelForCausalLM
    # attention maps come only from the eager kernels (sdpa does not return them)
    kw = {"attn_implementation": "eager"} if attention else {}
    try:
        return cls.from_pretrained(folder, **kw)
    except (OSError, ValueError) as e:
        raise SlimportError(f"{folder}: cannot load as a {task} model ({e})") from None


def blocks_of(model: nn.Module) -> tuple[str, nn.ModuleList]:
    return find_blocks(model, layout_for(model.config.model_type, type(model).__name__))


def parse_layers(spec: str, n: int) -> list[int]:
    """`layers:0,2,4` (ranges `0-3` too), `every:K` (0, K, 2K, ...) or `depth:N` (N evenly
    spaced layers, first and last kept) -> sorted teacher layer indices."""
    kind, _, arg = spec.partition(":")
    try:
        if kind == "layers":
            keep = []
            for part in arg.split(","):
                lo, _, hi = part.partition("-")
                keep += range(int(lo), int(hi or lo) + 1)
        elif kind == "every":
            keep = list(range(0, n, int(arg)))
        elif kind == "depth":
            d = int(arg)
            keep = [round(i * (n - 1) / (d - 1)) for i in range(d)] if d > 1 else [0]
        else:
            raise ValueError
    except (ValueError, ZeroDivisionError):
        raise SlimportError(
            f"--student {spec!r}: not a layer selection",
            hint="use layers:0,2,4, every:2 or depth:N, a config.json or a checkpoint",
        ) from None
    keep = sorted(set(keep))
    if not keep or keep[0] < 0 or keep[-1] >= n:
        raise SlimportError(f"--student {spec!r}: the teacher has layers 0..{n - 1}")
    return keep


def select_layers(teacher: nn.Module, keep: list[int]) -> nn.Module:
    """A copy of the teacher with only the `keep` blocks (DistilBERT's student init)."""
    student = copy.deepcopy(teacher)
    name, blocks = blocks_of(student)
    kept = nn.ModuleList(blocks[i] for i in keep)
    for i, block in enumerate(kept):  # the KV cache indexes layers by their attention's layer_idx
        for m in block.modules():
            if hasattr(m, "layer_idx"):
                m.layer_idx = i
    parent, _, leaf = name.rpartition(".")
    setattr(student.get_submodule(parent) if parent else student, leaf, kept)
    student.config.num_hidden_layers = len(keep)
    if isinstance(getattr(student.config, "layer_types", None), list):
        student.config.layer_types = [student.config.layer_types[i] for i in keep]
    return student


def make_student(
    teacher: nn.Module, spec: str | Path | None, task: str, scratch: Path, seed: int
) -> tuple[nn.Module, list[int] | None, str]:
    """(student, the teacher layers it was cut from or None, a description)."""
    n = len(blocks_of(teacher)[1])
    spec = spec or "every:2"
    path = Path(spec)
    if path.suffix == ".json" and path.is_file():
        from transformers import AutoConfig

        cfg = AutoConfig.from_pretrained(path)
        for k in ("num_labels", "id2label", "label2id"):
            if task == "sst2" and not hasattr(cfg, "_explicit_" + k):
                setattr(cfg, k, getattr(teacher.config, k))
        torch.manual_seed(seed)
        return type(teacher)(cfg), None, f"random init from {path}"
    if path.exists():
        return load_model(hf_folder(path, scratch), task), None, f"checkpoint {path}"
    keep = parse_layers(str(spec), n)
    return select_layers(teacher, keep), keep, f"teacher layers {keep} of {n}"


def layer_map(n_student: int, n_teacher: int, keep: list[int] | None) -> list[int]:
    """The teacher layer each student layer's output should match: the end of the span of
    teacher layers it replaces (students cut from the teacher), else uniform (TinyBERT)."""
    if keep:
        return [keep[k + 1] - 1 for k in range(len(keep) - 1)] + [n_teacher - 1]
    return [round((k + 1) * n_teacher / n_student) - 1 for k in range(n_student)]


def check_compatible(student, teacher, settings, task: str) -> nn.Module | None:
    """Refuse a student whose outputs cannot be compared to the teacher's; returns the hidden
    state projection (student width -> teacher width) when one is needed and allowed."""
    s, t = student.config, teacher.config
    out = "num_labels" if task == "sst2" else "vocab_size"
    if getattr(s, out) != getattr(t, out):
        raise SlimportError(
            f"the student has {out} {getattr(s, out)}, the teacher {getattr(t, out)}: their "
            "logits cannot be compared",
            hint="a student needs the teacher's labels (sst2) or tokenizer vocabulary (lm)",
        )
    if settings.attention_weight > 0 and s.num_attention_heads != t.num_attention_heads:
        raise SlimportError(
            f"attention transfer compares maps head by head: the student has "
            f"{s.num_attention_heads} heads, the teacher {t.num_attention_heads}",
            hint="give the student the teacher's head count, or leave out --attention-weight",
        )
    if settings.hidden_loss and s.hidden_size != t.hidden_size:
        if not settings.hidden_projection:
            raise SlimportError(
                f"the student's hidden size {s.hidden_size} cannot be compared to the "
                f"teacher's {t.hidden_size} without a projection",
                hint="add --hidden-projection (a learned Linear, dropped after training), or "
                "leave out --hidden-loss",
            )
        return nn.Linear(s.hidden_size, t.hidden_size, bias=False)
    return None
