"""
Backends and filters by name, as real clients see them: every built-in
backend and filter round-trips data with nbdcopy; C{cow} keeps its base
image byte-identical under qemu-io writes, trims and zeroes; C{error} at 1%
under load answers every request and the server stays up.
"""

from __future__ import annotations

import hashlib
import os
import struct
from array import array
from pathlib import Path

import pytest
from twisted.trial.unittest import SynchronousTestCase

from tests.interop.helpers import (
    NBDServer,
    assert_file_content,
    make_image,
    make_tempdir,
    require_tool,
    run_libnbd,
    run_tool,
    start_server,
)

pytestmark = pytest.mark.interop

MiB = 1024 * 1024
SIZE = 16 * MiB
TIMEOUT = 120.0


def random_data(size: int) -> bytes:
    """Random data with a zero run in the middle, so holes are copied too."""
    data = bytearray(os.urandom(size))
    data[size // 4 : size // 2] = bytes(size // 4)
    return bytes(data)


def round_trip(case: SynchronousTestCase, server: NBDServer, tmp: Path) -> None:
    """Upload random data with nbdcopy, download it again, compare."""
    nbdcopy = require_tool("nbdcopy")
    data = random_data(SIZE)
    (tmp / "up.bin").write_bytes(data)
    run_tool([nbdcopy, "--flush", str(tmp / "up.bin"), server.uri], timeout=TIMEOUT)
    run_tool([nbdcopy, server.uri, str(tmp / "down.bin")], timeout=TIMEOUT)
    assert_file_content(tmp / "down.bin", data)


class RoundTripTests(SynchronousTestCase):
    """Each filter, and stacks of them, over a RAM disk or an image."""

    def filtered(self, *filters: str, image: bool = False, extra: int = 0) -> None:
        tmp = make_tempdir(self)
        args: list[str] = []
        if image:
            args += ["--image", str(make_image(tmp / "disk.img", SIZE + extra))]
        else:
            args += ["--memory", str(SIZE + extra)]
        for spec in filters:
            args += ["--filter", spec]
        round_trip(self, start_server(self, *args), tmp)

    def test_cow(self) -> None:
        self.filtered("cow", image=True)

    def test_cow_memory(self) -> None:
        self.filtered("cow:overlay=memory,block-size=4K")

    def test_error_at_zero(self) -> None:
        self.filtered("error:rate=0,ops=all")

    def test_delay(self) -> None:
        self.filtered("delay:delay=1ms,jitter=1ms")

    def test_stats(self) -> None:
        self.filtered("stats:log=true", image=True)

    def test_offset(self) -> None:
        self.filtered(f"offset:offset=1M,range={SIZE}", extra=2 * MiB)

    def test_truncate(self) -> None:
        self.filtered(f"truncate:size={SIZE}", image=True, extra=12345)

    def test_cache(self) -> None:
        self.filtered("cache:size=4M", image=True)

    def test_rate(self) -> None:
        self.filtered("rate:rate=256M")

    def test_rate_per_connection(self) -> None:
        self.filtered("rate:rate=256M,per=connection", "cow:overlay=memory")

    def test_blocksize(self) -> None:
        self.filtered("blocksize:min=4K,max=64K")

    def test_stack(self) -> None:
        self.filtered("stats", "cache:size=2M", "cow", image=True)

    def test_workers(self) -> None:
        """The filter stack travels to worker processes, each stacking its own."""
        tmp = make_tempdir(self)
        server = start_server(
            self,
            "--memory",
            str(SIZE),
            "--filter",
            "stats",
            "--filter",
            "blocksize:min=4K",
            "--workers",
            "2",
        )
        round_trip(self, server, tmp)

    def test_readonly(self) -> None:
        """A read-only stack serves the image's bytes and refuses writes."""
        tmp = make_tempdir(self)
        data = random_data(SIZE)
        image = make_image(tmp / "disk.img", SIZE, data)
        server = start_server(self, "--image", str(image), "--filter", "readonly")
        run_tool([require_tool("nbdcopy"), server.uri, str(tmp / "down.bin")], timeout=TIMEOUT)
        assert_file_content(tmp / "down.bin", data)
        refused = run_tool(
            [require_tool("qemu-io"), "-f", "raw", server.uri, "-c", "write 0 512"], check=False
        )
        # qemu sees a read-only export and will not open it for writing.
        said = refused.stdout + refused.stderr
        self.assertTrue(any(w in said for w in ("Permission denied", "rror")), said)

    def test_pattern_backend(self) -> None:
        """--backend pattern serves nbdkit's pattern: each word its offset."""
        tmp = make_tempdir(self)
        server = start_server(self, "--backend", f"pattern:size={SIZE}")
        run_tool([require_tool("nbdcopy"), server.uri, str(tmp / "down.bin")], timeout=TIMEOUT)
        words = array("Q", range(0, SIZE, 8))
        words.byteswap()
        self.assertEqual(struct.pack(">Q", 8), words.tobytes()[8:16])
        assert_file_content(tmp / "down.bin", words.tobytes())

    def test_file_backend_by_name(self) -> None:
        """--backend file:path=... is --image."""
        tmp = make_tempdir(self)
        image = make_image(tmp / "disk.img", SIZE)
        round_trip(self, start_server(self, "--backend", f"file:path={image}"), tmp)

    def test_memory_backend_by_name(self) -> None:
        tmp = make_tempdir(self)
        round_trip(self, start_server(self, "--backend", f"memory:size={SIZE}"), tmp)


class CowTests(SynchronousTestCase):
    def test_base_untouched(self) -> None:
        """
        qemu-io writes, discards and zeroes through cow, a second
        connection sees them, and the base image stays byte-identical.
        """
        tmp = make_tempdir(self)
        base = make_image(tmp / "base.img", SIZE, random_data(SIZE))
        before = hashlib.sha256(base.read_bytes()).hexdigest()
        server = start_server(self, "--image", str(base), "--filter", "cow")
        qemu_io = require_tool("qemu-io")
        commands = [
            "write -P 0x55 100 70k",
            "discard 1M 1M",
            "write -z 3M 512k",
            "write -z -u 5M 1M",
            "aio_write -P 0x66 8M 64k",
            "aio_flush",
            "read -P 0x55 100 70k",
            "read -P 0 3M 512k",
            "read -P 0 5M 1M",
        ]
        argv = [qemu_io, "-f", "raw", server.uri]
        for command in commands:
            argv += ["-c", command]
        done = run_tool(argv, timeout=TIMEOUT)
        self.assertNotIn("fail", done.stdout + done.stderr)
        # Another connection to the same export reads the same overlay.
        done = run_tool(
            [qemu_io, "-f", "raw", "-r", server.uri, "-c", "read -P 0x66 8M 64k"],
            timeout=TIMEOUT,
        )
        self.assertNotIn("fail", done.stdout + done.stderr)
        self.assertEqual(hashlib.sha256(base.read_bytes()).hexdigest(), before)
        # And the whole device reads as base + changes.
        run_tool([require_tool("nbdcopy"), server.uri, str(tmp / "seen.bin")], timeout=TIMEOUT)
        expected = bytearray(base.read_bytes())
        expected[100 : 100 + 70 * 1024] = b"\x55" * (70 * 1024)
        expected[MiB : 2 * MiB] = bytes(MiB)
        expected[3 * MiB : 3 * MiB + 512 * 1024] = bytes(512 * 1024)
        expected[5 * MiB : 6 * MiB] = bytes(MiB)
        expected[8 * MiB : 8 * MiB + 64 * 1024] = b"\x66" * (64 * 1024)
        assert_file_content(tmp / "seen.bin", bytes(expected))


#: Under libnbd: many requests in flight, every one answered (an error is an answer).
_LOAD = """
import errno, json, sys
import nbd
h = nbd.NBD()
h.connect_uri(sys.argv[1])
size = h.get_size()
total, depth, length = int(sys.argv[2]), 32, 64 * 1024
counts = {"ok": 0, "EIO": 0, "other": 0}
cookies = []
sent = 0
while sent < total or cookies:
    while sent < total and len(cookies) < depth:
        offset = (sent * length) % (size - length)
        if sent % 2:
            cookies.append(h.aio_pwrite(b"x" * length, offset))
        else:
            cookies.append(h.aio_pread(nbd.Buffer(length), offset))
        sent += 1
    h.poll(-1)
    for cookie in list(cookies):
        try:
            finished = h.aio_command_completed(cookie)
        except nbd.Error as e:
            counts["EIO" if e.errnum == errno.EIO else "other"] += 1
            cookies.remove(cookie)
            continue
        if finished:
            counts["ok"] += 1
            cookies.remove(cookie)
h.shutdown()
print(json.dumps(counts))
"""


class ErrorTests(SynchronousTestCase):
    def test_one_percent_under_load(self) -> None:
        """
        At 1% every request is still answered, some with EIO, nbdcopy sees
        the errors, and the server stays up and serves the next client.
        """
        tmp = make_tempdir(self)
        server = start_server(
            self, "--memory", "64M", "--filter", "error:rate=0.01,ops=read+write,errno=EIO"
        )
        counts = run_libnbd(_LOAD, server.uri, "4000", timeout=TIMEOUT)
        self.assertEqual(counts["ok"] + counts["EIO"], 4000, counts)
        self.assertEqual(counts["other"], 0)
        self.assertTrue(10 <= counts["EIO"] <= 100, counts)
        (tmp / "up.bin").write_bytes(random_data(SIZE))
        for _ in range(3):
            run_tool(
                [require_tool("nbdcopy"), str(tmp / "up.bin"), server.uri],
                timeout=TIMEOUT,
                check=False,
            )
        self.assertTrue(server.alive())
        run_tool([require_tool("nbdinfo"), server.uri], timeout=TIMEOUT)
