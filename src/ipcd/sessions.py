"""ipcd sessions, served by one event-loop thread.

Why one thread: serving each connection from its own thread (as
``multiprocessing.managers.Server`` does) spent most of the daemon's CPU on
waking threads and handing the GIL over — ~170 us per message with the store
out of the picture, against ~35 us for a single-threaded relay (bench/RESULTS.md).
Here one thread reads every session's requests, runs them, commits the store
once per round and writes the replies: no hand-offs, and the writes read in
one round share one transaction (group commit without waiting for it).

Handshakes stay in short-lived threads (server.py: once per connection, with a
deadline of their own), and so does the stdlib-manager path (typeid ``queue``).

Rules for code in the loop thread: never wait.
* Store writes a reply depends on (sends; acks of "fsync" queues) are submitted
  with a ``done`` callback and committed by ``flush()`` at the end of the round.
* An empty queue (recv) or a full one (send with overflow = "block") parks the
  session with its deadline; ``Hub.changed`` (any thread) wakes the loop, which
  retries the sessions parked on that queue.
* Short synchronous store reads (refilling a queue's ready window) and rare
  writes (dead-lettering on nack) run inline: they take the store as any caller.
* Operations that may block or scan (tail with a timeout, purge, stats, dead
  letters, status) run in a thread each, as before.
Callbacks from other threads, and store completions, reach the loop through
``_post`` (a deque plus a wake-up pipe), so no lock is shared with them.
"""

from __future__ import annotations

import collections
import heapq
import logging
import os
import selectors
import socket
import struct
import threading
import time

from . import errors, wire
from .session_ops import SessionOps

log = logging.getLogger("ipcd.server")

_HEADER = struct.Struct("!i")
_BIG = struct.Struct("!Q")
_MAX_ROUNDS = 16  # follow-up rounds (commits -> deliveries -> acks) run before select() again


def error_reply(e: BaseException, request, abuse_log) -> tuple:
    """The ``("err", kind, message)`` reply for an exception raised by an operation."""
    if isinstance(e, errors.IpcdError):
        return ("err", e.kind, str(e))
    if isinstance(e, TypeError) and "argument" in str(e):
        op = request[0] if isinstance(request, tuple) and request else "?"
        return ("err", "data", f"bad arguments for {op}: {e}")
    if isinstance(e, (ValueError, TypeError, OverflowError)):
        # OverflowError: a client's out-of-range number reaching C code (e.g. an
        # id of 10**30 bound into SQLite) is bad data, not a daemon bug.
        return ("err", "data", f"malformed request: {str(e)[:200]}")
    if isinstance(e, RecursionError):  # e.g. repr() of a list nested 100,000 deep in an error message
        return ("err", "data", "malformed request: nested too deeply")
    # A bug, but one a peer can trigger at will: rate-limit the traceback.
    op = request[0] if isinstance(request, tuple) and request and isinstance(request[0], str) else "?"
    abuse_log.log(logging.ERROR, "internal error in %.60r", op, exc_info=e)
    return ("err", "internal", f"internal error: {type(e).__name__}: {str(e)[:200]}")


def parse_request(request, known) -> tuple[str, dict]:
    op, kwargs = request
    if not isinstance(op, str) or op not in known:
        raise errors.UsageError(f"unknown operation {op!r:.60}")
    if not isinstance(kwargs, dict) or not all(isinstance(k, str) for k in kwargs):
        raise errors.DataError("operation arguments must be a dict")
    return op, kwargs


class Session:
    __slots__ = ("sock", "fd", "peer", "inbuf", "out", "busy", "request", "parked", "park_seq",
                 "deadline", "closed", "reading", "events")

    def __init__(self, sock: socket.socket, peer: str):
        self.sock, self.fd, self.peer = sock, sock.fileno(), peer
        self.inbuf = bytearray()
        self.out = b""  # reply bytes the socket did not take yet
        self.busy = False  # a request is being served (at most one at a time, in order)
        self.request = None
        self.parked = None  # (queue, attempt, on_timeout, kind) while waiting for a queue
        self.park_seq = 0
        self.deadline = None  # monotonic time a timed wait ends (None: untimed or not parked)
        self.closed = False
        self.reading = True  # False while a peer that pipelines far ahead waits to be served
        self.events = 0  # what the selector watches for (see SessionLoop._watch)


