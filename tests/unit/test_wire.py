"""wire.py in isolation: restricted unpickler, framing limits, deadlines, handshake.

Everything runs over socketpairs in this process; the daemon-level behaviour
(threads, eviction, logging, RSS) is in tests/integration/test_security.py.
"""

from __future__ import annotations

import builtins
import hmac
import logging
import os
import pickle
import socket
import struct
import threading
import time
from multiprocessing import managers

import pytest
from hypothesis import given, settings, strategies as st

from ipcd import errors, wire
from ipcd.server import RateLimitedLog


class ExecPayload:
    def __reduce__(self):
        return (os.system, ("touch /nonexistent-ipcd-marker",))


class EvalPayload:
    def __reduce__(self):
        return (builtins.eval, ("1+1",))


def pair():
    a, b = socket.socketpair()
    return wire.Conn(a.detach()), wire.Conn(b.detach())


# -- restricted unpickler -----------------------------------------------------

PLAIN = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text() | st.binary(),
    lambda inner: st.lists(inner, max_size=5) | st.tuples(inner, inner)
    | st.dictionaries(st.text(max_size=5) | st.integers(), inner, max_size=5)
    | st.frozensets(st.integers() | st.text(max_size=5), max_size=5),
    max_leaves=15,
)


@given(PLAIN, st.integers(4, pickle.HIGHEST_PROTOCOL))
@settings(max_examples=300, deadline=None)
def test_plain_data_round_trips(obj, protocol):
    # Protocol 4 is what stdlib 3.8-3.13 proxies send, 5 what ipcd's client sends.
    assert wire.loads(pickle.dumps(obj, protocol=protocol)) == obj


@pytest.mark.parametrize("obj", [{1, 2}, frozenset({1}), b"bytes"])
def test_old_protocols_needing_a_global_for_plain_types_are_refused(obj):
    # By design: protocols < 4 pickle sets via builtins.set and (< 3) bytes via
    # _codecs.encode, a function call; admitting those widens the surface for
    # clients nobody uses (every supported Python defaults to protocol >= 4).
    with pytest.raises(wire.BadRequest):
        wire.loads(pickle.dumps(obj, protocol=2))


def test_token_is_admitted():
    tok = managers.Token("queue", "/x/ipcd.sock", "abc")
    got = wire.loads(pickle.dumps(tok))
    assert (got.typeid, got.address, got.id) == ("queue", "/x/ipcd.sock", "abc")


@pytest.mark.parametrize("payload", [
    ExecPayload(), EvalPayload(), [1, {"k": (ExecPayload(),)}], {"a": [EvalPayload()]},
    (None, "session", (), {"x": ExecPayload()}), ValueError("x"), logging.getLogger("x"),
])
def test_globals_are_refused(payload):
    with pytest.raises(wire.BadRequest, match="forbidden"):
        wire.loads(pickle.dumps(payload))


@pytest.mark.parametrize("data", [
    b"cos\nsystem\n(S'touch /nonexistent'\ntR.",  # protocol 0 GLOBAL + REDUCE
    b"(cos\nsystem\nS'id'\no.",  # protocol 1 OBJ
    b"(S'id'\nios\nsystem\n.",  # protocol 0 INST
    b"\x80\x04\x8c\x08builtins\x8c\x04eval\x93\x8c\x031+1\x85R.",  # STACK_GLOBAL
    b"\x80\x02\x82\x01.",  # EXT1 (copyreg registry)
    b"\x80\x02P0\n.",  # PERSID
])
def test_handwritten_exploits_are_refused(data):
    with pytest.raises(wire.BadRequest):
        wire.loads(data)


@pytest.mark.parametrize("data", [
    b"", b".", b"\x80", b"\x80\x05", b"N", b"\x80\x05h\x07.",  # memo miss
    b"\x80\x05\x8e" + struct.pack("<Q", 1 << 40) + b"x" * 10,  # BINBYTES8 claiming 1 TiB
    b"\x80\x05\x96" + struct.pack("<Q", 1 << 40),  # BYTEARRAY8
    b"\x80\x05\x8d" + struct.pack("<Q", 1 << 40),  # BINUNICODE8
    b"B" + struct.pack("<I", 0xFFFFFFFF) + b"xx",  # BINBYTES claiming 4 GiB
    b"(" * 100_000 + b".",  # marks without anything
])
def test_junk_becomes_bad_request_never_eof_or_memoryerror(data):
    # An EOFError here would read as "peer hung up", a MemoryError as a bug.
    with pytest.raises(wire.BadRequest):
        wire.loads(data)


