"""The package's own errors and the process exit codes: one place for both.

Every message is meant for a person: it names the constraint, the value received and the fix.
`gr.Error` appears only at the web edge (zimage/web), never here.
"""

from __future__ import annotations

from typing import Any

# exit codes of `python -m zimage ...` and app.py
EXIT_OK = 0
EXIT_FAILED = 1  # the work itself failed (or the port could not be bound)
EXIT_BAD_INPUT = 2  # a setting or argument that cannot work: one line says which
EXIT_NO_MODEL = 3  # the model could not be found
EXIT_WATCHDOG = 75  # the memory watchdog asks Supervisor for a fresh process


class ZImageError(Exception):
    """Base of the package's own errors; messages are meant for the user."""


class SettingsError(ZImageError, ValueError):
    """A setting has a value that cannot work; the message names it and what is allowed."""


class InvalidRequest(ZImageError):
    """A request field is out of range: names the field, the value received and what is allowed."""

    def __init__(self, field_name: str, value: Any, allowed: str, hint: str = ""):
        self.field = field_name
        self.value = value
        self.allowed = allowed
        shown = repr(value) if isinstance(value, str) and len(value) <= 40 else _short(value)
        message = f"{field_name.capitalize()} must be {allowed} (got {shown})."
        if hint:
            message += f" {hint}"
        super().__init__(message)


class BadLora(InvalidRequest):
    """A LoRA that cannot be used: the message names the file and why (nothing was changed)."""

    def __init__(self, name: str, why: str | None = None):
        # one argument: the whole message (how a replica's error is rebuilt in the parent process)
        message = name if why is None else f"LoRA {name!r} cannot be used: {why}"
        ZImageError.__init__(self, message)
        self.field, self.value, self.allowed = "loras", name, why or message

    def __reduce__(self):
        return (BadLora, (str(self),))


class Cancelled(ZImageError):
    """The job was cancelled by its owner."""


class NotReady(ZImageError):
    """The model is not loaded (yet, or loading failed)."""


class ShuttingDown(ZImageError):
    """The process is stopping and takes no new jobs."""


class NoSpace(ZImageError):
    """The outputs folder's disk is below the free space zimage keeps (min_free_mib): no new jobs."""


class OutOfMemory(ZImageError):
    """The GPU ran out of memory and the fallback did not help either."""


class GenerationFailed(ZImageError):
    """An unexpected error inside the pipeline; the message is safe to show."""


class ReplicaFailed(GenerationFailed):
    """The replica (GPU worker) running the job died or hit an unrecoverable error; it restarts alone."""


class ModelNotFound(ZImageError):
    """The model could not be found or downloaded; the message says where we looked and what to do."""


class UnreadableImage(ZImageError):
    """An image file that cannot be read (not a PNG, damaged, too large): the message says which."""


def _short(value: Any) -> str:
    if isinstance(value, str):
        return f"a text of {len(value)} characters"
    return repr(value)
