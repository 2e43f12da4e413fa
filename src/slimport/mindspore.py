"""`from slimport.mindspore import AutoModelForCausalLM`: MindSpore models from any checkpoint."""

from slimport.runtime.mindspore.auto import (
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
)

__all__ = ["AutoModel", "AutoModelForCausalLM", "AutoModelForSequenceClassification"]
