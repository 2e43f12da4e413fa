"""One exception type for everything a user can get wrong.

Every error names the file, tensor or option at fault and says what to do; the CLI prints the
message (no traceback) and exits with status 3 (`slimport.cli.REFUSED`).
"""

from __future__ import annotations


class SlimportError(Exception):
    """A problem with the user's input, explained in user terms."""

    def __init__(self, message: str, hint: str | None = None):
        self.message = message
        self.hint = hint
        super().__init__(message if hint is None else f"{message}\n  hint: {hint}")


def name_list(names, limit: int = 12) -> str:
    """Format a list of tensor names for an error message, truncated after `limit`."""
    names = sorted(names)
    shown = ", ".join(names[:limit])
    more = len(names) - limit
    return shown + (f", ... ({more} more)" if more > 0 else "")
