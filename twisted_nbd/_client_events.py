# -*- test-case-name: tests.test_client -*-
"""
What the client's sans-I/O core (L{twisted_nbd._client_connection})
produces: the outcome of the handshake, replies, and the events that carry
them. L{twisted_nbd.client} hands these values to applications.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, NamedTuple, Union

from twisted_nbd import _wire as w
from twisted_nbd.errors import NBDError
from twisted_nbd.interfaces import Extent

__all__ = [
    "AbortAcknowledged",
    "BlockSize",
    "ClientEvent",
    "TLSStarting",
    "ExportInfo",
    "ExportsListed",
    "HandshakeComplete",
    "HandshakeRefused",
    "NBDHandshakeError",
    "Reply",
    "ReplyReceived",
]


class NBDHandshakeError(Exception):
    """
    The server refused the handshake: an option that cannot be done without
    got an error reply (the export does not exist, the server is shutting
    down, ...).

    @ivar option: the option number that was refused.
    @ivar reply: the error reply type (a L{Rep} or an unknown int).
    @ivar message: the server's message, if it sent one.
    """

    def __init__(self, option: int, reply: int, message: str = "") -> None:
        super().__init__(option, reply, message)
        self.option = option
        self.reply = reply
        self.message = message

    def __str__(self) -> str:
        text = f"{w.option_name(self.option)} failed with {w.reply_name(self.reply)}"
        return f"{text}: {self.message}" if self.message else text


class BlockSize(NamedTuple):
    """The server's block size constraints (spec section 5)."""

    minimum: int
    preferred: int
    maximum: int


@dataclass(frozen=True, slots=True)
class ExportInfo:
    """
    What the handshake established.

    @ivar name: the export's canonical name (NBD_INFO_NAME), or the name the
        client asked for.
    @ivar size: the export's size in bytes.
    @ivar transmission_flags: the L{TxFlags} the server sent.
    @ivar block_size: the server's constraints, or the defaults.
    @ivar description: NBD_INFO_DESCRIPTION, or C{""}.
    @ivar structured_replies: structured replies are on (also when extended
        headers are).
    @ivar extended_headers: 32-byte requests and replies are on.
    @ivar meta_contexts: selected meta context names and their ids.
    """

    name: str
    size: int
    transmission_flags: int
    block_size: BlockSize
    description: str
    structured_replies: bool
    extended_headers: bool
    meta_contexts: Mapping[str, int]


@dataclass(frozen=True, slots=True)
class Reply:
    """
    The complete reply to one request.

    @ivar cookie: the request's cookie.
    @ivar command: the request's command number.
    @ivar error: the first error the server reported, or C{None} on success.
    @ivar data: a successful READ's data (holes filled with zeroes), else
        C{None}.
    @ivar extents: a successful BLOCK_STATUS's extents, by context id.
    """

    cookie: int
    command: int
    error: NBDError | None = None
    data: bytes | None = field(default=None, repr=False)
    extents: Mapping[int, tuple[Extent, ...]] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class HandshakeComplete:
    """Transmission has started on the export C{info} describes."""

    info: ExportInfo


@dataclass(frozen=True, slots=True)
class ExportsListed:
    """
    NBD_OPT_LIST finished with these C{(name, description)} pairs;
    NBD_OPT_ABORT is queued.
    """

    exports: tuple[tuple[str, str], ...]


@dataclass(frozen=True, slots=True)
class HandshakeRefused:
    """The handshake cannot go on; NBD_OPT_ABORT is queued."""

    error: NBDHandshakeError


@dataclass(frozen=True, slots=True)
class AbortAcknowledged:
    """The server answered NBD_OPT_ABORT: close the connection."""


@dataclass(frozen=True, slots=True)
class ReplyReceived:
    """The last chunk of a reply arrived (or its simple reply)."""

    reply: Reply


@dataclass(frozen=True)
class TLSStarting:
    """
    The server accepted NBD_OPT_STARTTLS: start the TLS handshake now, then
    call L{ClientConnection.tls_started}; every byte from here on is TLS.
    """


ClientEvent = Union[
    HandshakeComplete,
    ExportsListed,
    HandshakeRefused,
    AbortAcknowledged,
    ReplyReceived,
    TLSStarting,
]
