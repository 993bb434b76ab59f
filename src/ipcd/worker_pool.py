"""The two runners of ``ipcd worker``: a command per message, or a fork pool.

A runner starts a job (``launch``), reports its end as a ``("runner", ...)``
event, turns that into ``(job, Outcome)`` pairs (``on_event``), kills on
request (``kill(job, hard)`` returns when to escalate, or None) and stops
(``close``).  The Worker (worker.py) calls them from its main thread only.

ExecRunner: ``ipcd worker QUEUE -- CMD [ARGS...]``
-------------------------------------------------
CMD gets the body (compact JSON and a newline) on stdin and IPCD_QUEUE,
IPCD_MESSAGE_ID, IPCD_ATTEMPT in its environment.  It runs in a process
group of its own (``process_group=0``), so a --timeout or a stop kills it and
everything it started (SIGTERM to the group, SIGKILL 2 s later; once a killed
command exits, a last SIGKILL sweeps its group), and a terminal's Ctrl-C reaches
only the worker.  Its stdout is the worker's; its stderr goes to a temp file
(no pipe for a grandchild to hold open), the last 500 characters go into a
failure reason, then all of it is copied to the worker's stderr.  A waiter
thread per command blocks in ``Popen.wait()``.

CallPool: ``ipcd worker QUEUE --call package.module:function``
-------------------------------------------------------------
The worker imports ``package.module`` once, before forking (a typo fails at
start with exit 78, and children share the imported code copy-on-write, like
gunicorn's ``--preload``: open connections lazily inside the function, not at
import).  It then forks ``--concurrency`` children with
``multiprocessing.get_context("fork")``.  A child owns nothing of the daemon:
it reads ``(id, attempt, json_text, queue)`` from its pipe, calls
``function(body)`` and writes back ``(status, id, seconds, reason,
traceback)``.  The parent (worker.py) acks/nacks and logs one line per
outcome, so outcomes never depend on a child's logging.  A child that dies
is reaped, its message failed ("handler process N died: killed by SIGKILL")
and its slot re-forked.

Logging: multiprocessing-logging 0.4.0 (shared/notes/basemanager.md §9)
------------------------------------------------------------------------
Whatever handler code logs (root logger, its own loggers, ``ipcd``) reaches
the worker's one stream through multiprocessing-logging.  Its
``install_mp_handler()`` gives all processes ONE ``multiprocessing.Queue``:
a child killed while its feeder thread holds that queue's write lock blocks
every later ``put`` in every process and the worker hangs at exit.  So each
child here gets its own ``MultiProcessingHandler`` (own queue, own lock, own
receiver thread in the parent), and a child killed mid-write can only wedge
a queue no other process writes to.  When a child is gone its handler is
retired: after a clean exit the receiver drains it; after a kill the
receiver may be stuck on a half-written record, so it is abandoned (a
daemon thread, never joined) and ``close()`` skips the library's 5 s join at
``logging.shutdown()``.  Receiver threads hand records to the real handler
through ``_Sink``, under that handler's lock (the library calls ``emit()``
without it), and the parent holds that lock while forking, so no child is
born holding a half-written line in its copy of the stream buffer.

The notes' other rules hold: children only via ``get_context("fork").Process``
(never ``os.fork``/``os._exit``, never ``terminate()``); a child is stopped by
a ``None`` on its pipe (it returns and multiprocessing flushes its log queue
on the way out); SIGKILL only after --grace or --timeout, which the
per-child queues make safe.

Each child also moves to its own process group (a terminal's Ctrl-C goes to
the worker, which decides), restores default SIGINT/SIGTERM, and puts
/dev/null over any inherited socket connected to the daemon: the Clients
stay in the parent, and an inherited copy would keep a dead connection open
in the daemon after the parent reconnects.
"""

from __future__ import annotations

import importlib
import json
import logging
import multiprocessing
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
import traceback

from multiprocessing_logging import MultiProcessingHandler

from . import errors
from .worker import Outcome, _current

log = logging.getLogger("ipcd.worker")

FORK = multiprocessing.get_context("fork")  # explicit: 3.14 makes forkserver the default
STOP_WAIT = 5.0  # seconds an idle child asked to exit gets before SIGKILL
LOG_DRAIN_WAIT = 1.0  # for a child that exited cleanly, its last records to arrive
KILLED_LOG_WAIT = 0.3  # for a killed child: longer means a half-written record, give up
REASON_MAX = 500  # characters of an exception or of stderr kept in a failure reason
KILL_WAIT = 2.0  # a command's group: SIGTERM, then SIGKILL this much later
SMALL_BODY = 4096  # PIPE_BUF: this much always fits an empty pipe, so writing it cannot block


