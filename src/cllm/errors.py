"""Typed errors shared by every layer.

`core/` and `formats/` raise these; only `cli/` turns them into one line on
stderr and an exit code, so the Python API and the CLI report the same thing.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_RUNTIME = 1
EXIT_USAGE = 2
EXIT_CHECK = 3
EXIT_INTERRUPTED = 130


class CllmError(Exception):
    """Base error: a message (what went wrong) and a hint (what to do)."""

    exit_code = EXIT_RUNTIME

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.message = message.rstrip(".")
        self.hint = hint

    def one_line(self) -> str:
        text = self.message + "."
        if self.hint:
            text += " " + self.hint.rstrip(".") + "."
        return " ".join(text.split())


class UsageError(CllmError):
    """Bad flag, bad value, or an input that cannot be read as what it claims."""

    exit_code = EXIT_USAGE


class InputError(UsageError):
    """A checkpoint, text or calibration file that is missing or malformed."""


class CheckFailed(CllmError):
    """A quality gate (--fail-under, --max-kld) was not met."""

    exit_code = EXIT_CHECK


class RuntimeFailure(CllmError):
    """Valid input, but the work itself failed (a backend error, a full disk)."""

    exit_code = EXIT_RUNTIME
