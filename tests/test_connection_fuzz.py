# -*- test-case-name: tests.test_connection_fuzz -*-
"""
Property tests for L{twisted_nbd._connection}: whatever bytes a client
sends, the connection answers with events, NEED_DATA or
L{ProtocolViolation}, never any other exception, and its output stays a
well-formed sequence of replies.
"""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from tests import builders as b
from tests.test_connection import new_connection, registry
from twisted_nbd._connection import NEED_DATA, ServerConnection
from twisted_nbd._wire import Cmd, CmdFlags, Opt
from twisted_nbd.errors import ProtocolViolation
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
