"""The wire: BaseManager's framing and handshake, hardened, for both ends.

multiprocessing.connection frames every message as a 4-byte big-endian
length (or -1 + an 8-byte length) followed by a pickle, and authenticates
with an HMAC challenge in each direction.  ipcd keeps that wire so a plain
stdlib ``BaseManager`` client can talk to the daemon, but hardens what the
stdlib leaves open (see shared/notes/basemanager.md):

* nothing received is unpickled with the stock unpickler: the restricted
  unpickler admits plain data only (plus the manager's ``Token``), so a
  ``__reduce__`` payload from an authenticated peer cannot execute code;
* frames are size-checked from their header before anything is allocated,
  and the body is read in bounded chunks as it arrives (a header alone
  reserves nothing);
* the handshake has a deadline (the stdlib has none: idle peers pin threads),
  waited for with poll(), which unlike select() works for fds >= 1024;
* the digest comparison is constant-time and there are no ``assert``s that
  ``python -O`` would strip.

The framing is implemented here rather than by subclassing
multiprocessing.connection.Connection: importing that module (tempfile, shutil,
...) cost ~10 ms of every ``ipcd send``; multiprocessing.managers, which the
daemon needs, is heavier still and never imported by clients.
"""

from __future__ import annotations

import hmac
import io
import os
import pickle
import select
import socket
import struct
import time

from . import errors

# What the 3.11 handshake sends; a 3.12+ peer detects this legacy (MD5)
# format by its 20-byte challenge and answers in kind (notes §1).
CHALLENGE = b"#CHALLENGE#"
WELCOME = b"#WELCOME#"
FAILURE = b"#FAILURE#"
MESSAGE_LENGTH = 20
HANDSHAKE_MAX = 256

# Globals a request may reference.  Plain containers, str, bytes, numbers,
# bools and None need no global at all; Token is what stdlib proxies send
# for get_methods/incref.
_ALLOWED_GLOBALS = frozenset({("multiprocessing.managers", "Token")})


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):  # noqa: D401 - pickle API
        if (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"global '{module}.{name}' is forbidden")

    def persistent_load(self, pid):  # pragma: no cover - defensive
        raise pickle.UnpicklingError("persistent ids are forbidden")


class BadRequest(errors.DataError):
    """A complete frame whose contents are refused (forbidden global, junk).

    The whole frame was consumed, so the stream is still in sync: the server
    answers with an error and keeps serving the connection.
    """


# -- pickle pre-scan ------------------------------------------------------------
#
# Restricting globals stops code execution, not memory exhaustion: plain-data
# pickles that are perfectly valid can still make CPython's C unpickler
# allocate far more than the frame (measured on 3.11, fuzz campaign):
#   * PUT/BINPUT/LONG_BINPUT with index i grow the memo array to 2*i entries
#     and zero them: 9 bytes (LONG_BINPUT 10**8) -> 1.5 GiB resident, 7 s;
#   * each 1-byte EMPTY_SET/EMPTY_LIST allocates a ~220/~70-byte object:
#     4 MiB of EMPTY_SET -> 943 MiB (a 64 MiB frame: ~15 GiB).
# So before unpickling, walk the opcodes once: admit only the binary opcodes
# CPython's protocol 4/5 picklers emit for plain data and Token, require memo
# indices to be dense (the pickler always uses the next one), check every
# length against the bytes actually present, and charge each opcode a
# conservative memory cost, refusing the frame as soon as the total exceeds
# SCAN_FLOOR + SCAN_RATIO * len(frame).  Hostile frames are refused early,
# after at most budget/cost opcodes.

SCAN_FLOOR = 16 << 20
SCAN_RATIO = 6  # str payloads are charged 4x (one astral char makes a str 4 bytes/char)

_FIXED = [0] * 256  # total size (opcode + argument) of fixed-size opcodes, else 0
_LENGTH = [0] * 256  # width of the little-endian length prefix of counted opcodes
_COST = [0] * 256  # memory an opcode may cause beyond its payload (object, stack/container slot)
_FACTOR = [0] * 256  # bytes of memory per payload byte


def _op(code, *, fixed=0, length=0, cost=16, factor=0):
    for c in code:
        _FIXED[c], _LENGTH[c], _COST[c], _FACTOR[c] = fixed, length, cost, factor


