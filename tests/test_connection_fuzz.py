# -*- test-case-name: tests.test_connection_fuzz -*-
"""
Property tests for L{twisted_nbd._connection}: whatever bytes a client
sends, the connection answers with events, NEED_DATA or
L{ProtocolViolation}, never any other exception, and its output stays a
well-formed sequence of replies.
"""

from __future__ import annotations

from typing import Any

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from tests import builders as b
from tests.test_connection import new_connection, registry
from twisted_nbd._connection import NEED_DATA, ServerConnection
from twisted_nbd._wire import Cmd, CmdFlags, Opt
from twisted_nbd.errors import ProtocolViolation
from twisted_nbd.events import ReadRequest, WriteRequest
from twisted_nbd.interfaces import Capabilities

SIZE = 1 << 20

options = st.one_of(
    st.builds(b.go, st.sampled_from(["", "disk", "other", "nosuch"])),
    st.builds(
        b.option,
        st.sampled_from([int(o) for o in Opt] + [0, 12, 0x7FFFFFFF]),
        st.binary(max_size=64),
    ),
    st.builds(
        lambda q: b.option(Opt.SET_META_CONTEXT, b.meta_data("disk", *q)),
        st.lists(st.sampled_from(["base:", "base:allocation", "x:y", "nocolon"]), max_size=3),
    ),
    st.builds(
        lambda q: b.option(Opt.LIST_META_CONTEXT, b.meta_data("disk", *q)),
        st.lists(st.sampled_from(["base:", "qemu:", "bad"]), max_size=3),
    ),
)

# Headers without payloads: WRITE comes from the strategy below, with its
# payload, so that well-formed sessions stay well framed.
requests = st.one_of(
    st.builds(
        b.request,
        st.sampled_from([int(c) for c in Cmd if c not in (Cmd.DISC, Cmd.WRITE)] + [9, 0xFFFF]),
        st.integers(0, 2**64 - 1),
        st.one_of(st.integers(0, SIZE + 10), st.integers(0, 2**64 - 1)),
        st.one_of(st.integers(0, 4096), st.integers(0, 2**32 - 1)),
        st.one_of(
            st.sampled_from([0, int(CmdFlags.FUA), int(CmdFlags.DF)]), st.integers(0, 0xFFFF)
        ),
    ),
    st.builds(
        lambda cookie, offset, data, flags: b.write(cookie, offset, data, flags),
        st.integers(0, 2**64 - 1),
        st.integers(0, SIZE + 10),
        st.binary(max_size=600),
        st.sampled_from([0, int(CmdFlags.FUA), 0x8000]),
    ),
)


def drive(conn: ServerConnection, data: bytes, chunk: int) -> None:
    """Feed C{data} in chunks; only events, NEED_DATA or ProtocolViolation."""
    for pos in range(0, len(data), chunk):
        conn.receive_data(data[pos : pos + chunk])
        for _ in range(10_000):
            try:
                event = conn.next_event()
            except ProtocolViolation:
                return
            if event is NEED_DATA:
                break
        else:
            raise AssertionError("next_event never asked for more data")
        conn.data_to_send()


