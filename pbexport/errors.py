"""The one exception type pbexport raises for bad input (torch-free: the runtime imports it)."""

from __future__ import annotations


class PbexportError(Exception):
    """A user-facing error: one line naming the file or input and the problem.

    The CLI prints it as ``error: <message>`` and exits with code 2. Library callers catch it
    instead of parsing messages; ``path`` (when known) names the offending file.
    """

    def __init__(self, message: str, path: str | None = None):
        if path is not None:
            message = f"{path}: {message}"
        super().__init__(message)
        self.path = path
