"""User name mappings: `{"layer_{}.attn.q": "model.layers.{}.self_attn.q_proj"}`.

A key matches a whole source name or a dotted prefix of it; `{}` stands for a layer number
that the value reuses. Applied to source names before the family rules see them.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import yaml

from slimport.errors import SlimportError
from slimport.io.base import Checkpoint


def load_mapping(path: str | Path) -> dict[str, str]:
    p = Path(path)
    try:
        text = p.read_text()
        data = json.loads(text) if p.suffix == ".json" else yaml.safe_load(text)
    except (OSError, ValueError, yaml.YAMLError) as e:
        raise SlimportError(f"--mapping {p}: cannot read ({e})") from None
    if not isinstance(data, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in data.items()
    ):
        raise SlimportError(
            f"--mapping {p}: expected a mapping of source pattern -> target pattern strings"
        )
    return data


def _compile(pattern: str) -> re.Pattern:
    parts = [re.escape(p) for p in pattern.split("{}")]
    return re.compile(r"(\d+)".join(parts) + r"(?=\.|$)")


def apply_mapping(ckpt: Checkpoint, mapping: dict[str, str]) -> tuple[Checkpoint, dict[str, str]]:
    """Rename the checkpoint's tensors; returns the renamed view and {new: old} names."""
    compiled = []
    for src, dst in mapping.items():
        if src.count("{}") != dst.count("{}"):
            raise SlimportError(
                f"mapping {src!r} -> {dst!r}: both sides need the same number of '{{}}'"
            )
        compiled.append((_compile(src), dst))
    renamed: dict[str, str] = {}
    for name in ckpt.infos:
        new = name
        for rx, dst in compiled:
            m = rx.match(name)
            if m:
                new = _fill(dst, m.groups()) + name[m.end() :]
                break
        if new in renamed:
            raise SlimportError(f"mapping sends both {renamed[new]!r} and {name!r} to {new!r}")
        renamed[new] = name
    used = [
        s
        for s, (rx, _) in zip(mapping, compiled, strict=True)
        if any(rx.match(n) for n in ckpt.infos)
    ]
    unused = set(mapping) - set(used)
    if unused:
        raise SlimportError(f"mapping pattern(s) match no tensor in {ckpt.path}: {sorted(unused)}")
    return renamed_view(ckpt, renamed), {n: o for n, o in renamed.items() if n != o}


def renamed_view(ckpt: Checkpoint, renamed: dict[str, str]) -> Checkpoint:
    """The same checkpoint seen under new names ({new: old}); nothing is read."""
    return dataclasses.replace(
        ckpt,
        infos={new: ckpt.infos[old] for new, old in renamed.items()},
        loader=lambda n: ckpt.load(renamed[n]),
    )


def _fill(template: str, groups: tuple[str, ...]) -> str:
    out = template
    for g in groups:
        out = out.replace("{}", g, 1)
    return out
