"""The errors that stop a command before it starts anything: a bad config or bad input (exit code 2).

Each is an `InputError`, raised where the problem is found; `ragft.exit_codes` maps every one to exit 2 and
prints its `message`, so it needs to know none of the packages that raise them.
"""

from __future__ import annotations


class InputError(Exception):
    """Bad config or bad input: the command refuses it and nothing was started (exit 2)."""

    exit_code = 2

    def message(self, command: str, hint: str = "") -> str:
        """What `ragft <command>` prints for it; `hint` is the command's advice on bad input files."""
        return f"ragft {command}: {self}"


class ConfigError(InputError, ValueError):
    """Every problem found in a config, reported together."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(f"  - {p}" for p in problems))

    def message(self, command: str, hint: str = "") -> str:
        return f"ragft {command}: the config has {len(self.problems)} problem(s); nothing was started:\n{self}"


class BadDataError(InputError, ValueError):
    """An input file the command cannot use (a bad row, a chat template); the command's hint says how to go on."""

    def message(self, command: str, hint: str = "") -> str:
        return f"ragft {command}: bad input, nothing was started:\n  {self}{hint}"


class MissingPackageError(InputError, FileNotFoundError):
    """A model file's PyPI package is not installed: a bad config, fixed by the command it names."""
