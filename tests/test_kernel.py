# -*- test-case-name: tests.test_kernel -*-
"""
Tests for L{twisted_nbd._kernel}: the negotiated record, the transmission
rules of section 2.7, and the sans-I/O shell both cores share.
"""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from twisted_nbd import _wire as w
from twisted_nbd._buffer import _NeedData
from twisted_nbd._kernel import (
    NEED_DATA,
    Negotiated,
    Phase,
    SansIOConnection,
    TransmissionRules,
    check_request,
)
from twisted_nbd._wire import Cmd, CmdFlags, Errno, TxFlags
from twisted_nbd.errors import ProtocolViolation

KIB = 1024
MIB = 1024 * KIB

#: Every transmission flag that exposes a command or a command flag.
EVERYTHING = int(
    TxFlags.HAS_FLAGS
    | TxFlags.SEND_FLUSH
    | TxFlags.SEND_FUA
    | TxFlags.SEND_TRIM
    | TxFlags.SEND_WRITE_ZEROES
    | TxFlags.SEND_DF
    | TxFlags.SEND_FAST_ZERO
    | TxFlags.SEND_CACHE
)
#: What a server sends for a read-only export: nothing that writes.
READ_ONLY = int(TxFlags.HAS_FLAGS | TxFlags.READ_ONLY | TxFlags.SEND_FLUSH | TxFlags.SEND_DF)


def make_rules(
    size: int = MIB,
    tx_flags: int = EVERYTHING,
    min_block: int = 512,
    max_payload: int = 64 * KIB,
    block_status: bool = True,
    extended: bool = False,
) -> TransmissionRules:
    """Rules for a writable 1 MiB export with 512-byte blocks unless told otherwise."""
    return TransmissionRules.make(size, tx_flags, min_block, max_payload, block_status, extended)


class NegotiatedTests(SynchronousTestCase):
    """L{Negotiated} records the handshake and forgets it at STARTTLS."""

    def test_defaults(self) -> None:
        """A fresh record has nothing negotiated."""
        n = Negotiated()
        self.assertEqual(
            (n.fixed_newstyle, n.no_zeroes, n.structured_replies, n.extended_headers, n.tls),
            (False, False, False, False, False),
        )
        self.assertIsNone(n.meta_export)
        self.assertEqual(dict(n.meta_contexts), {})

    @given(st.booleans(), st.booleans(), st.booleans(), st.booleans(), st.booleans())
    def test_after_starttls_S06(
        self,
        fixed_newstyle: bool,
        no_zeroes: bool,
        structured: bool,
        extended: bool,
        meta: bool,
    ) -> None:
        """
        S-06: after STARTTLS all prior option negotiation is discarded
        (structured replies, extended headers, meta contexts); the client
        flags belong to the greeting and stay, and TLS is on.
        """
        before = Negotiated(
            fixed_newstyle=fixed_newstyle,
            no_zeroes=no_zeroes,
            structured_replies=structured,
            extended_headers=extended,
            meta_export="disk" if meta else None,
            meta_contexts={w.BASE_ALLOCATION: 1} if meta else {},
        )
        after = before.after_starttls()
        self.assertEqual(
            after, Negotiated(fixed_newstyle=fixed_newstyle, no_zeroes=no_zeroes, tls=True)
        )
        self.assertFalse(after.structured_replies)
        self.assertFalse(after.extended_headers)
        self.assertIsNone(after.meta_export)
        self.assertEqual(dict(after.meta_contexts), {})
        self.assertTrue(after.tls)
        # The record is replaced, not changed.
        self.assertFalse(before.tls)
        self.assertEqual(before.structured_replies, structured)


