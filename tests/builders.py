"""
Client-side byte builders for the unit tests: what a client puts on the wire.
"""

from __future__ import annotations

import struct

from twisted_nbd import _wire as w


def client_flags(flags: int = 3) -> bytes:
    """The client flags (fixed newstyle and no zeroes by default)."""
    return struct.pack(">I", flags)


def option(opt: int, data: bytes = b"", magic: int = w.IHAVEOPT) -> bytes:
    """An option request with its data."""
    return struct.pack(">QII", magic, opt, len(data)) + data


def info_data(name: str = "", infos: tuple[int, ...] = ()) -> bytes:
    """The data of NBD_OPT_INFO / NBD_OPT_GO."""
    raw = name.encode()
    return (
        struct.pack(">I", len(raw))
        + raw
        + struct.pack(">H", len(infos))
        + b"".join(struct.pack(">H", i) for i in infos)
    )


def go(name: str = "", infos: tuple[int, ...] = ()) -> bytes:
    """A whole NBD_OPT_GO option."""
    return option(w.Opt.GO, info_data(name, infos))


def meta_data(name: str, *queries: str) -> bytes:
    """The data of NBD_OPT_LIST_META_CONTEXT / SET_META_CONTEXT."""
    raw = name.encode()
    out = struct.pack(">I", len(raw)) + raw + struct.pack(">I", len(queries))
    for q in queries:
        out += struct.pack(">I", len(q.encode())) + q.encode()
    return out


def request(
    cmd: int,
    cookie: int = 1,
    offset: int = 0,
    length: int = 0,
    flags: int = 0,
    payload: bytes = b"",
    magic: int = w.REQUEST_MAGIC,
) -> bytes:
    """A compact request header and its payload."""
    return struct.pack(">IHHQQI", magic, flags, cmd, cookie, offset, length) + payload


def write(cookie: int, offset: int, data: bytes, flags: int = 0) -> bytes:
    """An NBD_CMD_WRITE with its payload."""
    return request(w.Cmd.WRITE, cookie, offset, len(data), flags, data)


def read(cookie: int, offset: int, length: int, flags: int = 0) -> bytes:
    """An NBD_CMD_READ."""
    return request(w.Cmd.READ, cookie, offset, length, flags)


def parse_option_replies(data: bytes) -> list[tuple[int, int, bytes]]:
    """Split server option replies into (option, reply type, data)."""
    out = []
    pos = 0
    while pos < len(data):
        magic, opt, rep, length = struct.unpack_from(">QIII", data, pos)
        assert magic == w.OPTION_REPLY_MAGIC, hex(magic)
        pos += 20
        out.append((opt, rep, data[pos : pos + length]))
        pos += length
    return out


def parse_simple_replies(data: bytes) -> list[tuple[int, int]]:
    """Split payload-less simple replies into (error, cookie)."""
    out = []
    for pos in range(0, len(data), 16):
        magic, error, cookie = struct.unpack_from(">IIQ", data, pos)
        assert magic == w.SIMPLE_REPLY_MAGIC, hex(magic)
        out.append((error, cookie))
    return out


def parse_chunks(data: bytes) -> list[tuple[int, int, int, bytes]]:
    """Split structured reply chunks into (flags, type, cookie, payload)."""
    out = []
    pos = 0
    while pos < len(data):
        magic, flags, typ, cookie, length = struct.unpack_from(">IHHQI", data, pos)
        assert magic == w.STRUCTURED_REPLY_MAGIC, hex(magic)
        pos += 20
        out.append((flags, typ, cookie, data[pos : pos + length]))
        pos += length
    return out


def ext_request(
    cmd: int,
    cookie: int = 1,
    offset: int = 0,
    length: int = 0,
    flags: int = 0,
    payload: bytes = b"",
) -> bytes:
    """An extended (32-byte) request header and its payload."""
    return struct.pack(">IHHQQQ", w.EXTENDED_REQUEST_MAGIC, flags, cmd, cookie, offset, length) + (
        payload
    )


def parse_ext_chunks(data: bytes) -> list[tuple[int, int, int, int, bytes]]:
    """Split extended reply chunks into (flags, type, cookie, offset, payload)."""
    out = []
    pos = 0
    while pos < len(data):
        magic, flags, typ, cookie, offset, length = struct.unpack_from(">IHHQQQ", data, pos)
        assert magic == w.EXTENDED_REPLY_MAGIC, hex(magic)
        pos += 32
        out.append((flags, typ, cookie, offset, data[pos : pos + length]))
        pos += length
    return out