_OBJ = 128  # an object on the stack that may end up in a dict or set: header + slot + growth
_op(b"\x80", fixed=2, cost=0)  # PROTO
_op(b"\x95", fixed=9, cost=0)  # FRAME: the frame's opcodes follow inline
_op(b"(", fixed=1)  # MARK
_op(b"01", fixed=1, cost=0)  # POP, POP_MARK
_op(b"2", fixed=1)  # DUP
_op(b"N\x88\x89", fixed=1)  # NONE, NEWTRUE, NEWFALSE (singletons)
_op(b"K", fixed=2)  # BININT1 (cached small ints)
_op(b"M", fixed=3, cost=_OBJ)  # BININT2
_op(b"J", fixed=5, cost=_OBJ)  # BININT
_op(b"G", fixed=9, cost=_OBJ)  # BINFLOAT
_op(b"\x8a", length=1, cost=_OBJ, factor=1)  # LONG1
_op(b"\x8b", length=4, cost=_OBJ, factor=1)  # LONG4
_op(b"\x8c", length=1, cost=_OBJ, factor=4)  # SHORT_BINUNICODE
_op(b"X", length=4, cost=_OBJ, factor=4)  # BINUNICODE
_op(b"\x8d", length=8, cost=_OBJ, factor=4)  # BINUNICODE8
_op(b"C", length=1, cost=_OBJ, factor=1)  # SHORT_BINBYTES
_op(b"B", length=4, cost=_OBJ, factor=1)  # BINBYTES
_op(b"\x8e", length=8, cost=_OBJ, factor=1)  # BINBYTES8
_op(b")", fixed=1)  # EMPTY_TUPLE (a singleton)
_op(b"t\x85\x86\x87", fixed=1, cost=_OBJ)  # TUPLE, TUPLE1-3 (items already charged)
_op(b"]l}d", fixed=1, cost=_OBJ)  # EMPTY_LIST, LIST, EMPTY_DICT, DICT
_op(b"\x8f\x91", fixed=1, cost=2 * _OBJ)  # EMPTY_SET, FROZENSET (~220 bytes empty)
_op(b"aesu\x90", fixed=1)  # APPEND, APPENDS, SETITEM, SETITEMS, ADDITEMS
_op(b"h", fixed=2)  # BINGET
_op(b"j", fixed=5)  # LONG_BINGET
_op(b"\x93", fixed=1)  # STACK_GLOBAL (find_class admits Token only)
_op(b"\x81\x92Rb", fixed=1, cost=_OBJ)  # NEWOBJ, NEWOBJ_EX, REDUCE, BUILD (Token only)
_op(b"\x94", fixed=1)  # MEMOIZE: the next memo index, one entry per byte at most
# Checked one by one in _scan: BINPUT, LONG_BINPUT, STOP.  Everything else is
# refused: text opcodes of protocols 0-1 (INT, PUT, GET, GLOBAL, INST, OBJ,
# ...), persistent ids, the copyreg extension registry, out-of-band buffers
# and BYTEARRAY8, and Python 2 strings.
_BINPUT, _LONG_BINPUT, _STOP = ord("q"), ord("r"), ord(".")


def _scan(data) -> None:
    """Refuse *data* (raise ValueError) unless it is a frugal, plain-data pickle.

    One pass, ~100-300 ns per opcode: a hot loop, hence the local aliases.
    """
    n = len(data)
    budget = SCAN_FLOOR + SCAN_RATIO * n
    fixed, length, costs, factors = _FIXED, _LENGTH, _COST, _FACTOR
    i = spent = memo_top = 0
    while i < n:
        op = data[i]
        size = fixed[op]
        if size:
            spent += costs[op]
            i += size
        else:
            w = length[op]
            if w == 1:  # the common case (short strings): no slice
                if i + 1 >= n:
                    raise ValueError("an argument runs past the end of the frame")
                count = data[i + 1]
                i += 2 + count
                spent += costs[op] + factors[op] * count
            elif w:
                count = int.from_bytes(data[i + 1:i + 1 + w], "little")
                i += 1 + w + count
                spent += costs[op] + factors[op] * count
            elif op == _BINPUT or op == _LONG_BINPUT:
                w = 1 if op == _BINPUT else 4
                index = int.from_bytes(data[i + 1:i + 1 + w], "little")
                # The C unpickler grows its memo to 2 * index entries, zeroed:
                # an index can never legitimately exceed the entries so far,
                # and those took at least a byte each.
                if index > i:
                    raise ValueError(f"sparse memo index {index}")
                if index > memo_top:
                    spent += 16 * (index - memo_top)
                    memo_top = index
                i += 1 + w
            elif op == _STOP:
                return
            else:
                raise ValueError(f"opcode {bytes([op])!r} at offset {i} is not accepted")
            if i > n:
                raise ValueError("an argument runs past the end of the frame")
        if spent > budget:
            raise ValueError(f"it would take more than {budget} bytes of memory to decode")
    raise ValueError("no STOP opcode")