class ExecRunner:
    """Exec mode: one command per message, each in its own process group."""

    def __init__(self, argv, concurrency: int, post):
        self.argv, self.concurrency, self.post = list(argv), concurrency, post
        self.env = dict(os.environ)
        self.procs: set = set()

    def start(self):
        pass

    def tick(self):
        pass

    def capacity(self, running: int) -> int:
        return self.concurrency - running

    def launch(self, job):
        m = job.msg
        env = {**self.env, "IPCD_QUEUE": m.queue, "IPCD_MESSAGE_ID": str(m.id), "IPCD_ATTEMPT": str(m.attempts)}
        stdin = _stdin_for((m.text + "\n").encode("utf-8"))
        try:
            err = tempfile.TemporaryFile(prefix="ipcd-worker-")
            try:
                proc = subprocess.Popen(self.argv, stdin=stdin, stderr=err, env=env, process_group=0)
            except BaseException:
                err.close()
                raise
        finally:
            if isinstance(stdin, int):
                os.close(stdin)
            else:
                stdin.close()
        job.handle = (proc, err)
        self.procs.add(proc)
        threading.Thread(target=self._wait, args=(job, proc), daemon=True).start()

    def _wait(self, job, proc):
        proc.wait()
        self.post(("runner", job))

    def on_event(self, job):
        proc, err = job.handle
        self.procs.discard(proc)
        if job.stop is not None:  # we killed it: sweep what it started, too
            _killpg(proc.pid, signal.SIGKILL)
        size = err.seek(0, os.SEEK_END)
        err.seek(max(0, size - 4 * REASON_MAX))
        tail = err.read()
        if size:  # pass it on, streamed: a chatty command must not cost us its size in memory
            err.seek(0)
            try:
                sys.stderr.flush()
                shutil.copyfileobj(err, sys.stderr.buffer)
                if not tail.endswith(b"\n"):
                    sys.stderr.buffer.write(b"\n")
                sys.stderr.flush()
            except OSError:
                pass  # our stderr is gone; the failure reason still carries the tail
        err.close()
        rc = proc.returncode
        if rc == 0:
            return [(job, Outcome(True))]
        if rc > 0:
            what = f"exit status {rc}"
        else:
            try:
                what = f"killed by {signal.Signals(-rc).name}"
            except ValueError:
                what = f"killed by signal {-rc}"
        text = tail.decode("utf-8", "replace").strip()[-REASON_MAX:]
        return [(job, Outcome(False, f"{what}: {text}" if text else what))]

    def kill(self, job, hard: bool = True):
        proc = job.handle[0]
        if proc.returncode is None:  # not reaped: the group id is still this command's
            _killpg(proc.pid, signal.SIGKILL if hard else signal.SIGTERM)
        return None if hard else time.monotonic() + KILL_WAIT

    def close(self, wait: float = 5.0):
        for proc in list(self.procs):
            try:
                proc.wait(wait)
            except subprocess.TimeoutExpired:
                pass


def _killpg(pgid: int, sig):
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _stdin_for(data: bytes):
    """A pipe for small bodies; a temp file for big ones (a pipe could fill and block us)."""
    if len(data) <= SMALL_BODY:
        r, w = os.pipe()
        try:
            os.write(w, data)
        finally:
            os.close(w)
        return r
    f = tempfile.TemporaryFile(prefix="ipcd-worker-")
    f.write(data)
    f.seek(0)
    return f


def resolve_command(argv) -> list:
    exe = argv[0]
    if shutil.which(exe) is None:
        where = "is not an executable file" if "/" in exe else "was not found on PATH or is not executable"
        raise errors.ConfigError(f"command {exe!r} {where}")
    return list(argv)


