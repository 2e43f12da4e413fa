"""slimport: make pretrained transformer models small and portable, with numbers to prove it."""

from slimport.errors import SlimportError

__version__ = "0.1.0"
__all__ = ["SlimportError", "__version__"]
