"""
Fuzz targets for the sans-I/O cores (issue 10, point 2): one function per
side that takes arbitrary bytes and must end only in the allowed ways.

L{fuzz_server} and L{fuzz_client} read the first byte as the phase to
start in (see L{SERVER_SETUPS} and L{CLIENT_SETUPS}: from the first byte of
the connection, in option haggling, after STARTTLS, in transmission with
simple, structured or extended replies), the second as how to cut the
rest into pieces, and feed the rest as the peer's bytes. A server's request
events are answered (READ with data, holes or an error, BLOCK_STATUS with
extents, the others with success or an error), so the reply encoders run
on whatever fields got through; a client has requests of every kind in
flight, so the fuzzed bytes can answer them.

The allowed outcomes, on both sides:

  - C{next_event()} returns an event or C{NEED_DATA};
  - C{next_event()} raises L{ProtocolViolation}, after which the
    connection's phase is C{CLOSED} and the harness stops (the glue drops
    the connection);
  - the server's C{reply_*} methods and the client's C{tls_started()}
    (after a C{TLSStarting} event) return without raising.

Anything else (any other exception, a phase other than C{CLOSED} after a
violation, more events than bytes fed) is a finding: the target raises.
C{python3 bench/fuzz.py} runs them under atheris (coverage-guided);
C{tests/test_fuzz.py} runs them under Hypothesis with a bounded budget and
replays the inputs in C{tests/fuzz_corpus/}.
"""

from __future__ import annotations

import gzip
import os
import struct
from typing import Callable, cast

from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import StringTransport
from twisted.logger import ILogObserver, Logger
from twisted.python.failure import Failure

from tests import builders as b
from twisted_nbd import _wire as w
from twisted_nbd._client_connection import (
    ClientConfiguration,
    ClientConnection,
    TLSStarting,
)
from twisted_nbd._connection import NEED_DATA, ServerConfiguration, ServerConnection
from twisted_nbd._kernel import Phase
from twisted_nbd._wire import Cmd, CmdFlags, Opt
from twisted_nbd.backends.memory import MemoryBlockDevice
from twisted_nbd.errors import ProtocolViolation
from twisted_nbd.events import (
    BlockStatusRequest,
    ReadRequest,
    StartTLS,
    WriteRequest,
)
from twisted_nbd.exports import Export, ExportRegistry
from twisted_nbd.interfaces import Capabilities, Extent
from twisted_nbd.protocol import NBDServerFactory
from twisted_nbd.testing import ControllableBlockDevice
from twisted_nbd.tls import TLSMode

__all__ = [
    "CLIENT_SETUPS",
    "SERVER_SETUPS",
    "fuzz_any",
    "fuzz_client",
    "fuzz_protocol",
    "fuzz_server",
]

SIZE = 1 << 20

_META = b.option(Opt.SET_META_CONTEXT, b.meta_data("disk", "base:allocation"))


def _registry(min_block: int = 1) -> ExportRegistry:
    caps = Capabilities(can_fast_zero=True, can_cache=True, can_extents=True, min_block=min_block)
    return ExportRegistry.of(
        [
            Export("disk", ControllableBlockDevice(SIZE, caps), "the disk"),
            Export("ro", ControllableBlockDevice(4096, caps), "", read_only=True),
        ],
        default_name="disk",
    )


#: Server starting points: (name, TLS mode, minimum block, client bytes
#: that bring the connection there).
SERVER_SETUPS: list[tuple[str, TLSMode, int, bytes]] = [
    ("greeting", "off", 1, b""),
    ("options", "off", 1, b.client_flags()),
    ("options-tls-on", "on", 1, b.client_flags()),
    ("after-starttls", "require", 1, b.client_flags() + b.option(Opt.STARTTLS)),
    ("simple", "off", 1, b.client_flags() + b.go("disk")),
    ("simple-aligned", "off", 512, b.client_flags() + b.go("disk")),
    (
        "structured",
        "off",
        1,
        b.client_flags() + b.option(Opt.STRUCTURED_REPLY) + _META + b.go("disk"),
    ),
    (
        "extended",
        "off",
        1,
        b.client_flags() + b.option(Opt.EXTENDED_HEADERS) + _META + b.go("disk"),
    ),
    (
        "extended-after-tls",
        "require",
        512,
        b.client_flags() + b.option(Opt.STARTTLS),
    ),
    ("export-name", "off", 1, b.client_flags(1) + b.option(Opt.EXPORT_NAME, b"disk")),
]

