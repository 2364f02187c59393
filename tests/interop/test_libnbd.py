"""
The server driven by libnbd's Python binding, which can send what its
command-line tools never would (with strict mode off) and can keep one
connection open across a server crash.

libnbd's binding is Debian's and imports only under C{/usr/bin/python3}, so
each scenario is a small script run there as a subprocess; it prints its
findings as JSON on its last line. Rule ids refer to the protocol digest.
"""

from __future__ import annotations

import errno
import os
import select
import subprocess
import time

import pytest
from twisted.trial.unittest import SynchronousTestCase

from tests.interop.helpers import (
    make_image,
    make_tempdir,
    require_libnbd,
    run_libnbd,
    start_server,
)

pytestmark = pytest.mark.interop

MiB = 1024 * 1024

# Shared by the scripts: run one call, return 0 or the NBD error's errno.
_PRELUDE = """
import json, sys
import nbd

def errnum(call, *args):
    try:
        call(*args)
    except nbd.Error as e:
        return e.errnum
    return 0
"""

READ_ONLY_SCRIPT = (
    _PRELUDE
    + """
h = nbd.NBD()
h.set_strict_mode(0)  # send writes although the server said read-only
h.connect_uri(sys.argv[1])
out = {"read_only": h.is_read_only()}
out["write"] = errnum(h.pwrite, b"\\xaa" * 4096, 0)
out["read_after_write"] = h.pread(4096, 0).hex()
out["trim"] = errnum(h.trim, 4096, 0)
out["zero"] = errnum(h.zero, 4096, 8192)
out["read_after_all"] = h.pread(4096, 8192).hex()
h.shutdown()
print(json.dumps(out))
"""
)

OUT_OF_RANGE_SCRIPT = (
    _PRELUDE
    + """
h = nbd.NBD()
h.set_strict_mode(0)  # let requests past the end reach the server
h.connect_uri(sys.argv[1])
size = h.get_size()
out = {
    "read_past_end": errnum(h.pread, 512, size),
    "read_straddling": errnum(h.pread, 1024, size - 512),
    "read_far": errnum(h.pread, 512, 2**62),
    "write_past_end": errnum(h.pwrite, b"x" * 512, size),
    "write_straddling": errnum(h.pwrite, b"x" * 1024, size - 512),
    "zero_straddling": errnum(h.zero, 1024, size - 512),
    "trim_straddling": errnum(h.trim, 1024, size - 512),
}
# The connection is still in order: the last sector can be written and read.
h.pwrite(b"\\x42" * 512, size - 512)
out["tail"] = h.pread(512, size - 512) == b"\\x42" * 512
h.flush()
h.shutdown()
print(json.dumps(out))
"""
)

UNKNOWN_EXPORT_SCRIPT = (
    _PRELUDE
    + """
h = nbd.NBD()
h.set_opt_mode(True)
h.connect_uri(sys.argv[1])
h.set_export_name("nosuch")
out = {"go_unknown": errnum(h.opt_go)}
# Same connection, still haggling (H-13): now the real export.
h.set_export_name("")
h.opt_go()
out["size"] = h.get_size()
out["read"] = len(h.pread(4096, 0))
h.shutdown()
print(json.dumps(out))
"""
)

# Writes, makes them durable (FLUSH, or FUA on the write itself), says so on
# stdout and keeps the connection open until stdin closes.
DURABLE_SCRIPT = (
    _PRELUDE
    + """
h = nbd.NBD()
h.connect_uri(sys.argv[1])
mode, offset = sys.argv[2], int(sys.argv[3])
with open(sys.argv[4], "rb") as f:
    data = f.read()
if mode == "fua":
    h.pwrite(data, offset, nbd.CMD_FLAG_FUA)
else:
    h.pwrite(data, offset)
    h.flush()
print("durable", flush=True)
sys.stdin.read()
"""
)