class TransmissionRulesTests(SynchronousTestCase):
    """L{TransmissionRules.make} works out which commands and flags are allowed."""

    def test_everything_advertised(self) -> None:
        """With every feature advertised each command gets exactly the flags the spec defines."""
        rules = make_rules()
        self.assertEqual(dict(rules.allowed), {int(c): int(f) for c, f in w.COMMAND_FLAGS.items()})

    def test_fields(self) -> None:
        """The other fields are copied, and the mask is the minimum block size minus one."""
        rules = make_rules(size=12345, min_block=4096, max_payload=MIB, block_status=False)
        self.assertEqual(rules.size, 12345)
        self.assertEqual(rules.tx_flags, EVERYTHING)
        self.assertEqual(rules.mask, 4095)
        self.assertEqual(rules.max_payload, MIB)
        self.assertFalse(rules.block_status)
        self.assertFalse(rules.extended)

    def test_read_only_T08(self) -> None:
        """T-08: a read-only export allows no WRITE, TRIM or WRITE_ZEROES."""
        rules = make_rules(tx_flags=READ_ONLY)
        self.assertEqual(set(rules.allowed), {Cmd.READ, Cmd.FLUSH, Cmd.CACHE, Cmd.BLOCK_STATUS})

    def test_minimal_flags(self) -> None:
        """With only HAS_FLAGS: READ, WRITE, CACHE and BLOCK_STATUS, and no feature flags."""
        rules = make_rules(tx_flags=int(TxFlags.HAS_FLAGS))
        self.assertEqual(
            dict(rules.allowed),
            {
                Cmd.READ: 0,
                Cmd.WRITE: 0,
                Cmd.CACHE: 0,
                Cmd.BLOCK_STATUS: int(CmdFlags.REQ_ONE),
            },
        )

    def test_flush_needs_send_flush(self) -> None:
        """FLUSH is allowed exactly when SEND_FLUSH is advertised."""
        self.assertIn(Cmd.FLUSH, make_rules().allowed)
        self.assertNotIn(Cmd.FLUSH, make_rules(tx_flags=EVERYTHING & ~TxFlags.SEND_FLUSH).allowed)

    def test_trim_and_zeroes_need_their_flags(self) -> None:
        """TRIM and WRITE_ZEROES are allowed only when advertised."""
        self.assertNotIn(Cmd.TRIM, make_rules(tx_flags=EVERYTHING & ~TxFlags.SEND_TRIM).allowed)
        no_zeroes = EVERYTHING & ~(TxFlags.SEND_WRITE_ZEROES | TxFlags.SEND_FAST_ZERO)
        self.assertNotIn(Cmd.WRITE_ZEROES, make_rules(tx_flags=no_zeroes).allowed)

    def test_fua_needs_send_fua(self) -> None:
        """FUA is allowed on every command with SEND_FUA, on none without."""
        with_fua = make_rules().allowed
        without = make_rules(tx_flags=EVERYTHING & ~TxFlags.SEND_FUA).allowed
        self.assertEqual(set(with_fua), set(without))
        for command in with_fua:
            self.assertTrue(with_fua[command] & CmdFlags.FUA, command)
            self.assertFalse(without[command] & CmdFlags.FUA, command)

    def test_df_needs_send_df(self) -> None:
        """DF is allowed on READ only, and only with SEND_DF."""
        self.assertEqual(make_rules().allowed[Cmd.READ], CmdFlags.FUA | CmdFlags.DF)
        without = make_rules(tx_flags=EVERYTHING & ~TxFlags.SEND_DF).allowed
        self.assertEqual(without[Cmd.READ], CmdFlags.FUA)
        for command, flags in make_rules().allowed.items():
            if command != Cmd.READ:
                self.assertFalse(flags & CmdFlags.DF, command)

    def test_fast_zero_needs_send_fast_zero(self) -> None:
        """FAST_ZERO is allowed on WRITE_ZEROES only with SEND_FAST_ZERO; NO_HOLE always is."""
        self.assertEqual(
            make_rules().allowed[Cmd.WRITE_ZEROES],
            CmdFlags.FUA | CmdFlags.NO_HOLE | CmdFlags.FAST_ZERO,
        )
        without = make_rules(tx_flags=EVERYTHING & ~TxFlags.SEND_FAST_ZERO).allowed
        self.assertEqual(without[Cmd.WRITE_ZEROES], CmdFlags.FUA | CmdFlags.NO_HOLE)

    def test_payload_len_needs_extended(self) -> None:
        """PAYLOAD_LEN is allowed on every command with extended headers, on none without."""
        compact = make_rules(extended=False).allowed
        extended = make_rules(extended=True).allowed
        self.assertEqual(set(compact), set(extended))
        for command in compact:
            self.assertFalse(compact[command] & CmdFlags.PAYLOAD_LEN, command)
            self.assertEqual(extended[command], compact[command] | CmdFlags.PAYLOAD_LEN)

    @given(st.integers(0, w.MAX_U16), st.booleans())
    def test_allowed_within_spec(self, tx_flags: int, extended: bool) -> None:
        """
        Whatever the flags: READ, CACHE and BLOCK_STATUS are always there,
        WRITE exactly when the export is writable, and no command carries a
        flag the spec does not define for it.
        """
        rules = make_rules(tx_flags=tx_flags, extended=extended)
        allowed = rules.allowed
        for always in (Cmd.READ, Cmd.CACHE, Cmd.BLOCK_STATUS):
            self.assertIn(always, allowed)
        self.assertEqual(Cmd.WRITE in allowed, not tx_flags & TxFlags.READ_ONLY)
        self.assertEqual(Cmd.FLUSH in allowed, bool(tx_flags & TxFlags.SEND_FLUSH))
        extra = int(CmdFlags.PAYLOAD_LEN) if extended else 0
        for command, flags in allowed.items():
            self.assertIn(command, w.COMMAND_FLAGS)
            self.assertEqual(flags & ~(w.COMMAND_FLAGS[command] | extra), 0)