#: What the "extended-after-tls" setup sends once TLS is up.
_AFTER_TLS = b.option(Opt.EXTENDED_HEADERS) + _META + b.go("disk")

_EXTENTS = [Extent(4096, 3), Extent(1 << 40, 0), Extent(0, 1), Extent(512, 2)]


class FindingError(AssertionError):
    """The connection broke its contract."""


def _answer_server(conn: ServerConnection, event: object, choice: int) -> list[bytes]:
    """Answer a request event as a backend might, by C{choice}; the reply's bytes."""
    if isinstance(event, StartTLS):
        # The glue switches to TLS; what follows is as if decrypted.
        conn.tls_established("CN=fuzz" if choice & 1 else None)
        return []
    if not hasattr(event, "cookie") or not hasattr(event, "offset"):
        return []
    if choice % 5 == 4:
        return conn.reply_error(event, int(w.Errno.EIO), "fuzz" * (choice % 3))  # type: ignore[arg-type]
    if isinstance(event, ReadRequest):
        length = event.length
        if length > 4 << 20:
            return conn.reply_error(event, int(w.Errno.EINVAL), "too long")
        if choice & 2 and conn._structured and length > 1:
            half = length // 2
            return conn.reply_read_sparse(
                event, [(event.offset, bytes(half)), (event.offset + half, length - half)]
            )
        return conn.reply_read(event, b"\xa5" * length)
    if isinstance(event, BlockStatusRequest):
        return conn.reply_block_status(
            event, _EXTENTS[choice % 4 :] if choice & 8 else _EXTENTS[:1]
        )
    if isinstance(event, WriteRequest) and len(event.data) != event.length:
        raise FindingError("a WRITE whose payload is not its length")
    return conn.reply_ok(event)  # type: ignore[arg-type]


def _pieces(data: bytes, how: int) -> list[bytes]:
    """Cut C{data} as C{how} says: whole, or in pieces of 1 to 64 bytes."""
    if how == 0:
        return [data]
    size = how % 64 + 1
    return [data[i : i + size] for i in range(0, len(data), size)] or [b""]


def _events(conn: ServerConnection | ClientConnection, budget: list[int]) -> list[object]:
    """
    Every event the buffered bytes give, up to C{NEED_DATA}.

    @raise ProtocolViolation: passed on, after checking the phase.
    @raise FindingError: more events than the bytes fed could explain.
    """
    events: list[object] = []
    while True:
        budget[0] -= 1
        if budget[0] < 0:
            raise FindingError("next_event() keeps returning events")
        try:
            event = conn.next_event()
        except ProtocolViolation:
            if conn.phase is not Phase.CLOSED:
                raise FindingError(f"a violation left the connection in {conn.phase}") from None
            raise
        if event is NEED_DATA:
            return events
        events.append(event)


def fuzz_server(data: bytes) -> None:
    """
    Feed C{data} (after its two control bytes) to a server connection.

    @raise FindingError: or any exception other than L{ProtocolViolation}, which
        is caught: the contract was broken.
    """
    if len(data) < 2:
        return
    name, tls, min_block, setup = SERVER_SETUPS[data[0] % len(SERVER_SETUPS)]
    conn = ServerConnection(_registry(min_block), ServerConfiguration(tls=tls))
    conn.data_to_send()
    choice = data[1]
    budget = [10 * len(data) + 100]
    try:
        conn.receive_data(setup)
        for event in _events(conn, budget):
            _answer_server(conn, event, 0)
        if name == "extended-after-tls":
            conn.receive_data(_AFTER_TLS)
            _events(conn, budget)
        conn.data_to_send()
    except ProtocolViolation as e:
        raise FindingError(f"the setup {name} is itself a violation: {e}") from e
    direct = bool(choice & 0x80)
    # A payload being received straight into a buffer of the glue's (as
    # protocol.py does for large WRITEs): the buffer and how much it holds.
    target: bytearray | None = None
    filled = 0
    try:
        for piece in _pieces(data[2:], choice & 0x7F):
            if target is not None:
                take = min(len(piece), len(target) - filled)
                target[filled : filled + take] = piece[:take]
                filled += take
                piece = piece[take:]
                if filled == len(target):
                    conn.payload_received(target)
                    target = None
            conn.receive_data(piece)
            for index, event in enumerate(_events(conn, budget)):
                _answer_server(conn, event, choice + index)
            conn.data_to_send()
            if direct and target is None and 0 < conn.payload_wanted():
                length = conn.payload_length()
                if length <= 1 << 20:
                    target = bytearray(length)
                    filled = conn.take_payload_into(memoryview(target))
                    if filled == length:
                        conn.payload_received(target)
                        target = None
                        for event in _events(conn, budget):
                            _answer_server(conn, event, choice)
    except ProtocolViolation:
        return


