"""One exception hierarchy with stable error codes.

Every error the daemon raises on purpose is an :class:`EchodError`. Its
``code`` is stable (the control socket and scripts match on it), its message is
one line that names the problem and the fix, and ``exit_code`` is what the
command line exits with. ``fatal`` errors are configuration mistakes that
restarting cannot mend (systemd's unit does not restart on their exit code).
"""

from __future__ import annotations


class EchodError(Exception):
    """Base of all echod errors."""

    code = "internal"
    exit_code = 1
    fatal = False

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message

    def to_dict(self) -> dict[str, str]:
        return {"code": self.code, "message": self.message}


class ConfigError(EchodError):
    """The configuration (file, command line or run-time change) is invalid."""

    code = "config"
    exit_code = 78  # EX_CONFIG: RestartPreventExitStatus in the unit
    fatal = True


class SourceError(EchodError):
    """A frame source cannot be opened or read (missing, corrupt, disconnected)."""

    code = "source"
    exit_code = 66  # EX_NOINPUT


class ModelError(EchodError):
    """A model file or its card is missing, corrupt or does not fit the frames."""

    code = "model"
    exit_code = 65  # EX_DATAERR
    fatal = True


class EngineError(EchodError):
    """An inference engine is unavailable or failed."""

    code = "engine"
    exit_code = 69  # EX_UNAVAILABLE


class RingError(EchodError):
    """A shared-memory ring cannot be created, attached or used as asked."""

    code = "ring"
    exit_code = 71  # EX_OSERR


class AlreadyRunningError(EchodError):
    """Another echod holds this runtime directory (its sockets and rings)."""

    code = "already_running"
    exit_code = 75  # EX_TEMPFAIL: RestartPreventExitStatus in the unit
    fatal = True


class StageError(EchodError):
    """A pipeline stage failed to start or died."""

    code = "stage"
    exit_code = 70  # EX_SOFTWARE


ERRORS: dict[str, type[EchodError]] = {
    cls.code: cls
    for cls in (
        EchodError,
        ConfigError,
        SourceError,
        ModelError,
        EngineError,
        RingError,
        AlreadyRunningError,
        StageError,
    )
}


def from_dict(d: dict[str, str]) -> EchodError:
    """Rebuild an error sent across a process boundary (stage -> supervisor)."""
    return ERRORS.get(d.get("code", "internal"), EchodError)(d.get("message", "unknown error"))
