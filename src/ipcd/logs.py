"""Logging for the daemon and the worker: stderr (journald-aware) or a file.

* Under systemd, stderr goes to the journal; when ``$JOURNAL_STREAM`` names
  our stderr, every line carries a ``<N>`` syslog priority prefix and no
  timestamp (journald adds its own).  Checking that the variable merely
  exists is not enough (systemd.exec(5)): stderr may have been redirected.
* ``log_file`` uses a WatchedFileHandler, so logrotate's rename+create needs
  no signal, and SIGHUP/SIGUSR1 reopen it anyway.
* Everything hangs off the ``ipcd`` logger, whose handler ``ipcd worker
  --call`` wraps with multiprocessing-logging for its forked children
  (worker_pool.py explains how it avoids that package's hazards).
"""

from __future__ import annotations

import logging
import logging.handlers
import os
import sys

LOGGER = "ipcd"
_PRIORITY = {logging.CRITICAL: 2, logging.ERROR: 3, logging.WARNING: 4, logging.INFO: 6, logging.DEBUG: 7}


class JournalFormatter(logging.Formatter):
    """``<N>message`` on every line, tracebacks included."""

    def format(self, record):
        prio = _PRIORITY.get(record.levelno, 6)
        text = super().format(record)
        return "\n".join(f"<{prio}>{line}" for line in text.splitlines() or [""])


def stderr_is_journal(env=None) -> bool:
    env = os.environ if env is None else env
    value = env.get("JOURNAL_STREAM", "")
    try:
        dev, ino = (int(x) for x in value.split(":"))
        st = os.fstat(sys.stderr.fileno())
    except (ValueError, OSError, AttributeError):
        return False
    return (st.st_dev, st.st_ino) == (dev, ino)


def make_handler(log_file: str | None) -> logging.Handler:
    if log_file:
        handler = logging.handlers.WatchedFileHandler(log_file, encoding="utf-8")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s"))
    elif stderr_is_journal():
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(JournalFormatter("%(name)s: %(message)s"))
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    return handler


class LogSetup:
    """The ``ipcd`` logger's single handler, replaceable on reload/reopen."""

    def __init__(self, log_file: str | None, level: str):
        self.logger = logging.getLogger(LOGGER)
        self.logger.propagate = False
        self.log_file = log_file
        self.handler = None
        self.apply(log_file, level)

    def apply(self, log_file: str | None, level: str):
        if log_file:
            os.makedirs(os.path.dirname(os.path.abspath(log_file)), exist_ok=True)
        new = make_handler(log_file)
        old, self.handler, self.log_file = self.handler, new, log_file
        self.logger.addHandler(new)
        if old is not None:
            self.logger.removeHandler(old)
            old.close()
        self.logger.setLevel(level)

    def reopen(self):
        """Reopen the log file (after logrotate); stderr needs nothing."""
        if isinstance(self.handler, logging.handlers.WatchedFileHandler):
            self.handler.acquire()
            try:
                if self.handler.stream:
                    self.handler.stream.close()
                self.handler.stream = self.handler._open()
                self.handler._statstream()
            finally:
                self.handler.release()