#: Client starting points: (name, configuration, server bytes that bring
#: the connection there, whether to put requests in flight).
def _greeting(flags: int = 3) -> bytes:
    return w.NBDMAGIC.to_bytes(8, "big") + w.IHAVEOPT.to_bytes(8, "big") + flags.to_bytes(2, "big")


def _reply(option: int, rep: int, payload: bytes = b"") -> bytes:
    return (
        w.OPTION_REPLY_MAGIC.to_bytes(8, "big")
        + option.to_bytes(4, "big")
        + rep.to_bytes(4, "big")
        + len(payload).to_bytes(4, "big")
        + payload
    )


def _go_replies(flags: int, min_block: int = 1) -> bytes:
    info_export = (0).to_bytes(2, "big") + SIZE.to_bytes(8, "big") + flags.to_bytes(2, "big")
    info_block = (3).to_bytes(2, "big") + b"".join(
        n.to_bytes(4, "big") for n in (min_block, 4096, 32 << 20)
    )
    return (
        _reply(Opt.GO, w.Rep.INFO, info_export)
        + _reply(Opt.GO, w.Rep.INFO, info_block)
        + _reply(Opt.GO, w.Rep.ACK)
    )


_ALL_FLAGS = int(
    w.TxFlags.HAS_FLAGS
    | w.TxFlags.SEND_FLUSH
    | w.TxFlags.SEND_FUA
    | w.TxFlags.SEND_TRIM
    | w.TxFlags.SEND_WRITE_ZEROES
    | w.TxFlags.SEND_DF
    | w.TxFlags.CAN_MULTI_CONN
    | w.TxFlags.SEND_CACHE
    | w.TxFlags.SEND_FAST_ZERO
)
_META_REPLY = _reply(
    Opt.SET_META_CONTEXT, w.Rep.META_CONTEXT, (1).to_bytes(4, "big") + b"base:allocation"
) + _reply(Opt.SET_META_CONTEXT, w.Rep.ACK)

CLIENT_SETUPS: list[tuple[str, ClientConfiguration, bytes, bool]] = [
    ("greeting", ClientConfiguration("disk"), b"", False),
    ("options", ClientConfiguration("disk"), _greeting(), False),
    ("list", ClientConfiguration(list_exports=True), _greeting(), False),
    ("tls-require", ClientConfiguration("disk", tls="require"), _greeting(), False),
    (
        "after-starttls",
        ClientConfiguration("disk", tls="require"),
        _greeting() + _reply(Opt.STARTTLS, w.Rep.ACK),
        False,
    ),
    (
        "simple",
        ClientConfiguration("disk", structured_replies=False),
        _greeting() + _go_replies(_ALL_FLAGS & ~w.TxFlags.SEND_DF),
        True,
    ),
    (
        "structured",
        ClientConfiguration("disk", extended_headers=False),
        _greeting()
        + _reply(Opt.STRUCTURED_REPLY, w.Rep.ACK)
        + _META_REPLY
        + _go_replies(_ALL_FLAGS),
        True,
    ),
    (
        "extended",
        ClientConfiguration("disk"),
        _greeting()
        + _reply(Opt.EXTENDED_HEADERS, w.Rep.ACK)
        + _META_REPLY
        + _go_replies(_ALL_FLAGS, 512),
        True,
    ),
    (
        "oldstyle-flags",
        ClientConfiguration("disk"),
        _greeting(1),
        False,
    ),
]


