"""
The floor for Python at queue depth 1 (issue 7): the fewest steps any NBD
server written in Python can take per request, without Twisted, without
parsing beyond one C{struct.unpack_from}, without checks.

It answers just enough of the handshake for libnbd (fixed newstyle; NBD_OPT_GO
with the export's size; every other option gets ERR_UNSUP), then serves one
client from a C{bytearray}: READ with one C{sendmsg} of a 16-byte reply header
and a view of the array, WRITE into the array, FLUSH with an empty reply,
DISC ends it. Nothing else, and no error handling: it is a measuring stick,
not a server. With C{--spin} it busy-polls for the next request (as
twisted-nbd's adaptive polling does at queue depth 1) instead of blocking in
C{recv}.

    python3 bench/floor.py --port 10811 --size 1G [--spin]
    fio --name=x --ioengine=nbd --uri=nbd://127.0.0.1:10811 --rw=randread \\
        --bs=4k --iodepth=1 --time_based --runtime=10s

If this loop cannot answer 4 KiB READs at queue depth 1 as fast as a C server
(nbdkit memory), no Python server can: its every request costs at least this.
"""

from __future__ import annotations

import argparse
import socket
import struct

OPT_MAGIC = b"IHAVEOPT"
REPLY_MAGIC = 0x3E889045565A9
OPT_ABORT, OPT_GO = 2, 7
REP_ACK, REP_INFO, REP_ERR_UNSUP = 1, 3, (1 << 31) + 1
REQUEST = struct.Struct(">IHHQQI")
SIMPLE_REPLY = 0x67446698


def size_of(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text)


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        more = sock.recv(n - len(data))
        if not more:
            raise EOFError
        data += more
    return data


def option_reply(sock: socket.socket, option: int, kind: int, data: bytes = b"") -> None:
    sock.sendall(struct.pack(">QIII", REPLY_MAGIC, option, kind, len(data)) + data)


def handshake(sock: socket.socket, size: int) -> bool:
    """Newstyle fixed handshake up to NBD_OPT_GO; whether to go on."""
    sock.sendall(b"NBDMAGIC" + OPT_MAGIC + struct.pack(">H", 1 | 2))
    recv_exactly(sock, 4)
    while True:
        magic, option, length = struct.unpack(">8sII", recv_exactly(sock, 16))
        assert magic == OPT_MAGIC
        recv_exactly(sock, length)
        if option == OPT_GO:
            # NBD_INFO_EXPORT: the size, HAS_FLAGS | SEND_FLUSH.
            option_reply(sock, option, REP_INFO, struct.pack(">HQH", 0, size, 1 | 4))
            option_reply(sock, option, REP_ACK)
            return True
        if option == OPT_ABORT:
            option_reply(sock, option, REP_ACK)
            return False
        option_reply(sock, option, REP_ERR_UNSUP)


def serve(sock: socket.socket, disk: bytearray, spin: bool) -> None:
    view = memoryview(disk)
    header = bytearray(REQUEST.size)
    unpack = REQUEST.unpack_from
    pack = struct.Struct(">IIQ").pack
    recv_into = sock.recv_into
    sendmsg = sock.sendmsg
    flags = socket.MSG_DONTWAIT if spin else 0
    while True:
        got = 0
        while got < 28:
            try:
                count = recv_into(memoryview(header)[got:], 28 - got, flags)
            except BlockingIOError:
                continue
            if not count:
                return
            got += count
        _magic, _flags, kind, cookie, offset, length = unpack(header)
        if kind == 0:
            sendmsg([pack(SIMPLE_REPLY, 0, cookie), view[offset : offset + length]])
        elif kind == 1:
            target = view[offset : offset + length]
            done = 0
            while done < length:
                try:
                    done += recv_into(target[done:], length - done, flags)
                except BlockingIOError:
                    continue
            sendmsg([pack(SIMPLE_REPLY, 0, cookie)])
        elif kind == 3:
            sendmsg([pack(SIMPLE_REPLY, 0, cookie)])
        else:
            return


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=10811)
    parser.add_argument("--size", default="1G")
    parser.add_argument("--spin", action="store_true", help="busy-poll instead of blocking")
    parser.add_argument("--connections", type=int, default=0, help="stop after N (0: never)")
    args = parser.parse_args()
    size = size_of(args.size)
    disk = bytearray(size)
    listener = socket.create_server(("127.0.0.1", args.port))
    # The port it got (for --port 0), for whoever started it.
    print(f"listening on 127.0.0.1:{listener.getsockname()[1]}", flush=True)
    served = 0
    while not args.connections or served < args.connections:
        sock, _ = listener.accept()
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        served += 1
        try:
            if handshake(sock, size):
                serve(sock, disk, args.spin)
        except (EOFError, ConnectionError):
            pass
        finally:
            sock.close()


if __name__ == "__main__":
    main()
