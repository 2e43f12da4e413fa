"""slimport: make pretrained transformer models small and portable, with numbers to prove it."""

from slimport.errors import SlimportError

__version__ = "0.1.0"
__all__ = ["SlimportError", "__version__", "load_quantized"]


def __getattr__(name: str):
    # lazy: `import slimport` (and `slimport --help`) must not import torch
    if name == "load_quantized":
        from slimport.runtime.torch.quantized import load_quantized

        return load_quantized
    raise AttributeError(f"module 'slimport' has no attribute {name!r}")
