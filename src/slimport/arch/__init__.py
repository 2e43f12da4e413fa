"""Model families and how to recognise them."""

from __future__ import annotations

from slimport.arch import bert, gpt2, llama
from slimport.arch.rules import Family
from slimport.errors import SlimportError

FAMILIES: tuple[Family, ...] = (
    llama.FAMILY,
    bert.FAMILY,
    bert.ROBERTA,
    bert.DISTILBERT,
    gpt2.FAMILY,
)


def register(family: Family) -> None:
    """Add a family (used by the family modules imported below)."""
    global FAMILIES
    FAMILIES = (*FAMILIES, family)


def family_for(model_type: str | None, where: str = "config") -> Family:
    for f in FAMILIES:
        if model_type in f.model_types:
            return f
    known = sorted(t for f in FAMILIES for t in f.model_types)
    raise SlimportError(
        f"unknown architecture model_type={model_type!r} in {where}",
        hint=f"supported model types: {', '.join(known)}",
    )


def resolve(config: dict | None, where: str) -> tuple[Family, dict]:
    """Family and normalised config for a checkpoint's config dict."""
    if not config:
        raise SlimportError(
            f"{where}: no model config found (config.json beside the weights)",
            hint="put the model's config.json next to the checkpoint or pass --config FILE",
        )
    family = family_for(config.get("model_type"), where)
    try:
        return family, family.normalize(config)
    except KeyError as e:
        raise SlimportError(f"{where}: config lacks required key {e}") from None
