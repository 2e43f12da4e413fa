"""`slimport analyze`: can this model move to a target, and what memory will it need?"""

from slimport.analyze.core import analyze, markdown, report

__all__ = ["analyze", "markdown", "report"]
