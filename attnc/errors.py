"""One error hierarchy for every stage; the CLI maps each to a one-line message and an exit code."""

from __future__ import annotations


class AttncError(Exception):
    """Root of attnc's errors. `message` is one line; `hint` says what to do about it."""

    exit_code = 1

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def one_line(self) -> str:
        text = " ".join(str(self.message).split())
        if self.hint:
            text += f" (hint: {' '.join(self.hint.split())})"
        return text


class UsageError(AttncError):
    """Bad input from the user: files, recipes, flags, calibration data."""

    exit_code = 2


class LoadError(UsageError):
    """The model file could not be loaded."""


class RecipeError(UsageError):
    """The recipe is malformed or names something unknown."""


class CalibrationError(UsageError):
    """The calibration data is missing, empty or malformed."""


class CaptureError(AttncError):
    """torch.export failed, or the model has no attention to work on."""

    exit_code = 2


class PassError(AttncError):
    """A pass failed while planning or applying."""

    exit_code = 1


class KernelError(AttncError):
    """A kernel cannot run on the given inputs."""

    exit_code = 1


class ExportError(AttncError):
    """ONNX or .pt2 export failed."""

    exit_code = 1


class VerificationError(AttncError):
    """The optimized model missed the recipe's fidelity bound."""

    exit_code = 3


class WriteError(AttncError):
    """An artifact could not be written (full disk, file too large, read-only folder)."""

    exit_code = 1


class Interrupted(BaseException):  # noqa: N818 - a signal, like KeyboardInterrupt, not an error
    """SIGINT or SIGTERM arrived; raised by the CLI's signal handler so that every
    `except BaseException` cleanup (the build's staging folder) runs. Exit code 128 + signal."""

    def __init__(self, signum: int):
        import signal

        try:
            name = signal.Signals(signum).name
        except ValueError:
            name = f"signal {signum}"
        super().__init__(f"interrupted by {name}")
        self.signum = signum
        self.exit_code = 128 + signum
