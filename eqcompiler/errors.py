"""Errors that end a command with one clear line and a documented exit code."""
from __future__ import annotations


class EqcError(Exception):
    """A user-facing failure: the CLI prints `error: <message>` and exits with `exit_code`.

    Exit codes (also in the README): 2 bad input or refused operation, 3 a numerical check failed
    (export parity, NaN/Inf in calibration), 4 an environment problem (missing tool or library).
    """

    exit_code = 2

    def __init__(self, message: str, exit_code: int | None = None) -> None:
        # One line: a multi-line message would read like a traceback.
        super().__init__(" ".join(str(message).split()))
        if exit_code is not None:
            self.exit_code = exit_code


class ParityError(EqcError):
    exit_code = 3


class NumericsError(EqcError):
    exit_code = 3


class EnvironmentProblem(EqcError):
    exit_code = 4


class InternalError(EqcError):
    """A bug, said in one line (e.g. an unexpected exception inside a compiler pass, named)."""

    exit_code = 1