class LibnbdTests(SynchronousTestCase):
    """Error replies that leave the connection usable, and durability."""

    def test_read_only_refuses_writes(self) -> None:
        """
        On a C{--read-only} export, WRITE, TRIM and WRITE_ZEROES fail with
        EPERM (T-08), the WRITE's payload is drained (T-05) so later READs
        on the same connection still work, and the image is unchanged.
        """
        tmp = make_tempdir(self)
        content = b"\x5a" * 4096 + b"\xa5" * 8192
        image = make_image(tmp / "disk.img", 4 * MiB, content)
        server = start_server(self, "--image", str(image), "--read-only")
        out = run_libnbd(READ_ONLY_SCRIPT, server.uri)
        self.assertEqual(out["read_only"], True)
        self.assertEqual(out["write"], errno.EPERM)
        self.assertEqual(bytes.fromhex(out["read_after_write"]), b"\x5a" * 4096)
        self.assertEqual(out["trim"], errno.EPERM)
        self.assertEqual(out["zero"], errno.EPERM)
        self.assertEqual(bytes.fromhex(out["read_after_all"]), b"\xa5" * 4096)
        self.assertEqual(image.read_bytes()[: len(content)], content)

    def test_out_of_range(self) -> None:
        """
        Requests past the end of the export are errored without a
        disconnect (T-06): READ and TRIM with EINVAL, WRITE and
        WRITE_ZEROES with ENOSPC; the connection then still reads and writes
        the last sector.
        """
        tmp = make_tempdir(self)
        image = make_image(tmp / "disk.img", 4 * MiB)
        server = start_server(self, "--image", str(image))
        out = run_libnbd(OUT_OF_RANGE_SCRIPT, server.uri)
        self.assertEqual(
            out,
            {
                "read_past_end": errno.EINVAL,
                "read_straddling": errno.EINVAL,
                "read_far": errno.EINVAL,
                "write_past_end": errno.ENOSPC,
                "write_straddling": errno.ENOSPC,
                "zero_straddling": errno.ENOSPC,
                "trim_straddling": errno.EINVAL,
                "tail": True,
            },
        )
        self.assertEqual(image.read_bytes()[-512:], b"\x42" * 512)
        self.assertEqual(os.path.getsize(image), 4 * MiB)

    def test_unknown_export_then_go(self) -> None:
        """
        NBD_OPT_GO for an unknown export gets an error reply and the same
        connection can go on haggling and then GO to the real export (H-13).
        """
        tmp = make_tempdir(self)
        image = make_image(tmp / "disk.img", 4 * MiB)
        server = start_server(self, "--image", str(image))
        out = run_libnbd(UNKNOWN_EXPORT_SCRIPT, server.uri)
        self.assertNotEqual(out["go_unknown"], 0)
        self.assertEqual((out["size"], out["read"]), (4 * MiB, 4096))

    def _durable_then_kill(self, mode: str) -> None:
        """
        Write with C{mode} ("flush" or "fua") through a connection that stays
        open, kill -9 the server once the write is durable, and check the
        image file.
        """
        python = require_libnbd()
        tmp = make_tempdir(self)
        image = make_image(tmp / "disk.img", 8 * MiB)
        server = start_server(self, "--image", str(image))
        offset, data = 3 * MiB + 123, os.urandom(256 * 1024 + 5)
        (tmp / "data.bin").write_bytes(data)
        client = subprocess.Popen(
            [python, "-c", DURABLE_SCRIPT, server.uri, mode, str(offset), str(tmp / "data.bin")],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        try:
            line = _read_line(client, timeout=60.0)
            if line == b"durable\n":
                server.kill9()
        finally:
            client.kill()
            _, err = client.communicate(timeout=30)
        self.assertEqual(line, b"durable\n", err.decode("utf-8", "replace"))
        self.assertEqual(image.read_bytes()[offset : offset + len(data)], data)

    def test_flush_then_kill(self) -> None:
        """
        Data written and FLUSHed is in the image file even when the server
        is killed with SIGKILL right after the FLUSH reply (C-02).
        """
        self._durable_then_kill("flush")

    def test_fua_then_kill(self) -> None:
        """
        Data written with FUA is in the image file even when the server is
        killed with SIGKILL right after the write's reply (C-03).
        """
        self._durable_then_kill("fua")


def _read_line(process: subprocess.Popen[bytes], timeout: float) -> bytes:
    """The first line of C{process}'s stdout, or what came before EOF or the timeout."""
    assert process.stdout is not None
    fd = process.stdout.fileno()
    line = b""
    deadline = time.monotonic() + timeout
    while not line.endswith(b"\n") and (left := deadline - time.monotonic()) > 0:
        ready, _, _ = select.select([fd], [], [], left)
        if not ready:
            break
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        line += chunk
    return line