class FuzzTests(SynchronousTestCase):
    """Random and mutated input never breaks the connection's contract."""

    @settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(st.binary(max_size=400), st.integers(1, 64))
    def test_random_bytes(self, data: bytes, chunk: int) -> None:
        """Arbitrary bytes from the first byte on."""
        drive(new_connection(), data, chunk)

    @settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(
        st.lists(options, max_size=5),
        st.sampled_from([b.client_flags(3), b.client_flags(1)]),
        st.booleans(),
        st.lists(requests, max_size=8),
        st.integers(1, 100),
        st.integers(0, 2000),
        st.binary(max_size=8),
    )
    def test_mutated_sessions(
        self,
        opts: list[bytes],
        flags: bytes,
        structured: bool,
        reqs: list[bytes],
        chunk: int,
        cut: int,
        noise: bytes,
    ) -> None:
        """Plausible sessions (options, GO, requests) with bytes spliced in."""
        hello = flags + (b.option(Opt.STRUCTURED_REPLY) if structured else b"")
        data = hello + b"".join(opts) + b.go("disk") + b"".join(reqs)
        cut = min(cut, len(data))
        data = data[:cut] + noise + data[cut:]
        reg = registry(caps=Capabilities(can_extents=True, can_fast_zero=True, min_block=1))
        drive(new_connection(reg), data, chunk)

    @settings(max_examples=150, deadline=None)
    @given(st.lists(requests, max_size=10), st.integers(1, 100))
    def test_valid_sessions_never_violate(self, reqs: list[bytes], chunk: int) -> None:
        """Well-framed requests after GO, however odd their fields, never make the
        connection hang up (T-03..T-11: errors are replies, not disconnects)."""
        conn = new_connection(registry(caps=Capabilities(can_extents=True)))
        conn.receive_data(b.client_flags() + b.go("disk"))
        while conn.next_event() is not NEED_DATA:
            pass
        data = b"".join(reqs)
        for pos in range(0, len(data), chunk):
            conn.receive_data(data[pos : pos + chunk])
            while conn.next_event() is not NEED_DATA:
                pass
        self.assertEqual(len(conn._buffer), 0)


def _session(
    conn: ServerConnection,
    setup: bytes,
    data: bytes,
    shut: bool,
    simple: bool = False,
    lone: list[bytes] | None = None,
) -> tuple[list[object], bytes]:
    """
    Events and output of C{data} sent after C{setup} (the handshake); with
    C{simple}, taking what L{ServerConnection.take_simple} gives first, as
    the server's tight loop does, turned into the events it stands for;
    with C{lone}, C{data} cut into those requests, each arriving alone and
    offered to L{ServerConnection.take_lone_read} first, as polling does,
    then its header to L{ServerConnection.take_lone_write}, as the
    server's streaming of large WRITEs does.
    """
    events: list[object] = []
    conn.receive_data(setup)
    while conn.next_event() is not NEED_DATA:
        pass
    conn.data_to_send()
    if shut:
        conn.shutdown()
    if lone is not None:
        assert b"".join(lone) == data
        for piece in lone:
            lone_taken = conn.take_lone_read(piece)
            if lone_taken is not None:
                flags, cookie, offset, length = lone_taken
                events.append(ReadRequest(cookie, offset, length, flags))
                continue
            header = piece[: conn.header_size]
            lone_taken = conn.take_lone_write(header)
            if lone_taken is not None:
                # The payload is the caller's to receive: the rest of the piece.
                flags, cookie, offset, length = lone_taken
                rest = piece[len(header) :]
                assert len(rest) == length
                events.append(WriteRequest(cookie, offset, rest, bool(flags & CmdFlags.FUA)))
                continue
            if not _full_path(conn, piece, events):
                break
        return events, b"".join(conn.data_to_send())
    conn.receive_data(data)
    while True:
        if simple:
            taken = conn.take_simple()
            if taken is not None:
                command, flags, cookie, offset, length, payload = taken
                if payload is None:
                    events.append(ReadRequest(cookie, offset, length, flags))
                else:
                    events.append(WriteRequest(cookie, offset, payload, bool(flags & CmdFlags.FUA)))
                continue
        try:
            event = conn.next_event()
        except ProtocolViolation as e:
            events.append(("violation", str(e)))
            break
        if event is NEED_DATA:
            break
        events.append(event)
    return events, b"".join(conn.data_to_send())


def _full_path(conn: ServerConnection, piece: bytes, events: list[object]) -> bool:
    """Receive C{piece} and add its events; C{False} after a protocol violation."""
    conn.receive_data(piece)
    try:
        while (event := conn.next_event()) is not NEED_DATA:
            events.append(event)
    except ProtocolViolation as e:
        events.append(("violation", str(e)))
        return False
    return True


