"""Logging for the daemon and the worker: stderr (journald-aware) or a file.

* Under systemd, stderr goes to the journal; when ``$JOURNAL_STREAM`` names
  our stderr, every line carries a ``<N>`` syslog priority prefix and no
  timestamp (journald adds its own).  Checking that the variable merely
  exists is not enough (systemd.exec(5)): stderr may have been redirected.
* ``log_file`` uses a WatchedFileHandler, so logrotate's rename+create needs
  no signal, and SIGHUP/SIGUSR1 reopen it anyway.
* Everything hangs off the ``ipcd`` logger, so install_mp_logging() can
  route forked worker children's records through the parent's one handler.
"""

from __future__ import annotations

import json
import logging
import logging.handlers
import multiprocessing
import os
import selectors
import struct
import sys
import threading

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


# -- forked children ---------------------------------------------------------------------

_FRAME = struct.Struct(">I")
_RECORD_FIELDS = ("name", "msg", "levelno", "levelname", "pathname", "filename", "module", "lineno",
                  "funcName", "created", "msecs", "relativeCreated", "thread", "threadName",
                  "processName", "process", "exc_text", "stack_info")
_mp = None  # the one ForkLogging: at-fork hooks cannot be unregistered


def install_mp_logging(logger_setup: LogSetup, loggers=(LOGGER, "")) -> "ForkLogging":
    """Make forked children log through the parent's handler; return the ForkLogging.

    For the worker (the daemon forks nothing and must not call this).  Call it
    once in the parent after LogSetup and before the first fork, then create
    children with the returned object's fork context, explicitly::

        setup = LogSetup(cfg.log_file, cfg.log_level)
        mp = install_mp_logging(setup)
        child = mp.context.Process(target=run_job, args=(...,))  # get_context("fork")
        child.start(); ...; child.join()
        mp.stop()  # at exit, after joining the children: drains what they wrote

    How: ``os.register_at_fork`` hooks give every forked child a pipe of its
    own, made just before the fork.  In the child, the handlers of *loggers*
    (``ipcd`` and the root logger, so handler code's own loggers are routed
    too) are replaced by one handler that formats the message, encodes
    the record as JSON and writes it as one length-prefixed frame with
    ``os.write``; a thread in the parent decodes it and hands it to
    ``logger_setup.handler`` (whatever handler is current, so reload and
    SIGUSR1 reopen keep working): one writer, one format (journald prefixes
    included), no interleaved lines.

    Why not ``multiprocessing_logging.install_mp_handler`` (shared/notes/
    basemanager.md section 9): its one shared ``multiprocessing.Queue`` is written by a
    feeder thread under a cross-process lock, so a child killed mid-send
    (timeout kill, ``terminate()``) silently stops all later logging and
    hangs exit, and a child ending in ``os._exit()`` loses its buffered
    lines.  Here writes are synchronous (nothing buffered at ``os._exit``),
    a child only ever holds its own pipe, and a killed child at worst cuts
    its own last record, which the parent drops.

    Rules: children must be forked (``mp.context`` or ``os.fork``; spawn and
    forkserver children, and ``subprocess``, get no hook and log on their
    own); a child's own children share its pipe (records up to 4 KiB stay
    atomic); if the parent is gone, a child falls back to its stderr.
    Python >= 3.12 warns about forking a threaded process: the reader thread
    is one; fork from the main thread and before starting others.
    """
    global _mp
    if _mp is None:
        _mp = ForkLogging(logger_setup, loggers)
        os.register_at_fork(before=_mp._before_fork, after_in_parent=_mp._after_in_parent,
                            after_in_child=_mp._after_in_child)
    else:
        _mp.setup = logger_setup
        _mp.start()
    return _mp