def describe(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    text = " ".join(text.split())  # one line
    return text if len(text) <= REASON_MAX else text[:REASON_MAX - 3] + "..."


def load_target(spec: str):
    """Resolve ``package.module:function`` (UsageError if malformed, ConfigError if unusable)."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise errors.UsageError(f"--call expects package.module:function, got {spec!r}")
    # As with `python -m` (and gunicorn): the working directory is importable,
    # which the `ipcd` console script would not give on its own.
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except (Exception, SystemExit) as e:  # import-time code may raise anything
        raise errors.ConfigError(f"--call {spec}: cannot import {module_name}: {describe(e)}") from None
    target = module
    for part in attr.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise errors.ConfigError(f"--call {spec}: module {module_name} has no attribute {attr!r}") from None
    if not callable(target):
        raise errors.ConfigError(f"--call {spec}: {attr} is a {type(target).__name__}, not a function")
    return target


class ChildLogQueue(MultiProcessingHandler):
    """One child's multiprocessing-logging queue (see the module docstring).

    Uses 0.4.0 internals (``_is_closed``, ``_receive_thread``): the version
    is pinned in pyproject.toml.
    """

    def retire(self):
        self._is_closed = True  # the receiver stops once the queue reads empty

    def join(self, timeout: float) -> bool:
        self._receive_thread.join(timeout)
        return not self._receive_thread.is_alive()

    def close(self):
        # logging.shutdown() calls this at exit.  Never wait here: the library's
        # close() joins for 5 s, forever stuck behind a killed child's half-written
        # record.  The real handler is closed by logging.shutdown() itself.
        self._is_closed = True
        logging.Handler.close(self)


class _Sink(logging.Handler):
    """Receiver threads -> the real handler, under that handler's lock."""

    def __init__(self, target: logging.Handler):
        super().__init__()
        self.target = target

    def emit(self, record):
        self.target.handle(record)


class Child:
    __slots__ = ("index", "proc", "conn", "logq", "job", "reader")

    def __init__(self, index, proc, conn, logq):
        self.index, self.proc, self.conn, self.logq = index, proc, conn, logq
        self.job = None
        self.reader = None


class CallPool:
    """The runner for --call mode; the Worker calls it from its main thread only."""

    def __init__(self, fn, size: int, post, output: logging.Handler, level: str, daemon_address):
        self.fn, self.size, self.post = fn, size, post
        self.output, self.sink = output, _Sink(output)
        self.level, self.daemon_address = level, daemon_address
        self.children: dict[int, Child] = {}
        self.idle: list[Child] = []
        self.missing: set[int] = set()  # slots whose re-fork failed; retried by tick()
        self.closing = False

    def start(self):
        for i in range(self.size):
            self._spawn(i)

    def capacity(self, running: int) -> int:
        return len(self.idle)

    def tick(self):
        for index in sorted(self.missing):
            self._respawn(index)

    def _spawn(self, index: int):
        logq = ChildLogQueue(f"ipcd-worker-log-{index}", sub_handler=self.sink)
        parent_end, child_end = FORK.Pipe(duplex=True)
        others = [c.conn for c in self.children.values()]
        proc = FORK.Process(target=_child_main, name=f"ipcd-worker-{index}",
                            args=(child_end, parent_end, others, self.fn, logq, self.level, self.daemon_address))
        self.output.acquire()  # no receiver mid-write to the stream the child inherits
        try:
            proc.start()
        except BaseException:
            logq.retire()
            parent_end.close()
            raise
        finally:
            self.output.release()
            child_end.close()  # the child's end lives in the child only: its death is our EOF
        child = Child(index, proc, parent_end, logq)
        child.reader = threading.Thread(target=self._read, args=(child,), daemon=True,
                                        name=f"ipcd-worker-read-{index}")
        child.reader.start()
        self.children[index] = child
        self.idle.append(child)

    def _respawn(self, index: int):
        try:
            self._spawn(index)
            self.missing.discard(index)
        except OSError as e:
            if index not in self.missing:
                log.error("cannot fork handler process %d (will retry): %s", index, e)
            self.missing.add(index)

    def _read(self, child: Child):
        """Reader thread: every outcome, then None once the child is gone."""
        try:
            while True:
                self.post(("runner", (child, child.conn.recv())))
        except Exception:  # EOF (the child exited or was killed), or our close()
            self.post(("runner", (child, None)))

    def launch(self, job):
        child = self.idle.pop()
        child.job, job.handle = job, child
        m = job.msg
        try:
            child.conn.send((m.id, m.attempts, m.text, m.queue))
        except OSError:
            pass  # it just died: its reader reports EOF and the job fails as "died"

    def kill(self, job, hard: bool = True):
        """SIGKILL the job's child: safe because its log queue is its own."""
        child = job.handle
        if child is not None and child.proc.exitcode is None:  # not reaped yet: the pid is still ours
            try:
                os.kill(child.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return None

    def on_event(self, payload):
        """An outcome or a death from a reader thread -> [(job, Outcome)]."""
        child, data = payload
        if data is not None:
            status, mid, seconds, reason, tb = data
            job, child.job = child.job, None
            if self.children.get(child.index) is child:
                self.idle.append(child)
            if job is None or job.msg.id != mid:
                return []
            return [(job, Outcome(status == "ok", reason, tb, seconds))]
        if self.children.get(child.index) is not child:
            return []  # already reaped by close()
        del self.children[child.index]
        if child in self.idle:
            self.idle.remove(child)
        how = self._reap(child, 1.0)
        out = []
        if child.job is not None:
            out.append((child.job, Outcome(False, f"handler process {child.proc.pid} died: {how}")))
            child.job = None
        if not self.closing:
            self._respawn(child.index)
        return out

    def _reap(self, child: Child, wait: float) -> str:
        child.proc.join(wait)
        if child.proc.exitcode is None:
            os.kill(child.proc.pid, signal.SIGKILL)
            child.proc.join(5)
        code = child.proc.exitcode
        child.conn.close()
        child.logq.retire()
        if not child.logq.join(LOG_DRAIN_WAIT if code == 0 else KILLED_LOG_WAIT):
            log.warning("log queue of handler process %d abandoned: it was killed mid-write, "
                        "its last log records are lost (other processes are unaffected)", child.proc.pid)
        return _exit_text(code)

    def close(self, wait: float = STOP_WAIT):
        """Ask idle children to exit, SIGKILL whatever remains after *wait*, reap all."""
        self.closing = True
        children = list(self.children.values())
        for child in children:
            try:
                child.conn.send(None)
            except OSError:
                pass
        deadline = time.monotonic() + wait
        for child in children:
            child.proc.join(max(0.0, deadline - time.monotonic()))
        for child in children:
            if child.proc.exitcode is None:
                os.kill(child.proc.pid, signal.SIGKILL)
        for child in children:  # retire all first: the receivers then drain in parallel
            child.proc.join(5)
            child.conn.close()
            child.logq.retire()
        deadline = time.monotonic() + LOG_DRAIN_WAIT
        for child in children:
            child.logq.join(max(0.0, deadline - time.monotonic()))
        self.children.clear()
        self.idle.clear()


def _exit_text(code) -> str:
    if code is None:
        return "still running"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with status {code}"


# -- in the child ----------------------------------------------------------------


def _child_main(conn, parent_end, others, fn, logq, level, daemon_address):
    os.setpgid(0, 0)
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    # A no-op handler rather than SIG_IGN: ignored dispositions survive exec
    # into any command the handler runs.
    signal.signal(signal.SIGHUP, _ignore)
    parent_end.close()
    for c in others:
        c.close()
    _drop_daemon_sockets(daemon_address)
    for name in ("", "ipcd"):
        logger = logging.getLogger(name)
        for h in list(logger.handlers):
            logger.removeHandler(h)
        logger.addHandler(logq)
    logging.getLogger().setLevel(level)
    while True:
        try:
            task = conn.recv()
        except (EOFError, OSError):
            return  # the worker is gone
        if task is None:
            return
        mid, attempt, text, queue = task
        _current.update(id=mid, queue=queue, attempt=attempt)
        t0 = time.perf_counter()
        try:
            fn(json.loads(text))
        except BaseException as e:  # even SystemExit: one bad message must not end the child
            out = ("error", mid, time.perf_counter() - t0, describe(e), traceback.format_exc()[-4000:])
        else:
            out = ("ok", mid, time.perf_counter() - t0, None, None)
        _current.clear()
        try:
            conn.send(out)
        except OSError:
            return


def _ignore(signum, frame):
    pass


def _drop_daemon_sockets(address):
    """Put /dev/null over inherited sockets connected to the daemon (by peer name)."""
    try:
        fds = [int(x) for x in os.listdir("/proc/self/fd")]
    except OSError:
        return
    devnull = None
    for fd in fds:
        try:
            if not stat.S_ISSOCK(os.fstat(fd).st_mode):
                continue
            s = socket.socket(fileno=os.dup(fd))
            try:
                peer = s.getpeername()
            finally:
                s.close()
        except OSError:
            continue
        same = peer == address if isinstance(address, str) else (
            isinstance(peer, tuple) and len(peer) >= 2 and peer[1] == address[1])
        if same and peer:
            if devnull is None:
                devnull = os.open(os.devnull, os.O_RDWR)
            os.dup2(devnull, fd)
    if devnull is not None:
        os.close(devnull)