class SessionLoop(SessionOps):
    def __init__(self, hub, ops: dict, limits, abuse_log):
        self.hub = hub
        self.ops = ops  # name -> callable: run in a thread per request
        self.limits = limits  # callable -> server.Limits (reload may replace them)
        self.abuse_log = abuse_log
        self.inline = self._inline_ops(hub)
        self.known = frozenset(self.inline) | frozenset(ops)
        self._rbuf = bytearray(wire.READ_CHUNK)
        self._rview = memoryview(self._rbuf)
        self.sel = selectors.DefaultSelector()
        self._rfd, self._wfd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.sel.register(self._rfd, selectors.EVENT_READ, None)
        self._posted: collections.deque = collections.deque()  # callables, from any thread
        self._changed: collections.deque = collections.deque()  # queues that gained messages/room
        self._waiters: dict = {}  # queue -> {session: None}, parked sessions in arrival order
        self._timers: list = []  # heap of (deadline, park_seq, session); stale entries skipped
        self._timed = 0  # parked sessions with a deadline (the live entries of _timers)
        self._seq = 0
        self._sessions: dict[int, Session] = {}
        self._stores = []
        self._commit_due = False  # a done-op was submitted this round: flush the stores
        self._fsync_due = False  # ... and one of them waits for an fsync
        self._wake_pending = False
        self._ident = None
        self._stopping = False
        self._exit = False
        self.in_flight = 0  # requests read and not yet answered (loop thread only)
        self._thread: threading.Thread | None = None
        hub.on_change = self.queue_changed

    # -- from other threads ------------------------------------------------------

    def start(self):
        seen = {}
        for store in self.hub.stores.values():
            seen[id(store)] = store
        self._stores = list(seen.values())
        self._thread = threading.Thread(target=self._run, name="ipcd-sessions", daemon=True)
        self._thread.start()

    def adopt(self, fd: int, peer: str):
        """Take over an authenticated session connection (an fd we now own)."""
        self._post(lambda: self._add(fd, peer))

    def count(self) -> int:
        return len(self._sessions)

    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def responsive(self, timeout: float) -> bool:
        """Whether the loop runs posted work within *timeout* (the watchdog's check:
        a loop stuck in a call never returns to select(), though its thread lives)."""
        ran = threading.Event()
        self._post(ran.set)
        return ran.wait(timeout)

    def queue_changed(self, q):
        self._changed.append(q)
        self._wake()

    def begin_stop(self):
        """Stop reading new requests; finish those in flight, then close each session."""
        self._post(self._stop_reading)

    def wait_idle(self, timeout: float) -> bool:
        """Wait up to *timeout* for every request read to be answered (shutdown only).

        Polls: an Event set and cleared per request cost the hot path ~2 us for a
        wait that happens once per daemon lifetime."""
        deadline = time.monotonic() + timeout
        while self.in_flight:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.005)
        return True

    def close(self, timeout: float = 2.0):
        """Close every session and end the thread (after begin_stop and wait_idle)."""
        def finish():
            for s in list(self._sessions.values()):
                self._close(s)
            self._exit = True
        self._post(finish)
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def _post(self, fn):
        self._posted.append(fn)
        self._wake()

    def _wake(self):
        # Order matters (see _run): append first, then check the flag; the loop clears the
        # flag before it empties the deques, so an item is never left without a wake-up.
        if self._wake_pending or threading.get_ident() == self._ident:
            return
        self._wake_pending = True
        try:
            os.write(self._wfd, b"\0")
        except (BlockingIOError, OSError):
            pass  # the pipe is full (a wake-up is pending) or closed (we are exiting)

    # -- the loop ------------------------------------------------------------------

    def _run(self):
        self._ident = threading.get_ident()
        try:
            while not self._exit:
                for key, mask in self.sel.select(self._next_timeout()):
                    s = key.data
                    if s is None:
                        self._drain_pipe()
                        continue
                    try:
                        if mask & selectors.EVENT_WRITE:
                            self._write(s)
                        if mask & selectors.EVENT_READ and not s.closed:
                            self._read(s)
                    except Exception:  # a bug: lose this session, not every session
                        self.abuse_log.log(logging.ERROR, "session loop: unexpected error serving %s; "
                                           "closing that connection", s.peer, exc_info=True)
                        self._close(s)
                self._wake_pending = False
                for _ in range(_MAX_ROUNDS):
                    if not self._settle():
                        break
                self._expire()
        except BaseException:
            log.critical("session loop failed; closing every session", exc_info=True)
            for s in list(self._sessions.values()):
                self._close(s)
            raise
        finally:
            self._ident = None
            self.sel.close()
            # The wake-up pipe stays open: another thread may still call _wake(), and a
            # closed fd number can be reused by a socket or the store file, which would then
            # get the wake-up byte.  Two fds, once per daemon.

    def _settle(self) -> bool:
        """Run what this round produced; True if there may be more."""
        did = False
        while self._posted:
            fn = self._posted.popleft()
            try:
                fn()
            except Exception:  # a bug; the loop must keep serving everyone else
                self.abuse_log.log(logging.ERROR, "session loop: unexpected error", exc_info=True)
            did = True
        if self._commit_due:
            background, self._commit_due, self._fsync_due = self._fsync_due, False, False
            for store in self._stores:
                store.flush(background)  # completions post replies (run by the next pass)
            did = True
        while self._changed:
            q = self._changed.popleft()
            try:
                if self._retry(q):
                    did = True
            except Exception:  # a bug: the waiters stay parked (and time out) rather than all hang
                self.abuse_log.log(logging.ERROR, "session loop: unexpected error waking %s", q.name,
                                   exc_info=True)
        return did or bool(self._posted)

    def _drain_pipe(self):
        try:
            while os.read(self._rfd, 4096):
                pass
        except BlockingIOError:
            pass

    def _next_timeout(self):
        if self._posted or self._changed:
            return 0
        if not self._timers:
            return 1.0
        return max(0.0, min(1.0, self._timers[0][0] - time.monotonic()))

    # -- connections -----------------------------------------------------------------

    def _add(self, fd: int, peer: str):
        sock = socket.socket(fileno=fd)
        if self._stopping:
            sock.close()
            return
        sock.setblocking(False)
        s = Session(sock, peer)
        self._sessions[s.fd] = s
        self._watch(s)
        self._parse(s)

    def _watch(self, s: Session):
        want = (selectors.EVENT_READ if s.reading else 0) | (selectors.EVENT_WRITE if s.out else 0)
        if want == s.events:
            return
        if not s.events:
            self.sel.register(s.fd, want, s)
        elif not want:
            self.sel.unregister(s.fd)
        else:
            self.sel.modify(s.fd, want, s)
        s.events = want

    def _close(self, s: Session):
        if s.closed:
            return
        s.closed = True
        if s.parked is not None:
            self._unpark(s)
        self._op_done(s)
        self._sessions.pop(s.fd, None)
        if s.events:
            self.sel.unregister(s.fd)
        s.sock.close()

    def _stop_reading(self):
        self._stopping = True
        for s in list(self._sessions.values()):
            if not s.busy:
                self._close(s)

    def _read(self, s: Session):
        # recv_into one buffer owned by the loop: recv(256 KiB) allocated (and, past
        # malloc's mmap threshold, mapped and unmapped) 256 KiB for every 100-byte request.
        try:
            n = s.sock.recv_into(self._rbuf)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            n = 0
        if not n:
            self._close(s)  # a parked recv ends here: nothing is leased to a peer that left
            return
        if not s.inbuf and not s.busy and n >= 4:
            size, = _HEADER.unpack_from(self._rbuf)
            if size == n - 4 and size <= self.limits().max_request_bytes:  # the usual case: one whole request
                self._begin(s, bytes(self._rview[4:n]))
                return
        s.inbuf += self._rview[:n]
        if not s.busy:
            self._parse(s)
        elif len(s.inbuf) > self.limits().max_request_bytes + 12:
            s.reading = False  # a peer pipelining far ahead: stop reading until it is served
            self._watch(s)

    def _parse(self, s: Session):
        """Start the next complete request in *s*'s buffer, if any."""
        buf = s.inbuf
        if s.busy or s.closed or len(buf) < 4:
            return
        size, = _HEADER.unpack_from(buf)
        start = 4
        if size == -1:
            if len(buf) < 12:
                return
            size, = _BIG.unpack_from(buf, 4)
            start = 12
        elif size < 0:
            self.abuse_log.warning("closed the connection from %s: negative frame length %d", s.peer, size)
            self._close(s)
            return
        limit = self.limits().max_request_bytes
        if size > limit:
            self.abuse_log.warning("closed the connection from %s: frame of %d bytes exceeds the limit "
                                   "of %d bytes (max_request_bytes)", s.peer, size, limit)
            self._close(s)
            return
        end = start + size
        if len(buf) < end:
            return
        data = bytes(buf[start:end])
        del buf[:end]
        self._begin(s, data)

    # -- running requests ----------------------------------------------------------------

    def _begin(self, s: Session, data: bytes):
        s.busy = True
        self.in_flight += 1
        s.request = None
        try:
            request = s.request = wire.loads(data)
        except wire.BadRequest as e:  # the frame was consumed: answer and go on
            self.abuse_log.warning("refused a request from %s: %s", s.peer, e)
            self._reply(s, ("err", e.kind, str(e)))
            return
        try:
            op, kwargs = parse_request(request, self.known)
            handler = self.inline.get(op)
            if handler is not None:
                handler(s, **kwargs)
            else:
                self._in_thread(s, op, self.ops[op], kwargs)
        except Exception as e:
            self._reply(s, error_reply(e, request, self.abuse_log))

    def _reply(self, s: Session, reply: tuple):
        if s.closed:
            self._op_done(s)
            return
        try:
            data = wire.dumps(reply)
        except Exception as e:  # e.g. a result that cannot be pickled: a bug, but say so
            data = wire.dumps(error_reply(e, s.request, self.abuse_log))
        s.out = wire.frame_header(len(data)) + data
        self._write(s)

    def _write(self, s: Session):
        """Send what is left of the reply (now, or when the socket is writable again);
        the request is done once all of it is out."""
        try:
            sent = s.sock.send(s.out)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            self._close(s)
            return
        s.out = s.out[sent:]
        self._watch(s)  # writability is watched only while something is left
        if not s.out:
            self._op_done(s)

    def _op_done(self, s: Session):
        """The reply is out (or the peer gone): the session may take its next request."""
        if not s.busy:
            return
        s.busy = False
        s.request = None
        self.in_flight -= 1
        if s.closed:
            return
        if self._stopping:
            self._close(s)
        elif not s.reading:
            s.reading = True
            self._watch(s)
            self._posted.append(lambda: self._parse(s))
        elif s.inbuf:
            self._posted.append(lambda: self._parse(s))  # a pipelined request: not recursively

    def _result(self, s: Session, result, error=None):
        if error is not None:
            self._reply(s, error_reply(error, s.request, self.abuse_log))
        else:
            self._reply(s, ("ok", result))

    def _in_thread(self, s: Session, op: str, func, kwargs: dict):
        request = s.request

        def work():
            try:
                reply = ("ok", func(**kwargs))
            except Exception as e:
                reply = error_reply(e, request, self.abuse_log)
            self._post(lambda: self._reply(s, reply))
        threading.Thread(target=work, name=f"ipcd-op-{op}", daemon=True).start()

    # -- waiting for a queue --------------------------------------------------------------

    def _park(self, s: Session, q, timeout: float | None, attempt, on_timeout, kind: str):
        """Wait for *q*: ``attempt(s)`` is retried when it changes (True: served),
        ``on_timeout(s)`` runs at the deadline.  *kind* is "get" or "put"."""
        self._seq += 1
        s.park_seq = self._seq
        s.parked = (q, attempt, on_timeout, kind)
        # A dict as an ordered set: O(1) removal when the session is served, times out or
        # leaves, so nothing stale accumulates on a queue that never changes again.
        self._waiters.setdefault(q, {})[s] = None
        with q.lock:
            q.waiting += 1  # `ipcd stats` shows consumers waiting
        if timeout is not None:
            s.deadline = time.monotonic() + timeout
            heapq.heappush(self._timers, (s.deadline, self._seq, s))
            self._timed += 1

    def _unpark(self, s: Session):
        if s.parked is None:  # an attempt that unparked and then failed (e.g. store closed)
            return
        q = s.parked[0]
        s.parked = None
        waiters = self._waiters.get(q)
        if waiters is not None:
            waiters.pop(s, None)
            if not waiters:
                del self._waiters[q]
        with q.lock:
            q.waiting -= 1
        if s.deadline is not None:
            s.deadline = None
            self._timed -= 1
            # Served waits leave their heap entries behind until their deadline: a consumer
            # looping on recv(timeout=3600) at thousands of messages a second would pile up
            # millions.  Rebuild from the live ones when the stale outnumber them.
            if len(self._timers) > 2 * self._timed + 64:
                self._timers = [(w.deadline, w.park_seq, w) for ws in self._waiters.values()
                                for w in ws if w.deadline is not None]
                heapq.heapify(self._timers)

    def _retry(self, q) -> bool:
        """Give the sessions parked on *q* another go, oldest first."""
        waiters = self._waiters.get(q)
        if not waiters:
            return False
        did = gets_failed = False
        for s in list(waiters):
            if s.parked is None or s.parked[0] is not q:
                continue  # served, timed out or gone earlier in this pass
            _q, attempt, _on_timeout, kind = s.parked
            if kind == "get" and gets_failed:
                # Receivers of one queue see the same ready messages: once one found none,
                # the rest would too (a message wakes one waiter, not all N of them).
                continue
            try:
                done = attempt(s)  # unparks the session when it is served
            except Exception as e:  # e.g. the daemon is stopping, or the queue's settings changed
                self._unpark(s)
                self._result(s, None, e)
                did = True
                continue
            if done:
                did = True
            else:
                gets_failed |= kind == "get"
        return did

    def _expire(self):
        now = time.monotonic()
        while self._timers and self._timers[0][0] <= now:
            _deadline, seq, s = heapq.heappop(self._timers)
            if s.parked is not None and s.park_seq == seq and not s.closed:
                on_timeout = s.parked[2]
                self._unpark(s)
                on_timeout(s)