class CheckRequestTests(SynchronousTestCase):
    """L{check_request} refuses, with the right errno, what section 2.7 forbids."""

    def assert_refused(
        self,
        rules: TransmissionRules,
        command: int,
        flags: int,
        offset: int,
        length: int,
        errno: Errno,
        rule: str | None = None,
    ) -> None:
        """The request is refused with C{errno}, and the reason names C{rule}."""
        refusal = check_request(rules, command, flags, offset, length)
        assert refusal is not None, (command, flags, offset, length)
        self.assertIs(refusal[0], errno)
        if rule is not None:
            self.assertIn(rule, refusal[1])

    def assert_accepted(
        self, rules: TransmissionRules, command: int, flags: int, offset: int, length: int
    ) -> None:
        """The request is carried out."""
        self.assertIsNone(check_request(rules, command, flags, offset, length))

    def test_disc(self) -> None:
        """DISC is never refused (it gets no reply), whatever its fields."""
        self.assert_accepted(make_rules(), Cmd.DISC, 0, 0, 0)
        self.assert_accepted(make_rules(tx_flags=READ_ONLY), Cmd.DISC, 0xFFFF, 1, 2**64 - 1)

    def test_unknown_command_T03(self) -> None:
        """T-03: an unknown command type gets EINVAL."""
        for command in (9, 100, 0xFFFF):
            self.assert_refused(make_rules(), command, 0, 0, 512, Errno.EINVAL, "T-03")

    def test_write_on_read_only_T08(self) -> None:
        """T-08: WRITE, TRIM and WRITE_ZEROES on a read-only export get EPERM."""
        rules = make_rules(tx_flags=READ_ONLY)
        for command in (Cmd.WRITE, Cmd.TRIM, Cmd.WRITE_ZEROES):
            self.assert_refused(rules, command, 0, 0, 512, Errno.EPERM, "T-08")
        # Even when another server advertises them beside READ_ONLY.
        confused = make_rules(tx_flags=READ_ONLY | TxFlags.SEND_TRIM | TxFlags.SEND_WRITE_ZEROES)
        for command in (Cmd.TRIM, Cmd.WRITE_ZEROES):
            self.assert_refused(confused, command, 0, 0, 512, Errno.EPERM, "T-08")

    def test_unadvertised_command_T03(self) -> None:
        """T-03: a known command the export does not advertise gets EINVAL, not EPERM."""
        self.assert_refused(
            make_rules(tx_flags=EVERYTHING & ~TxFlags.SEND_FLUSH),
            Cmd.FLUSH,
            0,
            0,
            0,
            Errno.EINVAL,
            "T-03",
        )
        self.assert_refused(
            make_rules(tx_flags=EVERYTHING & ~TxFlags.SEND_TRIM),
            Cmd.TRIM,
            0,
            0,
            512,
            Errno.EINVAL,
            "T-03",
        )
        self.assert_refused(make_rules(), Cmd.RESIZE, 0, 2 * MIB, 0, Errno.EINVAL, "T-03")

    def test_bad_flags_T04(self) -> None:
        """T-04: a flag not defined for the command, or not advertised, gets EINVAL."""
        rules = make_rules()
        self.assert_refused(rules, Cmd.WRITE, CmdFlags.DF, 0, 512, Errno.EINVAL, "T-04")
        self.assert_refused(rules, Cmd.READ, CmdFlags.NO_HOLE, 0, 512, Errno.EINVAL, "T-04")
        self.assert_refused(rules, Cmd.READ, 0x8000, 0, 512, Errno.EINVAL, "T-04")
        self.assert_refused(rules, Cmd.TRIM, CmdFlags.REQ_ONE, 0, 512, Errno.EINVAL, "T-04")
        self.assert_refused(rules, Cmd.READ, CmdFlags.PAYLOAD_LEN, 0, 512, Errno.EINVAL, "T-04")
        no_fua = make_rules(tx_flags=EVERYTHING & ~TxFlags.SEND_FUA)
        self.assert_refused(no_fua, Cmd.WRITE, CmdFlags.FUA, 0, 512, Errno.EINVAL, "T-04")
        no_fast = make_rules(tx_flags=EVERYTHING & ~TxFlags.SEND_FAST_ZERO)
        self.assert_refused(
            no_fast, Cmd.WRITE_ZEROES, CmdFlags.FAST_ZERO, 0, 512, Errno.EINVAL, "T-04"
        )
        no_df = make_rules(tx_flags=EVERYTHING & ~TxFlags.SEND_DF)
        self.assert_refused(no_df, Cmd.READ, CmdFlags.DF, 0, 512, Errno.EINVAL, "T-04")

    def test_good_flags(self) -> None:
        """Flags defined for the command and advertised are accepted."""
        rules = make_rules()
        self.assert_accepted(rules, Cmd.READ, CmdFlags.FUA | CmdFlags.DF, 0, 512)
        self.assert_accepted(rules, Cmd.WRITE, CmdFlags.FUA, 0, 512)
        zero_flags = CmdFlags.FUA | CmdFlags.NO_HOLE | CmdFlags.FAST_ZERO
        self.assert_accepted(rules, Cmd.WRITE_ZEROES, zero_flags, 0, 512)
        self.assert_accepted(rules, Cmd.BLOCK_STATUS, CmdFlags.REQ_ONE, 0, 512)
        extended = make_rules(extended=True)
        self.assert_accepted(extended, Cmd.WRITE, CmdFlags.PAYLOAD_LEN, 0, 512)

    def test_flush(self) -> None:
        """FLUSH needs zero offset and length; it is not checked against the export."""
        rules = make_rules()
        self.assert_accepted(rules, Cmd.FLUSH, 0, 0, 0)
        self.assert_accepted(rules, Cmd.FLUSH, CmdFlags.FUA, 0, 0)
        self.assert_refused(rules, Cmd.FLUSH, 0, 512, 0, Errno.EINVAL)
        self.assert_refused(rules, Cmd.FLUSH, 0, 0, 512, Errno.EINVAL)
        self.assert_refused(rules, Cmd.FLUSH, 0, 2 * MIB, 2 * MIB, Errno.EINVAL)

    def test_block_status_without_context_T17(self) -> None:
        """T-17: BLOCK_STATUS without a selected meta context gets EINVAL."""
        rules = make_rules(block_status=False)
        self.assert_refused(rules, Cmd.BLOCK_STATUS, 0, 0, 512, Errno.EINVAL, "T-17")
        self.assert_accepted(make_rules(), Cmd.BLOCK_STATUS, 0, 0, 512)

    def test_beyond_end_T06(self) -> None:
        """T-06: past the end, WRITE and WRITE_ZEROES get ENOSPC, the others EINVAL."""
        rules = make_rules()
        for command, errno in [
            (Cmd.WRITE, Errno.ENOSPC),
            (Cmd.WRITE_ZEROES, Errno.ENOSPC),
            (Cmd.READ, Errno.EINVAL),
            (Cmd.TRIM, Errno.EINVAL),
            (Cmd.CACHE, Errno.EINVAL),
            (Cmd.BLOCK_STATUS, Errno.EINVAL),
        ]:
            self.assert_refused(rules, command, 0, MIB - 512, 1024, errno, "T-06")
            self.assert_refused(rules, command, 0, MIB + 512, 0, errno, "T-06")
            self.assert_refused(rules, command, 0, 512, 2**64 - 512, errno, "T-06")
            self.assert_refused(rules, command, 0, 2**64 - 512, 1024, errno, "T-06")

    def test_up_to_end(self) -> None:
        """A request that ends exactly at the end of the export is inside it."""
        rules = make_rules()
        self.assert_accepted(rules, Cmd.READ, 0, MIB - 512, 512)
        self.assert_accepted(rules, Cmd.WRITE, 0, MIB - 512, 512)
        self.assert_accepted(rules, Cmd.TRIM, 0, 0, MIB)
        self.assert_accepted(rules, Cmd.READ, 0, MIB, 0)

    def test_max_payload_T10(self) -> None:
        """T-10: a READ or WRITE over the maximum payload gets EINVAL."""
        rules = make_rules(max_payload=64 * KIB)
        for command in (Cmd.READ, Cmd.WRITE):
            self.assert_accepted(rules, command, 0, 0, 64 * KIB)
            self.assert_refused(rules, command, 0, 0, 64 * KIB + 512, Errno.EINVAL, "T-10")

    def test_max_payload_other_commands_T11(self) -> None:
        """T-11: commands without a payload may be longer than the maximum payload."""
        rules = make_rules(max_payload=64 * KIB)
        for command in (Cmd.TRIM, Cmd.WRITE_ZEROES, Cmd.CACHE, Cmd.BLOCK_STATUS):
            self.assert_accepted(rules, command, 0, 0, MIB)

    def test_misaligned_T07(self) -> None:
        """T-07: an offset or length that is not a multiple of the minimum block gets EINVAL."""
        rules = make_rules(min_block=512)
        for command in (Cmd.READ, Cmd.WRITE, Cmd.TRIM, Cmd.WRITE_ZEROES, Cmd.CACHE):
            self.assert_refused(rules, command, 0, 1, 512, Errno.EINVAL, "T-07")
            self.assert_refused(rules, command, 0, 0, 511, Errno.EINVAL, "T-07")
            self.assert_refused(rules, command, 0, 512, 513, Errno.EINVAL, "T-07")
        self.assert_refused(rules, Cmd.BLOCK_STATUS, 0, 256, 512, Errno.EINVAL, "T-07")

    def test_aligned_with_min_block_one(self) -> None:
        """With a minimum block of 1 any offset and length are aligned."""
        rules = make_rules(min_block=1)
        self.assert_accepted(rules, Cmd.READ, 0, 1, 3)
        self.assert_accepted(rules, Cmd.WRITE, 0, 12345, 7)

    def test_unaligned_tail_T07(self) -> None:
        """
        T-07: the tail of an export whose size is not a multiple of the
        minimum block may be reached from an aligned offset, and only so.
        """
        size = MIB + 100
        rules = make_rules(size=size, min_block=512, max_payload=2 * MIB)
        for command in (Cmd.READ, Cmd.WRITE, Cmd.TRIM, Cmd.WRITE_ZEROES, Cmd.BLOCK_STATUS):
            self.assert_accepted(rules, command, 0, MIB, 100)
            self.assert_accepted(rules, command, 0, MIB - 512, 612)
            self.assert_accepted(rules, command, 0, 0, size)
            # Unaligned offset, even though it ends at the end.
            self.assert_refused(rules, command, 0, MIB + 1, 99, Errno.EINVAL, "T-07")
            # Aligned offset, unaligned length that stops short of the end.
            self.assert_refused(rules, command, 0, MIB, 50, Errno.EINVAL, "T-07")

    def test_block_status_zero_length(self) -> None:
        """BLOCK_STATUS of zero bytes gets EINVAL; other zero-length requests pass (T-09)."""
        rules = make_rules()
        self.assert_refused(rules, Cmd.BLOCK_STATUS, 0, 0, 0, Errno.EINVAL)
        for command in (Cmd.READ, Cmd.WRITE, Cmd.TRIM, Cmd.WRITE_ZEROES, Cmd.CACHE):
            self.assert_accepted(rules, command, 0, 512, 0)

    def test_over_32_bits_needs_extended(self) -> None:
        """A length over 2**32 - 1 is refused without extended headers, allowed with them."""
        size = 1 << 34
        compact = make_rules(size=size)
        extended = make_rules(size=size, extended=True)
        for command in (Cmd.TRIM, Cmd.WRITE_ZEROES, Cmd.CACHE, Cmd.BLOCK_STATUS):
            self.assert_refused(compact, command, 0, 0, 1 << 32, Errno.EINVAL, "extended")
            self.assert_accepted(compact, command, 0, 0, (1 << 32) - 512)
            self.assert_accepted(extended, command, 0, 0, 1 << 32)
        huge = make_rules(size=size, max_payload=1 << 33)
        self.assert_refused(huge, Cmd.READ, 0, 0, 1 << 32, Errno.EINVAL, "extended")
        self.assert_accepted(
            make_rules(size=size, max_payload=1 << 33, extended=True), Cmd.READ, 0, 0, 1 << 32
        )

    @given(
        st.one_of(st.sampled_from([int(c) for c in Cmd]), st.integers(0, w.MAX_U16)),
        st.one_of(st.sampled_from([int(f) for f in CmdFlags] + [0]), st.integers(0, w.MAX_U16)),
        st.one_of(st.integers(0, 2 * MIB), st.integers(0, w.MAX_U64)),
        st.one_of(st.integers(0, 2 * MIB), st.integers(0, w.MAX_U64)),
        st.integers(0, w.MAX_U16),
        st.sampled_from([1, 512, 4096, 65536]),
        st.one_of(st.just(MIB), st.just(MIB + 100), st.integers(0, w.MAX_U64)),
        st.booleans(),
        st.booleans(),
    )
    def test_never_raises(
        self,
        command: int,
        flags: int,
        offset: int,
        length: int,
        tx_flags: int,
        min_block: int,
        size: int,
        block_status: bool,
        extended: bool,
    ) -> None:
        """
        Any request against any rules gives None or an (errno, reason) pair
        with EINVAL, EPERM or ENOSPC; an accepted request (other than DISC
        and FLUSH) lies inside the export and carries only allowed flags.
        """
        rules = TransmissionRules.make(size, tx_flags, min_block, 64 * KIB, block_status, extended)
        result = check_request(rules, command, flags, offset, length)
        if result is None:
            if command not in (Cmd.DISC, Cmd.FLUSH):
                self.assertLessEqual(offset + length, size)
                self.assertEqual(flags & ~rules.allowed[command], 0)
            return
        errno, reason = result
        self.assertIsInstance(errno, Errno)
        self.assertIn(errno, (Errno.EINVAL, Errno.EPERM, Errno.ENOSPC))
        self.assertIsInstance(reason, str)
        self.assertTrue(reason)