@given(st.binary(max_size=200))
@settings(max_examples=500, deadline=None)
def test_random_bytes_only_ever_raise_bad_request(data):
    try:
        wire.loads(data)
    except wire.BadRequest:
        pass


# -- the pre-scan: valid pickles that would make the C unpickler allocate ---------------


@pytest.mark.parametrize("data", [
    b"\x80\x05N" + b"r" + struct.pack("<I", 10 ** 8) + b".",  # LONG_BINPUT: memo of 2e8 entries (1.5 GiB)
    b"\x80\x05N" + b"q\xff" + b".",  # BINPUT 255 with an empty memo
    b"\x80\x05Np100000000\n.",  # text PUT
    b"\x80\x05" + b"\x8f" * (4 << 20) + b".",  # 4 MiB of EMPTY_SET: 943 MiB unscanned
    b"\x80\x05" + b"]" * (4 << 20) + b".",  # EMPTY_LIST
    b"\x80\x05N" + b"\x94" * (4 << 20) + b".",  # MEMOIZE
    b"\x80\x05N" + b"2" * (4 << 20) + b".",  # DUP
])
def test_amplifying_pickles_are_refused_before_unpickling(data):
    import resource

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(wire.BadRequest, match="refused pickle"):
        wire.loads(data)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 64 << 10  # KiB


@pytest.mark.parametrize("data", [
    b"\x80\x05\x96" + struct.pack("<Q", 3) + b"abc.",  # BYTEARRAY8
    b"\x80\x05C\x03abc\x98.",  # READONLY_BUFFER
    b"\x80\x05\x97.",  # NEXT_BUFFER
    b"\x80\x02U\x03abc.",  # SHORT_BINSTRING (Python 2 str)
    b"I42\n.", b"F1.5\n.", b"Vabc\n.", b"(lp0\nI1\na.", b"\x80\x02Q.",  # text opcodes, BINPERSID
    b"\x80\x05\x8c\x03abc",  # no STOP
    b"\x80\x05\x8c\xffab.",  # a length past the end
    b"\x80\x05X" + struct.pack("<I", 1 << 31) + b"ab.",
])
def test_opcodes_outside_the_plain_data_subset_are_refused(data):
    with pytest.raises(wire.BadRequest, match="refused pickle"):
        wire.loads(data)


def test_memo_written_densely_is_fine():
    # What the protocol <= 3 pickler emits: BINPUT with the next free index.
    obj = [{"a": "x"}, {"a": "x"}] * 3
    for proto in (2, 3, 4, 5):
        assert wire.loads(pickle.dumps(obj, protocol=proto)) == obj


def test_a_large_legitimate_batch_passes_the_budget():
    # 10,000 bodies with a non-BMP character each: str payloads are charged 4x.
    bodies = [f'"{i:05d}\U0001F600' + "x" * 1000 + '"' for i in range(10_000)]
    request = ("put_many", {"queue": "q", "bodies": bodies, "timeout": None})
    assert wire.loads(pickle.dumps(request, protocol=5)) == request


def test_bad_request_is_a_data_error_for_clients():
    # A client that receives an undecodable reply gets one Error: line, no traceback.
    assert issubclass(wire.BadRequest, errors.DataError)


# -- framing ----------------------------------------------------------------------


def test_frame_over_limit_is_refused_from_its_header_alone():
    a, b = pair()
    a._send(struct.pack("!i", 0x7FFFFFFF))  # 2 GiB announced, nothing follows
    with pytest.raises(wire.FrameTooLarge) as exc:
        b.recv_obj(1 << 20)
    assert exc.value.size == 0x7FFFFFFF and b.closed


def test_eight_byte_header_over_limit():
    a, b = pair()
    a._send(struct.pack("!i", -1) + struct.pack("!Q", 1 << 62))
    with pytest.raises(wire.FrameTooLarge):
        b.recv_obj(1 << 20)


@pytest.mark.parametrize("size", [-2, -(1 << 31)])
def test_negative_lengths_are_a_frame_error(size):
    a, b = pair()
    a._send(struct.pack("!i", size))
    with pytest.raises(wire.FrameError):
        b.recv_obj(1 << 20)


