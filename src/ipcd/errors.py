"""Exit codes and the exception hierarchy: ipcd's shared vocabulary.

Leaf module: imports nothing from ipcd, so every other module (and the
client that must stay import-light) can depend on it.

Exit codes follow sysexits(3), as systemd and shell scripts expect:
``systemd-analyze exit-status DATAERR TEMPFAIL`` knows these names.
"""

from __future__ import annotations

import enum


class ExitCode(enum.IntEnum):
    OK = 0
    FAILURE = 1  # an unexpected internal error (a bug): the only code with a traceback
    USAGE = 2  # bad command-line arguments (click/typer's own convention)
    DATAERR = 65  # invalid JSON, message too large, bad queue name, unknown message id
    UNAVAILABLE = 69  # daemon not reachable / stopping / already running
    TEMPFAIL = 75  # timeout, queue full, disk full: retry later
    NOPERM = 77  # authkey rejected, permission denied
    CONFIG = 78  # invalid configuration


class IpcdError(Exception):
    """Base of every error ipcd reports to a user: one line, one exit code."""

    exit_code: ExitCode = ExitCode.FAILURE
    # Name used on the wire: the daemon sends ("err", kind, message) and the
    # client turns it back into the class with that kind (see from_wire()).
    kind: str = "internal"

    def __str__(self) -> str:  # never an empty message on stderr
        return super().__str__() or self.__class__.__name__


class UsageError(IpcdError):
    exit_code = ExitCode.USAGE
    kind = "usage"


class DataError(IpcdError):
    """The message or argument is invalid (bad JSON, too large, bad name)."""

    exit_code = ExitCode.DATAERR
    kind = "data"


class NotFound(DataError):
    """No such message / lease (e.g. an ack for a message not leased to you)."""

    kind = "notfound"


class LeaseExpired(DataError):
    """The lease was lost (expired and redelivered): the ack was refused."""

    kind = "lease"


class Unavailable(IpcdError):
    """The daemon is not running, not reachable, or is stopping."""

    exit_code = ExitCode.UNAVAILABLE
    kind = "unavailable"


class AlreadyRunning(Unavailable):
    kind = "running"


class TempFail(IpcdError):
    exit_code = ExitCode.TEMPFAIL
    kind = "tempfail"


class Timeout(TempFail):
    kind = "timeout"


class QueueFull(TempFail):
    kind = "full"


class StorageFull(TempFail):
    """The store could not write (disk full, store size limit reached)."""

    kind = "storagefull"


class PermissionDenied(IpcdError):
    exit_code = ExitCode.NOPERM
    kind = "noperm"


class AuthError(PermissionDenied):
    kind = "auth"


class ConfigError(IpcdError):
    exit_code = ExitCode.CONFIG
    kind = "config"


class StoreCorrupt(DataError):
    """The on-disk store failed its integrity check; the file was set aside."""

    kind = "corrupt"


_BY_KIND = {
    cls.kind: cls
    for cls in (
        IpcdError, UsageError, DataError, NotFound, LeaseExpired, Unavailable,
        AlreadyRunning, TempFail, Timeout, QueueFull, StorageFull, PermissionDenied,
        AuthError, ConfigError, StoreCorrupt,
    )
}


def from_wire(kind: str, message: str) -> IpcdError:
    """Rebuild the exception the daemon reported as ("err", kind, message)."""
    return _BY_KIND.get(kind, IpcdError)(message)
