"""Errors for bad input: one line that names the file, the field and the fix."""

from __future__ import annotations

import os


class DataError(ValueError):
    """Invalid input data.

    The message is one line, ``<file>: <field>: <problem>; fix: <fix>``, so the CLI can print it as is
    and exit with status 2.
    """

    def __init__(self, path: str | os.PathLike, field: str, problem: str, fix: str):
        self.path = os.fspath(path)
        self.field = field
        self.problem = problem
        self.fix = fix
        super().__init__(f"{self.path}: {field}: {problem}; fix: {fix}")