def test_bad_request_leaves_the_stream_in_sync():
    a, b = pair()
    a.send_bytes(pickle.dumps(ExecPayload()))
    a.send_obj(("stats", {}))
    with pytest.raises(wire.BadRequest):
        b.recv_obj(1 << 20)
    assert b.recv_obj(1 << 20) == ("stats", {})


def test_large_frame_is_read_in_chunks():
    a, b = pair()
    body = ("x" * (3 * wire.READ_CHUNK + 7),)
    t = threading.Thread(target=a.send_obj, args=(body,))
    t.start()
    assert b.recv_obj(8 << 20) == body
    t.join()


# -- deadlines --------------------------------------------------------------------


def test_deadline_cuts_off_a_trickling_peer():
    a, b = pair()
    stop = threading.Event()

    def trickle():
        for byte in struct.pack("!i", 100) + b"x" * 100:
            if stop.wait(0.05):
                return
            try:
                a._send(bytes([byte]))
            except OSError:
                return

    t = threading.Thread(target=trickle)
    t.start()
    b.deadline = time.monotonic() + 0.4
    t0 = time.monotonic()
    with pytest.raises(TimeoutError):
        b.recv_obj(1 << 20)
    assert 0.3 < time.monotonic() - t0 < 2.0
    stop.set()
    t.join()


def test_deadline_works_for_descriptors_above_1024():
    # select() raises ValueError for fd >= FD_SETSIZE; the daemon with a few
    # hundred connections and other files open reaches that.
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 2100:
        pytest.skip(f"RLIMIT_NOFILE hard limit {hard} too low")
    if soft < 2100:
        resource.setrlimit(resource.RLIMIT_NOFILE, (2100, hard))
    try:
        a, b = socket.socketpair()
        fd = os.dup2(b.fileno(), 2000)
        b.close()
        conn = wire.Conn(fd)
        conn.deadline = time.monotonic() + 0.2
        with pytest.raises(TimeoutError):
            conn.recv_obj(1 << 20)
        frame = pickle.dumps(("stats", {}))
        a.sendall(struct.pack("!i", len(frame)) + frame)  # data waiting: read, not timed out
        conn.deadline = time.monotonic() + 2
        assert conn.recv_obj(1 << 20) == ("stats", {})
        conn.close()
        a.close()
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


# -- handshake ---------------------------------------------------------------------


def _serve(conn, key, out):
    try:
        wire.server_handshake(conn, key)
        out.append("ok")
    except Exception as e:  # noqa: BLE001 - recorded for the assertion
        out.append(e)


def test_handshake_round_trip():
    a, b = pair()
    out = []
    t = threading.Thread(target=_serve, args=(b, b"k" * 32, out))
    t.start()
    wire.client_handshake(a, b"k" * 32)
    t.join(5)
    assert out == ["ok"]


def test_wrong_key_gets_failure_and_nothing_else():
    a, b = pair()
    out = []
    b.deadline = time.monotonic() + 5
    t = threading.Thread(target=_serve, args=(b, b"right", out))
    t.start()
    challenge = a.recv_bytes(256)
    assert challenge.startswith(wire.CHALLENGE)
    a.send_bytes(hmac.new(b"wrong", challenge[len(wire.CHALLENGE):], "md5").digest())
    assert a.recv_bytes(256) == wire.FAILURE
    t.join(5)
    b.close()
    assert isinstance(out[0], errors.AuthError)
    with pytest.raises(EOFError):  # no pickled traceback follows
        a.recv_bytes(1 << 16)


def test_oversized_handshake_frame_is_refused_unread():
    a, b = pair()
    out = []
    b.deadline = time.monotonic() + 5
    t = threading.Thread(target=_serve, args=(b, b"k", out))
    t.start()
    a.recv_bytes(256)
    a._send(struct.pack("!i", 1 << 30))
    t.join(5)
    assert isinstance(out[0], EOFError)


# -- rate-limited log ----------------------------------------------------------------


def test_rate_limited_log_counts_what_it_drops(caplog):
    now = [0.0]
    rl = RateLimitedLog(logging.getLogger("ipcd.test"), period=10, burst=3, clock=lambda: now[0])
    with caplog.at_level(logging.WARNING, logger="ipcd.test"):
        for i in range(10):
            rl.warning("failure %d", i)
        now[0] = 11
        rl.warning("later")
    msgs = [r.getMessage() for r in caplog.records]
    assert msgs == ["failure 0", "failure 1", "failure 2", "7 similar messages suppressed", "later"]
