"""selftune's exceptions: one base class, one line of text each.

Every error a user can cause or meet (bad config, bad data, bad store, a lease held by another
process, an occupied output folder, a signal) is a :class:`SelftuneError`. Its ``str`` is one line
that says what happened and what to do, and its ``exit_code`` is what the command line exits with:
2 for anything refused before a run starts, 1 for a run that failed after starting, 128+N for a
run stopped by signal N. ``selftune.cli.main`` is the one place that turns them into messages, so
no traceback reaches a command-line user. This module imports nothing, so every layer (core
included) can raise these.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pydantic import ValidationError

__all__ = ["ConfigError", "ConfigTypeError", "DataError", "DivergenceError", "Interrupted", "LeaseError", "OutputError",
           "ResumeError", "SelftuneError", "SelftuneWarning", "StoreError"]


class SelftuneError(Exception):
    """Base of every selftune error: ``str(err)`` is one line; ``exit_code`` is the CLI's exit status."""

    exit_code: int = 2


class ConfigError(SelftuneError, ValueError):
    """A bad config or argument: ``str(err)`` names the field and what to do."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}" if field else message)
        self.field, self.message = field, message

    def __reduce__(self) -> tuple:
        # copy and pickle rebuild an exception from its constructor's arguments (Ray copies the errors
        # a worker raised, their causes included)
        return type(self), (self.field, self.message)


class ConfigTypeError(ConfigError, TypeError):
    """An argument of the wrong kind (a loss that is not callable, a summed loss): a :class:`ConfigError`,
    and a ``TypeError`` as Python's own checks of a wrong type are."""


class DataError(SelftuneError, ValueError):
    """Training, validation or test data that cannot be trained on (found before training starts)."""


class StoreError(SelftuneError, RuntimeError):
    """The store cannot be opened or used; the message is one line and never shows a password."""


class LeaseError(StoreError):
    """Another process drives the run (or took it over): only one process may drive a run at a time."""


class ResumeError(SelftuneError):
    """A run cannot be resumed (finished, no intact checkpoint of its own, ...)."""


class OutputError(SelftuneError):
    """An output folder holds files selftune did not write for this run."""


class DivergenceError(SelftuneError, RuntimeError):
    """The run diverged more often than ``max_divergences`` allows (a run that failed after starting)."""

    exit_code = 1


class Interrupted(SelftuneError):  # noqa: N818 - a state, not a fault
    """A run stopped before its end after writing a checkpoint (SIGINT/SIGTERM, or a callback's
    ``request_stop``); ``exit_code`` is 128 + the signal, 1 without one."""

    def __init__(self, message: str, signum: int | None = None) -> None:
        super().__init__(message)
        self.signum = signum
        self.exit_code = 128 + signum if signum else 1

    def __reduce__(self) -> tuple:
        return type(self), (str(self), self.signum)


class SelftuneWarning(UserWarning):
    """Something the user should know that does not stop the run (an init pulled off its bound, a
    hyperparameter that drives nothing); the CLI prints each as one ``selftune: warning:`` line."""


def from_validation(err: ValidationError, prefix: str = "") -> ConfigError:
    """pydantic's first complaint as a one-line :class:`ConfigError` naming the field (``prefix``: where the
    validated model sits in a config, e.g. ``"tuner"`` for a :class:`~selftune.TunerSettings` built in Python)."""
    first = err.errors()[0]
    raised = first.get("ctx", {}).get("error")
    if isinstance(raised, ConfigError):  # a validator that already names its field
        return raised
    loc = [str(p) for p in first["loc"] if not str(p).startswith(("function-", "tagged-union", "constrained-"))]
    # Drop the union-member names pydantic inserts (e.g. 'cutout', 'str', 'float').
    cleaned: list[str] = []
    for part in loc:
        if cleaned[:1] == ["augment"] and len(cleaned) == 2 and part in {"cutout", "noise", "shift", "flip"}:
            continue
        if part in {"str", "float", "int", "bool"}:
            continue
        cleaned.append(part)
    field = prefix
    for part in cleaned:
        field += f"[{part}]" if part.isdigit() else (f".{part}" if field else part)
    message = first["msg"].removeprefix("Value error, ")
    if first["type"] == "missing":
        message = "is required"
    elif first["type"] == "extra_forbidden":
        message = "is not a known setting; remove it or check its spelling (see docs/config.md)"
    elif first["type"] == "union_tag_invalid":
        message = "op must be one of 'cutout', 'noise', 'shift', 'flip'"
    elif first["type"] == "union_tag_not_found":
        message = "needs an op ('cutout', 'noise', 'shift' or 'flip')"
    elif cleaned:  # a field's value; a whole model's validator would echo every field given
        got = " ".join(repr(first.get("input")).split())  # one line: an object's repr may span many
        message = f"{message} (got {got if len(got) <= 80 else got[:77] + '...'})"
    return ConfigError(field or "config", message)