def loads(data: bytes):
    """Unpickle *data* admitting only plain data types; raise BadRequest otherwise.

    Every failure becomes BadRequest: junk makes the C unpickler raise almost
    anything (EOFError on b"", KeyError for a bad memo index, ...), and an
    EOFError escaping here would be mistaken for the peer hanging up.
    """
    try:
        _scan(data)
    except (ValueError, IndexError) as e:
        raise BadRequest(f"refused pickle: {e}") from None
    try:
        return _RestrictedUnpickler(io.BytesIO(data)).load()
    except Exception as e:  # MemoryError and RecursionError are Exceptions too
        raise BadRequest(f"undecodable request: {type(e).__name__}: {str(e)[:120]}") from None


def dumps(obj) -> bytes:
    return pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)


class FrameError(EOFError):
    """The peer broke the framing; the connection is closed.

    An EOFError so the serving loops end the connection: letting the stdlib's
    OSError through leaves the peer blocked mid-send (notes §3, size-cap pitfall).
    """


class FrameTooLarge(FrameError):
    """A frame's header announced more than the limit (nothing was allocated)."""

    def __init__(self, size: int, limit: int):
        super().__init__(f"frame of {size} bytes exceeds the limit of {limit} bytes")
        self.size, self.limit = size, limit


# Upper bound for one read(): os.read(fd, n) allocates n bytes up front, so
# reading "the rest of a 64 MiB frame" in one call would reserve 64 MiB for
# whatever 200 KiB the socket happens to hold.
READ_CHUNK = 256 << 10


def frame_header(n: int) -> bytes:
    """The length prefix of an *n*-byte frame: 4 bytes big-endian, or -1 and 8 bytes."""
    return struct.pack("!iQ", -1, n) if n > 0x7FFFFFFF else struct.pack("!i", n)