def _send_requests(conn: ClientConnection) -> None:
    """One request of every kind in flight (cookies are small numbers)."""
    conn.send_request(Cmd.READ, 0, 512)
    if conn.negotiated.structured_replies:
        conn.send_request(Cmd.READ, 4096, 1024, CmdFlags.DF)
        conn.send_request(Cmd.BLOCK_STATUS, 0, SIZE)
        conn.send_request(Cmd.BLOCK_STATUS, 512, 4096, CmdFlags.REQ_ONE)
    conn.write_request(8192, b"w" * 512)
    conn.send_request(Cmd.WRITE, 0, 0)
    conn.send_request(Cmd.FLUSH, 0, 0)
    conn.send_request(Cmd.TRIM, 0, 4096)
    conn.send_request(Cmd.WRITE_ZEROES, 0, 4096, CmdFlags.FAST_ZERO)
    conn.send_request(Cmd.CACHE, 0, 4096)
    conn.send_request(Cmd.READ, SIZE - 512, 512)


def _on_client_event(conn: ClientConnection, event: object) -> None:
    if isinstance(event, TLSStarting):
        # The caller switches to TLS; what follows is as if decrypted.
        conn.tls_started()


def fuzz_client(data: bytes) -> None:
    """
    Feed C{data} (after its two control bytes) to a client connection as
    the server's bytes.

    @raise FindingError: or any exception other than L{ProtocolViolation}, which
        is caught: the contract was broken.
    """
    if len(data) < 2:
        return
    name, config, setup, requests = CLIENT_SETUPS[data[0] % len(CLIENT_SETUPS)]
    conn = ClientConnection(config)
    conn.data_to_send()
    budget = [10 * len(data) + 100]
    try:
        conn.receive_data(setup)
        for event in _events(conn, budget):
            _on_client_event(conn, event)
    except ProtocolViolation as e:
        raise FindingError(f"the setup {name} is itself a violation: {e}") from e
    if requests:
        if conn.phase is not Phase.TRANSMISSION:
            raise FindingError(f"the setup {name} did not reach transmission: {conn.phase}")
        _send_requests(conn)
    conn.data_to_send()
    try:
        for piece in _pieces(data[2:], data[1] & 0x7F):
            conn.receive_data(piece)
            for event in _events(conn, budget):
                _on_client_event(conn, event)
            conn.data_to_send()
    except ProtocolViolation:
        return


#: The protocol has no TLS settings here: only setups without STARTTLS
#: (one that offers it, which the protocol then cannot start, is kept).
_PROTOCOL_SETUPS = [setup for setup in SERVER_SETUPS if setup[1] != "require"]


def fuzz_protocol(data: bytes) -> None:
    """
    Feed C{data} (after its two control bytes) to the Twisted server
    protocol (L{NBDServerProtocol} over a L{StringTransport}, a memory
    device behind it), starting in the phase L{_PROTOCOL_SETUPS} names; then
    lose the connection. Allowed: anything written, an abort or a close.
    A finding: an exception out of C{dataReceived} or C{connectionLost}, or
    a failure logged (an unexpected error while replying, a backend bug).

    @raise FindingError: the contract was broken.
    """
    if len(data) < 2:
        return
    name, tls, min_block, setup = _PROTOCOL_SETUPS[data[0] % len(_PROTOCOL_SETUPS)]
    caps = Capabilities(can_fast_zero=True, can_cache=True, can_extents=True, min_block=min_block)
    device = MemoryBlockDevice(SIZE, caps)
    registry = ExportRegistry.of([Export("disk", device)], default_name="disk")
    factory = NBDServerFactory(
        registry,
        config=ServerConfiguration(tls=tls),
        poll_max=0,
        max_queue_depth=4,
    )
    proto = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 1))
    assert proto is not None
    failures: list[dict[str, object]] = []

    def observe(event: dict[str, object]) -> None:
        if "log_failure" in event:
            failures.append(event)

    proto.log = Logger(observer=cast(ILogObserver, observe))
    transport = StringTransport()
    proto.makeConnection(transport)
    proto.dataReceived(setup)
    for piece in _pieces(data[2:], data[1] & 0x7F):
        if transport.disconnecting:
            break
        proto.dataReceived(piece)
        transport.clear()
        if transport.producerState == "paused" and data[1] & 0x80:
            # The glue paused reading; a slow client is as good as any.
            proto.resumeProducing()
    proto.connectionLost(Failure(ConnectionDone("fuzz")))
    if failures:
        raise FindingError(f"logged a failure: {failures[0]}")


TARGETS: dict[str, Callable[[bytes], None]] = {
    "server": fuzz_server,
    "client": fuzz_client,
    "protocol": fuzz_protocol,
}


def fuzz_any(data: bytes) -> None:
    """
    By the first byte modulo 3: the server core, the client core, or the
    server protocol.
    """
    if not data:
        return
    (fuzz_server, fuzz_client, fuzz_protocol)[data[0] % 3](data[1:])


