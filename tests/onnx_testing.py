"""Test helper: greedy tokens from onnxruntime-genai's own generator (og.Model on a folder)."""

from __future__ import annotations

from pathlib import Path


def genai_greedy(folder: Path, ids: list[int], new: int) -> list[int]:
    """The tokens og.Model generates after `ids`, greedily, until it stops (at most `new`)."""
    import onnxruntime_genai as og

    model = og.Model(str(folder))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(ids) + new, do_sample=False)
    gen = og.Generator(model, params)
    gen.append_tokens(ids)
    tokens = []
    while not gen.is_done():
        gen.generate_next_token()
        tokens.append(int(gen.get_next_tokens()[0]))
    return tokens