class ForkLogging:
    """Parent side: one pipe per forked child, one reader thread (see install_mp_logging)."""

    def __init__(self, logger_setup: LogSetup, loggers=(LOGGER, "")):
        self.setup = logger_setup
        self.loggers = tuple(loggers)
        self.context = multiprocessing.get_context("fork")
        self.owner = os.getpid()
        self._forking: dict[int, tuple[int, int]] = {}  # forking thread -> (read fd, write fd)
        self._new: list[int] = []
        self._lock = threading.Lock()
        self._thread = None
        self._stopping = False
        self._wake_r = self._wake_w = -1
        self.start()

    def start(self):
        if self._thread is not None and self._thread.is_alive():
            return
        self._stopping = False
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._thread = threading.Thread(target=self._read_loop, name="ipcd-child-logs", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0):
        """Write out what children have sent, then stop reading (children later fall back to stderr)."""
        self._stopping = True
        self._poke()
        if self._thread is not None:
            self._thread.join(timeout)

    # -- at-fork hooks (run in the forking thread) ------------------------------------------

    def _active(self) -> bool:
        return os.getpid() == self.owner and self._thread is not None and not self._stopping

    def _before_fork(self):
        if self._active():
            self._forking[threading.get_ident()] = os.pipe2(os.O_CLOEXEC)

    def _after_in_parent(self):
        pair = self._forking.pop(threading.get_ident(), None)
        if pair is not None:
            os.close(pair[1])
            with self._lock:
                self._new.append(pair[0])
            self._poke()

    def _after_in_child(self):
        pair = self._forking.pop(threading.get_ident(), None)
        if pair is None:
            return  # not ours to route (a grandchild keeps its parent's pipe handler)
        for r, w in self._forking.values():  # pipes of siblings being forked by other threads
            os.close(r)
            os.close(w)
        self._forking.clear()
        os.close(pair[0])
        for fd in (self._wake_r, self._wake_w):
            os.close(fd)
        self._thread = None
        self.owner = -1  # in a child, every hook is a no-op from now on
        fallback = self.setup.handler.formatter if self.setup.handler else None
        pipe = _PipeHandler(pair[1], fallback)
        for name in self.loggers:
            logger = logging.getLogger(name or None)
            for h in list(logger.handlers):
                logger.removeHandler(h)  # not closed: the fds belong to the parent too
            logger.addHandler(pipe)

    # -- parent: the reader --------------------------------------------------------------------

    def _poke(self):
        try:
            os.write(self._wake_w, b"x")
        except OSError:
            pass

    def _read_loop(self):
        sel = selectors.DefaultSelector()
        sel.register(self._wake_r, selectors.EVENT_READ)
        buffers: dict[int, bytearray] = {}
        try:
            while True:
                with self._lock:
                    new, self._new = self._new, []
                for fd in new:
                    buffers[fd] = bytearray()
                    sel.register(fd, selectors.EVENT_READ)
                events = sel.select(0.0 if self._stopping else 1.0)
                for key, _ in events:
                    fd = key.fd
                    if fd == self._wake_r:
                        try:
                            os.read(fd, 4096)
                        except BlockingIOError:
                            pass
                        continue
                    data = os.read(fd, 1 << 16)
                    if data:
                        buffers[fd] += data
                        self._emit_frames(buffers[fd])
                    else:  # the child exited (or exec'd): a cut last frame is dropped
                        sel.unregister(fd)
                        os.close(fd)
                        del buffers[fd]
                if self._stopping and not [k for k, _ in events if k.fd != self._wake_r]:
                    return
        finally:
            for fd in list(buffers):
                os.close(fd)
            sel.close()
            for fd in (self._wake_r, self._wake_w):
                os.close(fd)

    def _emit_frames(self, buf: bytearray):
        while len(buf) >= _FRAME.size:
            (size,) = _FRAME.unpack_from(buf)
            if len(buf) < _FRAME.size + size:
                return
            raw = bytes(buf[_FRAME.size:_FRAME.size + size])
            del buf[:_FRAME.size + size]
            try:
                record = logging.makeLogRecord(json.loads(raw))
            except ValueError:
                continue
            handler = self.setup.handler
            if handler is not None and record.levelno >= handler.level:
                handler.handle(record)


class _PipeHandler(logging.Handler):
    """Child side: each record as one JSON frame on the child's own pipe."""

    def __init__(self, fd: int, fallback_formatter):
        super().__init__()
        self.fd = fd
        self.fallback = None
        self.fallback_formatter = fallback_formatter

    def emit(self, record):
        if self.fallback is not None:
            self.fallback.handle(record)
            return
        try:
            fields = {k: getattr(record, k, None) for k in _RECORD_FIELDS}
            fields["msg"], fields["args"] = record.getMessage(), None
            if record.exc_info and not record.exc_text:
                fields["exc_text"] = logging.Formatter().formatException(record.exc_info)
            data = json.dumps(fields, default=str).encode("utf-8")
            view = memoryview(_FRAME.pack(len(data)) + data)
            self.acquire()
            try:
                while view:
                    view = view[os.write(self.fd, view):]
            finally:
                self.release()
        except OSError:  # the parent is gone: say it ourselves
            self.fallback = logging.StreamHandler(sys.stderr)
            if self.fallback_formatter is not None:
                self.fallback.setFormatter(self.fallback_formatter)
            self.fallback.handle(record)
        except Exception:
            self.handleError(record)