class Conn:
    """A framed connection on a stream socket fd, reads honouring a deadline and a size limit.

    The wire format and methods of multiprocessing.connection.Connection (send_bytes,
    recv_bytes, close, fileno) without importing it (see the module docstring).
    ``deadline`` (a time.monotonic() value, or None) bounds every read; it is
    set during the handshake so a silent or trickling peer cannot hold a
    thread, and by clients for a whole request.
    """

    deadline: float | None = None
    _poller = None

    def __init__(self, handle: int):
        self._handle = handle

    def __del__(self):
        if self._handle is not None:
            self.close()

    @property
    def closed(self) -> bool:
        return self._handle is None

    def fileno(self) -> int:
        if self._handle is None:
            raise OSError("handle is closed")
        return self._handle

    def close(self) -> None:
        handle, self._handle = self._handle, None
        if handle is not None:
            os.close(handle)

    def _send(self, buf, write=os.write) -> None:
        view = memoryview(buf)
        while view:
            view = view[write(self._handle, view):]

    def send_bytes(self, buf) -> None:
        if self._handle is None:
            raise OSError("handle is closed")
        header = frame_header(len(buf))
        if len(buf) > 16384:  # large: no copy (as the stdlib's; Nagle is no concern at this size)
            self._send(header)
            self._send(buf)
        else:  # one write: header and payload in one segment
            self._send(header + bytes(buf))

    def recv_bytes(self, maxlength: int | None = None) -> bytes:
        buf = self._recv_bytes(maxlength)
        if buf is None:
            raise OSError("bad message length")
        return buf.getvalue()

    def _wait_readable(self) -> None:
        left = self.deadline - time.monotonic()
        if left > 0:
            if self._poller is None:
                self._poller = select.poll()  # select() raises ValueError for fds >= 1024
                self._poller.register(self._handle, select.POLLIN)
            # ceil to whole ms: a 0 ms poll would spin until the deadline
            if self._poller.poll(max(1, int(left * 1000) + 1)):
                return
        raise TimeoutError("timed out waiting for the peer")

    def _recv(self, size, read=os.read):
        buf = io.BytesIO()
        handle = self._handle
        remaining = size
        while remaining > 0:
            if self.deadline is not None:
                self._wait_readable()
            chunk = read(handle, min(remaining, READ_CHUNK))
            if not chunk:
                if remaining == size:
                    raise EOFError
                raise OSError("got end of file during message")
            buf.write(chunk)
            remaining -= len(chunk)
        return buf

    def frame_length(self) -> int:
        """Read a frame header: 4-byte big-endian signed, or -1 then 8 bytes unsigned."""
        size, = struct.unpack("!i", self._recv(4).getvalue())
        if size == -1:
            size, = struct.unpack("!Q", self._recv(8).getvalue())
        elif size < 0:  # the stdlib would read a negative count as "nothing"
            raise FrameError(f"negative frame length {size}")
        return size

    def _recv_bytes(self, maxsize=None):
        # Same contract as the stdlib's (None when too large), with our header checks.
        size = self.frame_length()
        if maxsize is not None and size > maxsize:
            return None
        return self._recv(size)

    def recv_obj(self, limit: int):
        """Receive one frame of at most *limit* bytes and restricted-unpickle it.

        An oversized header closes the connection before any of the body is
        read (FrameTooLarge); a complete but unacceptable frame raises
        BadRequest and leaves the connection usable.
        """
        size = self.frame_length()
        if size > limit:
            self.close()
            raise FrameTooLarge(size, limit)
        return loads(self._recv(size).getvalue())

    def send_obj(self, obj) -> None:
        self.send_bytes(dumps(obj))


def server_handshake(conn: Conn, authkey: bytes) -> None:
    """Run the server side of the mutual handshake (deliver, then answer).

    Raises AuthError on a wrong digest, TimeoutError/EOFError/OSError on a
    peer that stalls, hangs up or sends junk.  Sends no traceback either way.
    """
    message = os.urandom(MESSAGE_LENGTH)
    conn.send_bytes(CHALLENGE + message)
    expected = hmac.new(authkey, message, "md5").digest()
    response = _recv_small(conn)
    if not hmac.compare_digest(response, expected):
        conn.send_bytes(FAILURE)
        raise errors.AuthError("digest received was wrong")
    conn.send_bytes(WELCOME)
    challenge = _recv_small(conn)
    if not challenge.startswith(CHALLENGE):
        raise errors.AuthError("peer sent no challenge")
    conn.send_bytes(hmac.new(authkey, challenge[len(CHALLENGE):], "md5").digest())
    if _recv_small(conn) != WELCOME:
        raise errors.AuthError("peer rejected our digest")


def client_handshake(conn: Conn, authkey: bytes) -> None:
    """Client side: answer the server's challenge, then challenge it back."""
    challenge = _recv_small(conn)
    if not challenge.startswith(CHALLENGE):
        raise errors.Unavailable("the peer is not an ipcd daemon (no challenge)")
    conn.send_bytes(hmac.new(authkey, challenge[len(CHALLENGE):], "md5").digest())
    if _recv_small(conn) != WELCOME:
        raise errors.AuthError("the daemon rejected the authkey")
    message = os.urandom(MESSAGE_LENGTH)
    conn.send_bytes(CHALLENGE + message)
    expected = hmac.new(authkey, message, "md5").digest()
    ok = hmac.compare_digest(_recv_small(conn), expected)
    conn.send_bytes(WELCOME if ok else FAILURE)
    if not ok:
        raise errors.AuthError("the daemon does not hold our authkey (wrong daemon?)")


