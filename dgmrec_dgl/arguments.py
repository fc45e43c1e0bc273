"""Command-line pieces shared by the subcommands: a parser whose errors are one line, and argument types
that parse and range-check numbers and output folders.

A bad argument ends like bad data: exit status 2 and one line on stderr,
``error: <command line>: <flag>: <problem>; fix: <fix>`` (argparse would print a usage block and a second
line). A type below raises ``argparse.ArgumentTypeError("<problem>; fix: <fix>")``; argparse adds the flag.
"""

from __future__ import annotations

import argparse
import os
import re
import sys

from .config import SEED_MAX

#: argparse's error messages → (the flag(s) they name, the problem): ``argument --epochs: <problem>``,
#: ``the following arguments are required: --config``, ``unrecognized arguments: --bogus``
_ARGPARSE_ERRORS = (
    (re.compile(r"argument (\S+): (.*)", re.DOTALL), None),
    (re.compile(r"the following arguments are required: (.*)", re.DOTALL), "is required"),
    (re.compile(r"unrecognized arguments: (.*)", re.DOTALL), "is not an option of this command"),
)


def _flag_and_problem(message: str) -> tuple[str, str]:
    for pattern, problem in _ARGPARSE_ERRORS:
        found = pattern.match(message)
        if found:
            return found.group(1), problem or found.group(2)
    return "arguments", message


class OneLineParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` (and, through ``add_subparsers``, its sub-parsers) that reports errors in one line."""

    def error(self, message: str):
        flag, problem = _flag_and_problem(" ".join(message.split()))
        problem, _, fix = problem.partition("; fix: ")
        print(f"error: <command line>: {flag}: {problem}; fix: {fix or f'see {self.prog} --help'}",
              file=sys.stderr)
        sys.exit(2)


def integer(low: int, high: int | None = None):
    """An argparse type: an integer in ``[low, high]`` (no upper bound when ``high`` is None)."""
    want = f"an integer >= {low}" if high is None else f"an integer in [{low}, {high}]"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"{text!r} is not {want}; fix: give {want}")
        return value

    return parse


def integer_list(low: int, high: int | None = None):
    """An argparse type: a comma-separated, non-empty list of integers in ``[low, high]``."""
    one = integer(low, high)

    def parse(text: str) -> list[int]:
        values = [one(part.strip()) for part in text.split(",") if part.strip()]
        if not values:
            raise argparse.ArgumentTypeError(f"{text!r} holds no integer; fix: give e.g. 999,42,2023")
        return values

    return parse


#: counts that must be at least one: epochs, processes, users, items
count = integer(1)
#: seeds: numpy's and torch's generators take 0 .. 2**32 - 1 (the config's rule, :data:`dgmrec_dgl.config.SEED`)
seed = integer(0, SEED_MAX)
seeds = integer_list(0, SEED_MAX)
#: thread counts: 0 means the library's default
threads = integer(0)


def folder(text: str) -> str:
    """An argparse type: an output folder, new or existing, but not an existing file."""
    if os.path.exists(text) and not os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text!r} is an existing file, not a folder; "
                                         "fix: name a new folder or an existing one")
    return text