class _Quads(SansIOConnection[bytes]):
    """
    A core whose messages are four bytes: C{b"Dnnn"} discards the next
    I{nnn} bytes, C{b"BAD!"} is a protocol violation, anything else is
    returned as the event.
    """

    def __init__(self) -> None:
        super().__init__(Phase.TRANSMISSION)
        self.steps = 0

    def _step(self) -> bytes | _NeedData | None:
        self.steps += 1
        raw = self._take(4)
        if raw is NEED_DATA:
            return NEED_DATA
        if raw == b"BAD!":
            raise ProtocolViolation("a bad message")
        if raw.startswith(b"D"):
            self._discard = int(raw[1:])
            return None
        return raw


def events(conn: _Quads) -> list[bytes]:
    """Every event the buffered bytes hold, up to NEED_DATA."""
    found = []
    while (event := conn.next_event()) is not NEED_DATA:
        assert isinstance(event, bytes)
        found.append(event)
    return found


class SansIOConnectionTests(SynchronousTestCase):
    """The receive/next-event shell of L{SansIOConnection}."""

    def test_need_data(self) -> None:
        """NEED_DATA until a whole message has arrived, then the message."""
        conn = _Quads()
        self.assertIs(conn.next_event(), NEED_DATA)
        conn.receive_data(b"ab")
        self.assertIs(conn.next_event(), NEED_DATA)
        conn.receive_data(b"c")
        self.assertIs(conn.next_event(), NEED_DATA)
        conn.receive_data(b"d")
        self.assertEqual(conn.next_event(), b"abcd")
        self.assertIs(conn.next_event(), NEED_DATA)

    def test_one_event_at_a_time(self) -> None:
        """Several buffered messages come out one per call, the rest kept."""
        conn = _Quads()
        conn.receive_data(b"abcdefghij")
        self.assertEqual(conn.next_event(), b"abcd")
        self.assertEqual(conn.next_event(), b"efgh")
        self.assertIs(conn.next_event(), NEED_DATA)
        conn.receive_data(b"kl")
        self.assertEqual(conn.next_event(), b"ijkl")

    def test_receive_parses_nothing(self) -> None:
        """receive_data only buffers; parsing waits for next_event."""
        conn = _Quads()
        conn.receive_data(b"BAD!")
        self.assertEqual(conn.steps, 0)
        self.assertIs(conn.phase, Phase.TRANSMISSION)

    def test_discard_across_receives(self) -> None:
        """Bytes to discard are skipped as they arrive, over several receive_data calls."""
        conn = _Quads()
        conn.receive_data(b"D010xxx")
        self.assertIs(conn.next_event(), NEED_DATA)
        self.assertEqual(conn._discard, 7)
        conn.receive_data(b"xxxx")
        self.assertIs(conn.next_event(), NEED_DATA)
        self.assertEqual(conn._discard, 3)
        conn.receive_data(b"xx")
        self.assertIs(conn.next_event(), NEED_DATA)
        steps = conn.steps
        conn.receive_data(b"xBAD")
        self.assertIs(conn.next_event(), NEED_DATA)
        self.assertEqual(conn._discard, 0)
        conn.receive_data(b"!")
        # The discarded bytes never reached _step: "BAD!" is read whole, after them.
        self.assertRaises(ProtocolViolation, conn.next_event)
        self.assertGreater(conn.steps, steps)

    def test_discard_then_event(self) -> None:
        """A step that returns None after asking for a discard is followed by the next message."""
        conn = _Quads()
        conn.receive_data(b"D002xxabcdD000efgh")
        self.assertEqual(events(conn), [b"abcd", b"efgh"])

    def test_violation_closes(self) -> None:
        """A ProtocolViolation from _step closes the connection and propagates."""
        conn = _Quads()
        conn.receive_data(b"abcdBAD!efgh")
        self.assertEqual(conn.next_event(), b"abcd")
        self.assertRaises(ProtocolViolation, conn.next_event)
        self.assertIs(conn.phase, Phase.CLOSED)
        # Nothing after the violation is ever parsed.
        steps = conn.steps
        self.assertIs(conn.next_event(), NEED_DATA)
        self.assertEqual(conn.steps, steps)

    def test_receive_after_closed_ignored_C06(self) -> None:
        """C-06: bytes received once the connection is closed are dropped, never acted on."""
        conn = _Quads()
        conn.receive_data(b"ab")
        conn.phase = Phase.CLOSED
        conn.receive_data(b"cdefgh")
        self.assertEqual(len(conn._buffer), 2)
        self.assertIs(conn.next_event(), NEED_DATA)
        self.assertEqual(conn.steps, 0)

    def test_receive_after_violation_ignored(self) -> None:
        """After a violation, more bytes are not even buffered."""
        conn = _Quads()
        conn.receive_data(b"BAD!")
        self.assertRaises(ProtocolViolation, conn.next_event)
        conn.receive_data(b"abcd")
        self.assertEqual(len(conn._buffer), 0)
        self.assertIs(conn.next_event(), NEED_DATA)

    def test_data_to_send(self) -> None:
        """Queued bytes are handed over once, in order."""
        conn = _Quads()
        self.assertEqual(conn.data_to_send(), [])
        conn._send(b"one")
        conn._send(b"two")
        self.assertEqual(conn.data_to_send(), [b"one", b"two"])
        self.assertEqual(conn.data_to_send(), [])

    def test_negotiated_properties(self) -> None:
        """The convenience properties read the negotiated record."""
        conn = _Quads()
        self.assertEqual(
            (conn.structured_replies, conn.extended_headers, conn.fixed_newstyle, conn.no_zeroes),
            (False, False, False, False),
        )
        conn.negotiated = Negotiated(True, True, True, True)
        self.assertEqual(
            (conn.structured_replies, conn.extended_headers, conn.fixed_newstyle, conn.no_zeroes),
            (True, True, True, True),
        )

    @given(
        st.lists(
            st.one_of(
                st.binary(min_size=4, max_size=4).filter(
                    lambda m: not m.startswith(b"D") and m != b"BAD!"
                ),
                st.binary(max_size=30).map(lambda d: b"D%03d" % len(d) + d),
            ),
            max_size=10,
        ),
        st.lists(st.integers(1, 10), max_size=20),
    )
    def test_chunking_irrelevant(self, messages: list[bytes], cuts: list[int]) -> None:
        """However the stream is split, the same events come out, discards skipped."""
        stream = b"".join(messages)
        expected = [m for m in messages if not m.startswith(b"D")]
        conn = _Quads()
        found: list[bytes] = []
        position = 0
        for cut in [*cuts, len(stream)]:
            conn.receive_data(stream[position : position + cut])
            position += cut
            found += events(conn)
        self.assertEqual(found, expected)
