# -*- test-case-name: tests.test_kernel -*-
"""
What the sans-I/O server and client cores share: the receive/next-event
shell, the phases of a connection, the record of what the handshake
negotiated, and the transmission rules both sides apply to a request.

  - L{SansIOConnection} is the shell: bytes in with C{receive_data}, one
    event at a time out of C{next_event}, bytes to send from
    C{data_to_send}. A subclass supplies C{_step}, which parses one
    message from C{self._buffer}.
  - L{Negotiated} is everything the option haggling agreed, in one frozen
    record: STARTTLS, which must forget all of it (S- rules), is one
    assignment.
  - L{TransmissionRules} and L{check_request} are the rules of section 2.7
    (flags per command, bounds, alignment, payload limits) on plain ints
    and precomputed tables: the server refuses what they refuse, and the
    client will not send it.

Rule ids (H-, T-, C-, S-) refer to the protocol digest the tests cite.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Generic, Mapping, TypeVar

from twisted_nbd import _wire as w
from twisted_nbd._buffer import NEED_DATA, ReceiveBuffer, _NeedData
from twisted_nbd._wire import Cmd, CmdFlags, Errno, TxFlags
from twisted_nbd.errors import ProtocolViolation

__all__ = [
    "NEED_DATA",
    "Negotiated",
    "Phase",
    "SansIOConnection",
    "TransmissionRules",
    "check_request",
]

_E = TypeVar("_E")


class Phase(enum.Enum):
    """Where a connection is; each side passes through some of these."""

    #: Client: waiting for the server's greeting.
    GREETING = "greeting"
    #: Server: waiting for the client's flags.
    CLIENT_FLAGS = "client flags"
    OPTIONS = "option haggling"
    #: Client: waiting for the reply to NBD_OPT_EXPORT_NAME.
    EXPORT_NAME = "waiting for the NBD_OPT_EXPORT_NAME reply"
    #: Client: waiting for the reply to NBD_OPT_ABORT.
    ABORTING = "waiting for the NBD_OPT_ABORT reply"
    #: Client: STARTTLS was accepted; waiting for the caller to start TLS.
    STARTING_TLS = "starting TLS"
    TRANSMISSION = "transmission"
    CLOSED = "closed"


@dataclass(frozen=True, slots=True)
class Negotiated:
    """
    What the handshake has agreed so far, replaced whole at every change.

    @ivar fixed_newstyle: the client set C{NBD_FLAG_C_FIXED_NEWSTYLE}.
    @ivar no_zeroes: the client set C{NBD_FLAG_C_NO_ZEROES}.
    @ivar structured_replies: structured replies are on (also when extended
        headers are).
    @ivar extended_headers: 32-byte requests and replies are on.
    @ivar meta_export: the export name the last successful
        SET_META_CONTEXT was for, or C{None}.
    @ivar meta_contexts: the meta contexts it selected, by name, with their
        ids.
    @ivar tls: the connection has switched to TLS.
    """

    fixed_newstyle: bool = False
    no_zeroes: bool = False
    structured_replies: bool = False
    extended_headers: bool = False
    meta_export: str | None = None
    meta_contexts: Mapping[str, int] = field(default_factory=dict)
    tls: bool = False

    def after_starttls(self) -> Negotiated:
        """
        The record once TLS is up: the client flags stay (they belong to the
        greeting, not to option haggling), everything negotiated by options
        before STARTTLS is forgotten (S-06).
        """
        return Negotiated(fixed_newstyle=self.fixed_newstyle, no_zeroes=self.no_zeroes, tls=True)


# Plain-int copies of the constants the per-request path uses.
_READ, _WRITE, _DISC, _FLUSH = int(Cmd.READ), int(Cmd.WRITE), int(Cmd.DISC), int(Cmd.FLUSH)
_TRIM, _CACHE, _WRITE_ZEROES = int(Cmd.TRIM), int(Cmd.CACHE), int(Cmd.WRITE_ZEROES)
_BLOCK_STATUS = int(Cmd.BLOCK_STATUS)
_FUA, _DF, _FAST_ZERO = int(CmdFlags.FUA), int(CmdFlags.DF), int(CmdFlags.FAST_ZERO)
_PAYLOAD_LEN = int(CmdFlags.PAYLOAD_LEN)
_READ_ONLY = int(TxFlags.READ_ONLY)
_WRITING = frozenset({_WRITE, _TRIM, _WRITE_ZEROES})
_EINVAL, _ENOSPC, _EPERM = Errno.EINVAL, Errno.ENOSPC, Errno.EPERM


@dataclass(frozen=True, slots=True)
class TransmissionRules:
    """
    What a connection in transmission may send, worked out once from what
    the handshake agreed so that L{check_request} runs on plain ints.

    @ivar size: the export's size.
    @ivar tx_flags: the transmission flags the server advertised.
    @ivar allowed: for each command the connection may send, the command
        flags it may carry (C{PAYLOAD_LEN} included with extended headers).
    @ivar mask: the minimum block size minus one.
    @ivar max_payload: the largest READ or WRITE.
    @ivar block_status: a meta context is selected for this export.
    @ivar extended: extended headers are on.
    """

    size: int
    tx_flags: int
    allowed: Mapping[int, int]
    mask: int
    max_payload: int
    block_status: bool
    extended: bool

    @classmethod
    def make(
        cls,
        size: int,
        tx_flags: int,
        min_block: int,
        max_payload: int,
        block_status: bool,
        extended: bool,
    ) -> TransmissionRules:
        """
        Work the tables out from the transmission flags: a command is
        allowed when the flags expose it (READ and CACHE always, BLOCK_STATUS
        always so that using it unselected gets its own reason), and a
        command flag when the spec defines it for the command and its
        feature is advertised (FUA, DF, FAST_ZERO).
        """
        tx = int(tx_flags)
        # Plain ints: IntFlag's ~ only complements within the members it knows.
        refused = 0
        for flag, feature in (
            (_FUA, TxFlags.SEND_FUA),
            (_DF, TxFlags.SEND_DF),
            (_FAST_ZERO, TxFlags.SEND_FAST_ZERO),
        ):
            if not tx & feature:
                refused |= flag
        extra = _PAYLOAD_LEN if extended else 0
        exposed = {
            _READ: True,
            _WRITE: not tx & _READ_ONLY,
            _FLUSH: bool(tx & TxFlags.SEND_FLUSH),
            # Nothing writes to a read-only export, whatever else is advertised (T-08).
            _TRIM: bool(tx & TxFlags.SEND_TRIM) and not tx & _READ_ONLY,
            _CACHE: True,
            _WRITE_ZEROES: bool(tx & TxFlags.SEND_WRITE_ZEROES) and not tx & _READ_ONLY,
            _BLOCK_STATUS: True,
        }
        allowed = {
            int(command): (int(flags) & ~refused) | extra
            for command, flags in w.COMMAND_FLAGS.items()
            if exposed[int(command)]
        }
        return cls(size, tx, allowed, min_block - 1, max_payload, block_status, extended)


def check_request(
    rules: TransmissionRules, command: int, flags: int, offset: int, length: int
) -> tuple[Errno, str] | None:
    """
    Check one request against the rules of section 2.7 and the export.

    @return: C{None} if a server must carry it out, else the errno it
        answers with and the reason, which names the rule broken.
    """
    if command == _DISC:
        # DISC gets no reply, so there is nothing to refuse: just stop.
        return None
    allowed = rules.allowed.get(command)
    if allowed is None:
        return unsupported(rules, command)
    if flags & ~allowed:
        return _EINVAL, f"flags {flags:#x} are not valid for {w.command_name(command)} (T-04)"
    if command == _FLUSH:
        if offset or length:
            return _EINVAL, "FLUSH must have zero offset and length"
        return None
    if command == _BLOCK_STATUS and not rules.block_status:
        return _EINVAL, "BLOCK_STATUS without a selected meta context (T-17)"
    size = rules.size
    if offset > size or length > size - offset:
        return (
            _ENOSPC if command in (_WRITE, _WRITE_ZEROES) else _EINVAL,
            f"{w.command_name(command)} of {length} bytes at {offset} is beyond the "
            f"export size {size} (T-06)",
        )
    if length > rules.max_payload and (command == _READ or command == _WRITE):
        return (
            _EINVAL,
            f"{w.command_name(command)} of {length} bytes is over the maximum payload "
            f"{rules.max_payload} (T-10)",
        )
    mask = rules.mask
    if (offset & mask or length & mask) and not (
        # The tail of an export whose size is not a multiple of min_block.
        offset + length == size and not offset & mask
    ):
        return (
            _EINVAL,
            f"{w.command_name(command)} at {offset} of {length} bytes is not aligned to the "
            f"minimum block size {mask + 1} (T-07)",
        )
    if command == _BLOCK_STATUS and length == 0:
        return _EINVAL, "BLOCK_STATUS of zero bytes"
    if not rules.extended and length > w.MAX_U32:
        return _EINVAL, f"{w.command_name(command)} of {length} bytes needs extended headers"
    return None


def unsupported(rules: TransmissionRules, command: int) -> tuple[Errno, str]:
    """Why a command this connection may not use is refused (T-03, T-08)."""
    if command not in w.KNOWN_COMMANDS:
        return _EINVAL, f"unknown command {command} (T-03)"
    name = w.command_name(command)
    if command in _WRITING and rules.tx_flags & _READ_ONLY:
        return _EPERM, f"{name} on a read-only export (T-08)"
    return _EINVAL, f"{name} is not supported on this export (T-03)"


class SansIOConnection(Generic[_E]):
    """
    The shell of a sans-I/O NBD core: a receive buffer, an outbox, the
    phase, and a parse loop that yields one event at a time.

    Subclasses implement L{_step}, which parses at most one message from
    C{self._buffer} and returns an event, L{NEED_DATA}, or C{None} to go
    round again; it queues bytes to send with L{_send}, asks for payload
    bytes to be thrown away unseen with C{self._discard}, and raises
    L{ProtocolViolation} when the peer broke the protocol.

    @ivar phase: the current L{Phase}.
    @ivar negotiated: the L{Negotiated} record.
    """

    def __init__(self, phase: Phase) -> None:
        self._buffer = ReceiveBuffer()
        self._outbox: list[bytes] = []
        self.phase = phase
        self.negotiated = Negotiated()
        # Bytes still to be thrown away as they arrive (T-05, H-06).
        self._discard = 0

    # ------------------------------------------------------------ I/O API

    def receive_data(self, data: bytes) -> None:
        """Buffer bytes received from the peer; nothing is parsed yet."""
        if self.phase is not Phase.CLOSED:
            # After DISC or ABORT anything more is the peer's error: never act on it (C-06).
            self._buffer.append(data)

    def buffered(self) -> int:
        """How many received bytes are buffered, not yet parsed."""
        return len(self._buffer)

    def data_to_send(self) -> list[bytes]:
        """Take the bytes queued for the peer."""
        out, self._outbox = self._outbox, []
        return out

    def has_data_to_send(self) -> bool:
        """Whether L{data_to_send} would return anything."""
        return bool(self._outbox)

    def next_event(self) -> _E | _NeedData:
        """
        Parse what is buffered up to the next event.

        @return: the next event, or L{NEED_DATA} when the buffered bytes do
            not hold one.
        @raise ProtocolViolation: the peer broke the protocol so that the
            connection must be dropped (the phase is then C{CLOSED}).
        """
        try:
            while self.phase is not Phase.CLOSED:
                if self._discard:
                    self._discard -= self._buffer.skip(self._discard)
                    if self._discard:
                        return NEED_DATA
                    continue
                event = self._step()
                if event is not None:
                    return event
        except ProtocolViolation:
            self.phase = Phase.CLOSED
            raise
        return NEED_DATA

    @property
    def structured_replies(self) -> bool:
        """Structured replies are on (also when extended headers are)."""
        return self.negotiated.structured_replies

    @property
    def extended_headers(self) -> bool:
        """32-byte requests and replies are on."""
        return self.negotiated.extended_headers

    @property
    def fixed_newstyle(self) -> bool:
        """The client and server agreed on the fixed newstyle handshake."""
        return self.negotiated.fixed_newstyle

    @property
    def no_zeroes(self) -> bool:
        """The 124 bytes of padding after an EXPORT_NAME reply are left out."""
        return self.negotiated.no_zeroes

    # ------------------------------------------------------------ for subclasses

    def _send(self, data: bytes) -> None:
        self._outbox.append(data)

    def _take(self, count: int) -> bytes | _NeedData:
        """The next C{count} bytes, or L{NEED_DATA} if they have not all arrived."""
        if len(self._buffer) < count:
            return NEED_DATA
        return self._buffer.take(count)

    def _step(self) -> _E | _NeedData | None:
        raise NotImplementedError