class ClientConn(Conn):
    """A client's connection: reads ahead, so a reply's header and body (usually one
    segment on the wire) take one read (and one poll) instead of two each.

    Never used by the daemon: there the fd moves to the session loop after the
    handshake, and bytes read ahead would be lost with it.
    """

    _ahead = b""
    READ_AHEAD = 64 << 10  # under malloc's mmap threshold: os.read allocates this much

    def _recv(self, size, read=os.read):
        have = self._ahead
        if len(have) >= size:
            self._ahead = have[size:]
            return io.BytesIO(have[:size])
        buf = bytearray(have)
        self._ahead = b""
        handle = self._handle
        while len(buf) < size:
            if self.deadline is not None:
                self._wait_readable()
            chunk = read(handle, max(self.READ_AHEAD, min(size - len(buf), READ_CHUNK)))
            if not chunk:
                if not buf:
                    raise EOFError
                raise OSError("got end of file during message")
            buf += chunk
        if len(buf) > size:
            self._ahead = bytes(buf[size:])
            del buf[size:]
        return io.BytesIO(buf)


def _recv_small(conn: Conn) -> bytes:
    buf = conn._recv_bytes(HANDSHAKE_MAX)
    if buf is None:
        raise EOFError("oversized handshake frame")
    return buf.getvalue()


def make_socket(address) -> socket.socket:
    """A stream socket of the right family for *address* (str path or (host, port))."""
    if isinstance(address, str):
        return socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    host = address[0]
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return socket.socket(family, socket.SOCK_STREAM)


def connect(address, authkey: bytes, timeout: float) -> Conn:
    """Open an authenticated connection, never waiting longer than *timeout*.

    ``multiprocessing.connection.Client()`` has no connect timeout: against a
    socket that listens but never accepts it blocks forever (notes §6).  This
    bounds the connect and the whole handshake.
    """
    shown = address if isinstance(address, str) else "%s:%d" % address
    deadline = time.monotonic() + timeout
    sock = make_socket(address)
    try:
        sock.settimeout(timeout)
        sock.connect(address)
        sock.setblocking(True)
    except (FileNotFoundError, ConnectionRefusedError) as e:
        sock.close()
        raise errors.Unavailable(
            f"no daemon is listening on {shown} (is 'ipcd start' running?)"
        ) from e
    except PermissionError as e:
        sock.close()
        raise errors.PermissionDenied(
            f"permission denied connecting to {shown}: ask the daemon's owner "
            "for access (socket_group) or use your own daemon"
        ) from e
    except (socket.timeout, TimeoutError) as e:
        sock.close()
        raise errors.Unavailable(f"the daemon on {shown} did not accept within {timeout:g} s") from e
    except OSError as e:
        sock.close()
        raise errors.Unavailable(f"cannot connect to {shown}: {e.strerror or e}") from e
    conn = ClientConn(sock.detach())
    conn.deadline = deadline
    try:
        client_handshake(conn, authkey)
    except errors.IpcdError:
        conn.close()
        raise
    except TimeoutError as e:
        conn.close()
        raise errors.Unavailable(f"the daemon on {shown} did not answer within {timeout:g} s") from e
    except (EOFError, OSError) as e:
        conn.close()
        raise errors.Unavailable(
            f"the daemon on {shown} closed the connection during the handshake "
            "(too many connections, or not allowed by allow_uids/allow_gids)"
        ) from e
    conn.deadline = None
    return conn


def peer_credentials(conn: Conn) -> tuple[int, int, int] | None:
    """(pid, uid, gid) of a Unix-socket peer via SO_PEERCRED, else None."""
    try:
        s = socket.socket(fileno=os.dup(conn.fileno()))
    except OSError:
        return None
    try:
        if s.family != socket.AF_UNIX:
            return None
        raw = s.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        return struct.unpack("3i", raw)
    except OSError:
        return None
    finally:
        s.close()


_NO_CRED = object()


def peer_name(conn: Conn, cred=_NO_CRED) -> str:
    """A log-friendly description of the peer: uid/pid on Unix, address on TCP.

    *cred*: what peer_credentials() already returned, to skip asking again.
    """
    if cred is _NO_CRED:
        cred = peer_credentials(conn)
    if cred is not None:
        pid, uid, gid = cred
        return f"uid={uid} gid={gid} pid={pid}"
    try:
        s = socket.socket(fileno=os.dup(conn.fileno()))
        try:
            host, port = s.getpeername()[:2]
            return f"{host}:{port}"
        finally:
            s.close()
    except OSError:
        return "unknown peer"
