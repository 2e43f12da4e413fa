"""`generate` shows a bar of the new tokens on stderr in every runtime, and the bar changes
nothing in what is generated."""

from __future__ import annotations

from slimport.runtime import text


def test_torch_generate_counts_new_tokens_on_a_bar_without_changing_them(smollm2_hf, monkeypatch):
    counted = []

    class Bar(text._TokenBar):
        def end(self) -> None:
            counted.append(self.steps)
            super().end()

    monkeypatch.setattr(text, "_TokenBar", Bar)
    prompts = ["Once upon a time", "The capital of France is"]
    plain = text.generate_text(smollm2_hf, prompts, runtime="torch", max_new_tokens=5)
    shown = text.generate_text(
        smollm2_hf, prompts, runtime="torch", max_new_tokens=5, progress=True
    )
    assert shown == plain
    assert counted == [5]  # the prompt is not counted, every new token is
