"""The one error type every user-facing failure is raised as."""

from __future__ import annotations

import os
from pathlib import Path


def shown_path(path: str | Path) -> str:
    """``path`` as text that can be printed and sent anywhere: bytes of its name that are not UTF-8 (kept by
    Python as lone surrogates) become U+FFFD."""
    return os.fsencode(path).decode("utf-8", errors="replace")


class OrthoMechaError(Exception):
    """A problem the user can fix: bad input, a missing file, an invalid plan.

    The message names the file (when there is one) and the problem; the CLI prints it as one line
    and exits with status 2, the dashboard shows it with ``st.error``.
    """

    def __init__(self, message: str, path: str | Path | None = None) -> None:
        self.path = None if path is None else shown_path(path)
        super().__init__(f"{self.path}: {message}" if self.path else message)
