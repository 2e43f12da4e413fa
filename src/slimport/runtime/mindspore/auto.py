"""Auto classes: pick the MindSpore model class from the checkpoint's config."""

from __future__ import annotations

import importlib
from pathlib import Path

from slimport.convert.loader import model_config
from slimport.errors import SlimportError
from slimport.io import open_checkpoint
from slimport.io.locate import resolve_model

# task -> model_type -> "module:Class" (modules under slimport.runtime.mindspore)
REGISTRY: dict[str, dict[str, str]] = {
    "base": {
        "bert": "bert:BertModel",
        "roberta": "bert:RobertaModel",
        "xlm-roberta": "bert:RobertaModel",
        "distilbert": "distilbert:DistilBertModel",
        "gpt2": "gpt2:GPT2Model",
        "llama": "llama:LlamaModel",
        "mistral": "llama:LlamaModel",
        "qwen2": "llama:LlamaModel",
    },
    "causal-lm": {
        "gpt2": "gpt2:GPT2LMHeadModel",
        "llama": "llama:LlamaForCausalLM",
        "mistral": "llama:LlamaForCausalLM",
        "qwen2": "llama:LlamaForCausalLM",
    },
    "sequence-classification": {
        "bert": "bert:BertForSequenceClassification",
        "roberta": "bert:RobertaForSequenceClassification",
        "xlm-roberta": "bert:RobertaForSequenceClassification",
        "distilbert": "distilbert:DistilBertForSequenceClassification",
    },
}


def model_class(task: str, model_type: str):
    classes = REGISTRY[task]
    if model_type not in classes:
        raise SlimportError(
            f"no MindSpore {task} model for model_type={model_type!r}",
            hint="available: " + ", ".join(sorted(classes)),
        )
    module, name = classes[model_type].split(":")
    return getattr(importlib.import_module(f"slimport.runtime.mindspore.{module}"), name)


class _Auto:
    task: str

    @classmethod
    def from_pretrained(cls, path: str | Path, **kwargs):
        """Like transformers' Auto classes: the config's model_type picks the class; any
        checkpoint slimport reads (flags from_pt/from_tf/from_gguf only confirm the format);
        `path` may be a `slimport models` name or a Hub id (`revision=` picks its revision)."""
        path = resolve_model(path, kwargs.pop("revision", None))
        with open_checkpoint(path, config=kwargs.get("config")) as ckpt:
            config = model_config(ckpt)
        if not config:
            raise SlimportError(
                f"{path}: no model config found", hint="pass config=PATH/config.json"
            )
        return model_class(cls.task, config.get("model_type")).from_pretrained(path, **kwargs)


class AutoModel(_Auto):
    task = "base"


class AutoModelForCausalLM(_Auto):
    task = "causal-lm"


class AutoModelForSequenceClassification(_Auto):
    task = "sequence-classification"