_PAIRS = {"simple": "simple", "structured": "structured", "extended": "extended"}


def seed_inputs() -> list[bytes]:
    """
    Well-formed starting points for the fuzzers, in L{fuzz_any}'s format:
    for each transmission mode, the requests a client sends (for the
    server target) and the server's replies to them (for the client
    target); and a few handshakes.
    """
    seeds: list[bytes] = []
    client_index = {name: i for i, (name, *_) in enumerate(CLIENT_SETUPS)}
    server_index = {name: i for i, (name, *_) in enumerate(SERVER_SETUPS)}
    for mode in _PAIRS:
        _, config, setup, _ = CLIENT_SETUPS[client_index[mode]]
        client = ClientConnection(config)
        client.receive_data(setup)
        _events(client, [100])
        client.data_to_send()
        _send_requests(client)
        requests = b"".join(client.data_to_send())
        name, tls, min_block, server_setup = SERVER_SETUPS[server_index[mode]]
        for choice in (0, 1, 2, 4, 8):
            server = ServerConnection(_registry(min_block), ServerConfiguration(tls=tls))
            server.receive_data(server_setup)
            _events(server, [100])
            server.data_to_send()
            server.receive_data(requests)
            replies = b"".join(server.data_to_send())
            for index, event in enumerate(_events(server, [100])):
                replies += b"".join(_answer_server(server, event, choice + index))
                replies += b"".join(server.data_to_send())
            seeds.append(bytes([1, client_index[mode], 0 if choice else 3]) + replies)
        seeds.append(bytes([0, server_index[mode], 0]) + requests)
        seeds.append(bytes([0, server_index[mode], 0x85]) + requests)
        seeds.append(bytes([0, server_index[mode], 0x80]) + requests)
        protocol_index = [setup[0] for setup in _PROTOCOL_SETUPS].index(mode)
        seeds.append(bytes([2, protocol_index, 0x80]) + requests)
        seeds.append(bytes([2, protocol_index, 0x03]) + requests)
    options = (
        b.option(Opt.LIST)
        + b.option(Opt.INFO, b.info_data("disk", (0, 1, 2, 3)))
        + b.option(Opt.LIST_META_CONTEXT, b.meta_data("disk", "base:"))
        + _META
        + b.option(Opt.STRUCTURED_REPLY)
        + b.go("ro")
    )
    seeds.append(bytes([0, server_index["options"], 0]) + options)
    seeds.append(bytes([2, 1, 0]) + options)
    seeds.append(bytes([0, server_index["greeting"], 0]) + b.client_flags() + options)
    seeds.append(bytes([0, server_index["after-starttls"], 0]) + options)
    seeds.append(bytes([0, server_index["options-tls-on"], 0]) + b.option(Opt.STARTTLS) + options)
    return seeds


#: Inputs that once broke a contract (one file each), and the packed corpus
#: of a long coverage-guided run (L{pack_corpus}): the suite replays both.
CORPUS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fuzz_corpus")
PACKED = os.path.join(CORPUS, "coverage.gz")


def pack_corpus(directory: str, path: str = PACKED) -> int:
    """
    Pack every file in C{directory} (a libFuzzer corpus, best minimised
    with C{-merge=1}) into C{path}: gzip of (u32 length, bytes) records.

    @return: how many inputs were packed.
    """
    names = sorted(os.listdir(directory))
    # No timestamp in the header: packing the same inputs gives the same file.
    with gzip.GzipFile(path, "wb", mtime=0) as out:
        for name in names:
            with open(os.path.join(directory, name), "rb") as f:
                data = f.read()
            out.write(struct.pack(">I", len(data)) + data)
    return len(names)


def corpus_inputs() -> list[bytes]:
    """The regression inputs and the packed coverage corpus, in L{fuzz_any}'s format."""
    inputs = []
    for name in sorted(os.listdir(CORPUS)):
        path = os.path.join(CORPUS, name)
        if path == PACKED:
            with gzip.open(path, "rb") as f:
                packed = f.read()
            position = 0
            while position < len(packed):
                (length,) = struct.unpack_from(">I", packed, position)
                inputs.append(packed[position + 4 : position + 4 + length])
                position += 4 + length
        else:
            with open(path, "rb") as f:
                inputs.append(f.read())
    return inputs