header_fields = st.tuples(
    st.sampled_from([int(Cmd.READ), int(Cmd.WRITE), int(Cmd.TRIM), int(Cmd.CACHE)]),
    st.one_of(
        st.sampled_from([0, int(CmdFlags.FUA), int(CmdFlags.DF), int(CmdFlags.PAYLOAD_LEN)]),
        st.integers(0, 0xFFFF),
    ),
    st.one_of(
        st.sampled_from([0, 512, 4096, SIZE - 4096, SIZE - 512, SIZE - 1, SIZE, SIZE + 1]),
        st.integers(0, 2**64 - 1),
    ),
    st.one_of(
        st.sampled_from([0, 1, 512, 4096, 8192, 4097, SIZE, 32 << 20, (32 << 20) + 1]),
        st.integers(0, 2**32 - 1),
    ),
)


def _payload(length: int) -> bytes:
    """A WRITE payload: of the length asked for if small, else one aligned block."""
    return b"p" * (length if length <= 8192 else 4096)


class FastPathTests(SynchronousTestCase):
    """
    The fast path for plain READs and WRITEs in L{ServerConnection._request},
    and L{ServerConnection.take_simple} for the server's tight loop, decide
    exactly as the full path (L{check_request} and friends) does.
    """

    @settings(max_examples=600, suppress_health_check=[HealthCheck.too_slow])
    # A WRITE to a read-only export once slipped through the fast path.
    @example([(int(Cmd.WRITE), 0, 0, 4096)], 1, False, False, True, False)
    @given(
        st.lists(header_fields, min_size=1, max_size=4),
        st.sampled_from([1, 512, 4096]),
        st.booleans(),
        st.booleans(),
        st.booleans(),
        st.booleans(),
    )
    def test_same_as_full_path(
        self,
        headers: list[tuple[int, int, int, int]],
        min_block: int,
        extended: bool,
        structured: bool,
        read_only: bool,
        shut: bool,
    ) -> None:
        """Whatever the request and the export, both paths give the same events and bytes."""
        caps = Capabilities(can_extents=True, can_fast_zero=True, min_block=min_block)
        hello = b.client_flags(3)
        if extended:
            hello += b.option(Opt.EXTENDED_HEADERS)
        elif structured:
            hello += b.option(Opt.STRUCTURED_REPLY)
        hello += b.go("disk")
        pieces = []
        for command, flags, offset, length in headers:
            if extended:
                payload = _payload(length) if flags & CmdFlags.PAYLOAD_LEN else b""
                if payload:
                    length = len(payload)
                pieces.append(b.ext_request(command, 7, offset, length, flags, payload))
            else:
                payload = _payload(length) if command == Cmd.WRITE else b""
                if payload:
                    length = len(payload)
                pieces.append(b.request(command, 7, offset & (2**64 - 1), length, flags, payload))
        data = b"".join(pieces)
        outcomes = []
        for fast, simple, lone in (
            (True, True, None),
            (True, False, None),
            (False, False, None),
            (True, False, pieces),
        ):
            conn = new_connection(registry(caps=caps, read_only=read_only))
            conn.data_to_send()
            real_enter = conn._enter_transmission

            def enter(
                export: object,
                conn: ServerConnection = conn,
                fast: bool = fast,
                real_enter: Any = real_enter,
            ) -> None:
                real_enter(export)
                conn._fast = fast

            conn._enter_transmission = enter  # type: ignore[method-assign]
            outcomes.append(_session(conn, hello, data, shut, simple, lone))
        self.assertEqual(outcomes[1], outcomes[2])
        self.assertEqual(outcomes[0], outcomes[2], "take_simple")
        # Each request alone is what the full path does with them one by one.
        alone = new_connection(registry(caps=caps, read_only=read_only))
        alone.data_to_send()
        real_enter = alone._enter_transmission

        def slow(export: Any) -> None:
            real_enter(export)
            alone._fast = False

        alone._enter_transmission = slow  # type: ignore[method-assign]
        # With the fast path off, take_lone_read and take_lone_write take
        # nothing: all goes the full way.
        expected = _session(alone, hello, data, shut, lone=pieces)
        self.assertEqual(outcomes[3], expected, "take_lone_read, take_lone_write")
