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


class NativeCrash(RuntimeFailure):
    """A native runtime (llama.cpp, onnxruntime, a model builder) took its process down.

    Built from the child's return code, so the user reads which runtime died of which
    signal while doing what, and what to try, instead of a bare `Segmentation fault`.
    """

    def __init__(
        self, runtime: str, subject: str, returncode: int, last_words: str = "", local: bool = True
    ) -> None:
        from cllm.standalone.guard import ENV, decide, signal_text

        self.runtime = runtime
        self.returncode = returncode
        if returncode < 0:
            how = f"crashed ({signal_text(returncode)})"
        else:
            how = f"stopped unexpectedly (exit code {returncode})"
        said = f" after printing: {last_words[:200]}" if last_words else ""
        hint = f"Re-run with --debug to see {runtime}'s own output"
        if runtime == "llama.cpp" and local:
            d = decide()
            if d["amx_listed"] and d["extra_bufts"]:
                hint = (
                    f"This CPU lists AMX: try {ENV}=off (see Troubleshooting in the README). {hint}"
                )
        super().__init__(f"{runtime} {how} while {subject}{said}", hint)
