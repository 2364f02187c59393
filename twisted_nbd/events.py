# -*- test-case-name: tests.test_connection -*-
"""
The events the server's sans-I/O core (L{twisted_nbd._connection}) emits:
the handshake's outcome, refusals, and the requests a backend must carry
out. Observers (L{twisted_nbd.observers}) receive the request events too, so
they are public: every request has C{command} (an NBD_CMD_* number),
C{cookie}, C{offset} and C{length}.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar, Union

from twisted_nbd._wire import Cmd, Errno, Rep

if TYPE_CHECKING:
    from twisted_nbd.exports import Export

__all__ = [
    "Aborted",
    "BlockStatusRequest",
    "CacheRequest",
    "DisconnectRequest",
    "Event",
    "ExportChosen",
    "FlushRequest",
    "OptionRejected",
    "ReadRequest",
    "Request",
    "RequestRejected",
    "StartTLS",
    "TrimRequest",
    "WriteRequest",
    "WriteZeroesRequest",
]


@dataclass(slots=True)
class ExportChosen:
    """The handshake is over: transmission on C{export} starts."""

    export: Export


@dataclass(slots=True)
class StartTLS:
    """
    The client sent NBD_OPT_STARTTLS and its ACK is queued: send it, then
    start the TLS handshake; every byte after the ACK is TLS (S-06).
    """


@dataclass(slots=True)
class Aborted:
    """The client sent NBD_OPT_ABORT; its ACK is queued. Close after sending it."""


@dataclass(slots=True)
class OptionRejected:
    """An option got an error reply (already queued); C{reason} says why."""

    option: int
    reply: Rep
    reason: str


@dataclass(slots=True)
class RequestRejected:
    """A request got an error reply (already queued); C{reason} says why."""

    cookie: int
    command: int
    errno: Errno
    reason: str
    offset: int = 0
    length: int = 0


@dataclass(slots=True)
class DisconnectRequest:
    """NBD_CMD_DISC: finish what is in flight, then close (C-06)."""


@dataclass(slots=True)
class ReadRequest:
    """NBD_CMD_READ of C{length} bytes at C{offset}."""

    command: ClassVar[int] = int(Cmd.READ)
    cookie: int
    offset: int
    length: int
    flags: int


@dataclass(slots=True)
class WriteRequest:
    """NBD_CMD_WRITE of C{data} at C{offset}."""

    command: ClassVar[int] = int(Cmd.WRITE)
    cookie: int
    offset: int
    data: bytes | bytearray | memoryview = field(repr=False)
    fua: bool

    @property
    def length(self) -> int:
        return len(self.data)


@dataclass(slots=True)
class FlushRequest:
    """NBD_CMD_FLUSH."""

    command: ClassVar[int] = int(Cmd.FLUSH)
    cookie: int
    offset: ClassVar[int] = 0
    length: ClassVar[int] = 0


@dataclass(slots=True)
class TrimRequest:
    """NBD_CMD_TRIM."""

    command: ClassVar[int] = int(Cmd.TRIM)
    cookie: int
    offset: int
    length: int
    fua: bool


@dataclass(slots=True)
class WriteZeroesRequest:
    """NBD_CMD_WRITE_ZEROES."""

    command: ClassVar[int] = int(Cmd.WRITE_ZEROES)
    cookie: int
    offset: int
    length: int
    fua: bool
    may_trim: bool
    fast: bool


@dataclass(slots=True)
class CacheRequest:
    """NBD_CMD_CACHE."""

    command: ClassVar[int] = int(Cmd.CACHE)
    cookie: int
    offset: int
    length: int


@dataclass(slots=True)
class BlockStatusRequest:
    """NBD_CMD_BLOCK_STATUS for the selected C{base:allocation} context."""

    command: ClassVar[int] = int(Cmd.BLOCK_STATUS)
    cookie: int
    offset: int
    length: int
    req_one: bool


Request = Union[
    ReadRequest,
    WriteRequest,
    FlushRequest,
    TrimRequest,
    WriteZeroesRequest,
    CacheRequest,
    BlockStatusRequest,
]

Event = Union[
    ExportChosen,
    StartTLS,
    Aborted,
    OptionRejected,
    RequestRejected,
    DisconnectRequest,
    ReadRequest,
    WriteRequest,
    FlushRequest,
    TrimRequest,
    WriteZeroesRequest,
    CacheRequest,
    BlockStatusRequest,
]
