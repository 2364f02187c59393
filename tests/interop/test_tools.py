"""
The server as libnbd's command-line tools (nbdinfo, nbdcopy, nbdsh) and
qemu's (qemu-io, qemu-img) see it.

Every test starts its own C{twistd -n nbd} on a free loopback port; rule ids
(H-, T-, C-) refer to the protocol digest in the shared docs.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

import pytest
from twisted.trial.unittest import SynchronousTestCase

from tests.interop.helpers import (
    assert_file_content,
    make_image,
    make_tempdir,
    require_libnbd,
    require_tool,
    run_tool,
    start_server,
)

pytestmark = pytest.mark.interop

MiB = 1024 * 1024
#: An image size that is no power of two and no multiple of 4096, so a
#: server that rounds it anywhere shows (qemu needs multiples of 512).
ODD_SIZE = 10 * MiB + 3 * 512
#: The size of the images the copy tests move.
COPY_SIZE = 64 * MiB
#: Copying 64 MiB through a Python server is quick, but leave room for CI.
COPY_TIMEOUT = 120.0


def nbdinfo_json(*args: str) -> dict[str, Any]:
    """Run C{nbdinfo --json ARGS}; its single export's description."""
    done = run_tool([require_tool("nbdinfo"), "--json", *args])
    info = json.loads(done.stdout)
    exports = info["exports"]
    assert len(exports) == 1, exports
    export: dict[str, Any] = exports[0]
    return export


def assert_block_sizes(case: SynchronousTestCase, export: dict[str, Any], size: int) -> None:
    """The advertised block sizes obey the protocol's rules (section 5)."""
    minimum = export["block_size_minimum"]
    preferred = export["block_size_preferred"]
    maximum = export["block_size_maximum"]
    case.assertTrue(1 <= minimum <= 65536 and minimum & (minimum - 1) == 0, minimum)
    case.assertTrue(preferred >= max(minimum, 512) and preferred & (preferred - 1) == 0, preferred)
    case.assertGreaterEqual(maximum, preferred)
    if size >= MiB:
        case.assertGreaterEqual(maximum, MiB)
    # A file is byte-addressable: nothing forces clients to align.
    case.assertEqual(minimum, 1)


class NbdinfoTests(SynchronousTestCase):
    """What C{nbdinfo} learns in the handshake (GO, INFO, LIST)."""

    def test_writable_image(self) -> None:
        """
        A writable image is served with its exact size, all the write-side
        features the file backend supports (H-20: advertised iff supported),
        multi-conn (C-05: one shared descriptor), structured replies and
        base:allocation, and valid block sizes (H-12).
        """
        tmp = make_tempdir(self)
        image = make_image(tmp / "disk.img", ODD_SIZE)
        server = start_server(self, "--image", str(image))
        export = nbdinfo_json(server.uri)
        self.assertEqual(export["export-size"], ODD_SIZE)
        self.assertIs(export["is_read_only"], False)
        for flag in ("can_flush", "can_fua", "can_trim", "can_zero", "can_multi_conn", "can_df"):
            self.assertIs(export[flag], True, flag)
        self.assertIn("base:allocation", export.get("contexts", []))
        assert_block_sizes(self, export, ODD_SIZE)

    def test_read_only_image(self) -> None:
        """
        With C{--read-only} the READ_ONLY flag is set and no writing
        feature is advertised (H-20), while reading features stay.
        """
        tmp = make_tempdir(self)
        image = make_image(tmp / "disk.img", ODD_SIZE)
        server = start_server(self, "--image", str(image), "--read-only")
        export = nbdinfo_json(server.uri)
        self.assertEqual(export["export-size"], ODD_SIZE)
        self.assertIs(export["is_read_only"], True)
        for flag in ("can_fua", "can_trim", "can_zero", "can_fast_zero"):
            self.assertIs(export[flag], False, flag)
        self.assertIs(export["can_multi_conn"], True)
        assert_block_sizes(self, export, ODD_SIZE)

    def test_list(self) -> None:
        """
        C{nbdinfo --list} (NBD_OPT_LIST, then INFO/GO per export) shows the
        export's name and description; the export answers to its name and
        to the empty (default) name.
        """
        tmp = make_tempdir(self)
        image = make_image(tmp / "disk.img", 4 * MiB)
        server = start_server(
            self, "--image", str(image), "--name", "disk", "--description", "interop test disk"
        )
        done = run_tool([require_tool("nbdinfo"), "--list", "--json", server.uri])
        exports = json.loads(done.stdout)["exports"]
        self.assertEqual(
            [(e["export-name"], e.get("description")) for e in exports],
            [("disk", "interop test disk")],
        )
        self.assertEqual(nbdinfo_json(f"{server.uri}/disk")["export-size"], 4 * MiB)
        self.assertEqual(nbdinfo_json(server.uri)["export-size"], 4 * MiB)

    def test_unknown_export(self) -> None:
        """
        Asking for an export that does not exist fails cleanly
        (NBD_REP_ERR_UNKNOWN, H-13) and the server keeps serving others.
        """
        tmp = make_tempdir(self)
        image = make_image(tmp / "disk.img", 4 * MiB)
        server = start_server(self, "--image", str(image))
        done = run_tool([require_tool("nbdinfo"), f"{server.uri}/nosuch"], check=False)
        self.assertNotEqual(done.returncode, 0, done.stdout)
        self.assertIn("nosuch", done.stderr)
        self.assertEqual(nbdinfo_json(server.uri)["export-size"], 4 * MiB)
        self.assertTrue(server.alive())

    def test_nbdsh(self) -> None:
        """
        An C{nbdsh -c} session writes, flushes and reads back on one
        connection (C-02, C-04).
        """
        nbdsh = require_tool("nbdsh")
        python = require_libnbd()
        tmp = make_tempdir(self)
        image = make_image(tmp / "disk.img", 4 * MiB)
        server = start_server(self, "--image", str(image))
        # nbdsh runs "python3 -m nbd": put the interpreter that has libnbd first.
        path = os.pathsep.join([os.path.dirname(python), os.environ.get("PATH", "")])
        done = run_tool(
            [
                nbdsh,
                "-u",
                server.uri,
                "-c",
                "h.pwrite(b'hello, nbd', 1000)",
                "-c",
                "h.flush()",
                "-c",
                "print(h.get_size(), h.pread(10, 1000).decode())",
            ],
            env={**os.environ, "PATH": path},
        )
        self.assertEqual(done.stdout.strip(), f"{4 * MiB} hello, nbd")
        self.assertEqual(image.read_bytes()[1000:1010], b"hello, nbd")

    def test_qemu_img_info(self) -> None:
        """C{qemu-img info} sees the exact virtual size."""
        tmp = make_tempdir(self)
        image = make_image(tmp / "disk.img", ODD_SIZE)
        server = start_server(self, "--image", str(image))
        done = run_tool(
            [require_tool("qemu-img"), "info", "--output=json", "-f", "raw", server.uri]
        )
        self.assertEqual(json.loads(done.stdout)["virtual-size"], ODD_SIZE)


def qemu_io(uri: str, *commands: str, timeout: float = 60.0) -> str:
    """
    Run C{qemu-io} on C{uri} with each command as a C{-c}; its output.

    @raise AssertionError: qemu-io failed, or a pattern did not verify.
    """
    argv = [require_tool("qemu-io"), "-f", "raw", uri]
    for command in commands:
        argv += ["-c", command]
    done = run_tool(argv, timeout=timeout)
    output = done.stdout + done.stderr
    for bad in ("Pattern verification failed", "error", "failed"):
        if bad in output:
            raise AssertionError(f"qemu-io reported {bad!r}:\n{output}")
    return output


class QemuIoTests(SynchronousTestCase):
    """qemu's block layer reading and writing through the NBD driver."""

    SIZE = 8 * MiB
    #: (pattern, offset, length): aligned, unaligned, straddling pages, and
    #: the image's tail and very last byte; none overlap.
    WRITES = [
        (0x11, 0, 4096),
        (0x22, 64 * 1024, MiB),
        (0x33, 2 * MiB + 1, 3000),
        (0x44, 3 * MiB + 511, 70001),
        (0x55, 4 * MiB - 7, 14),
        (0x66, SIZE - 5000, 4999),
        (0x77, SIZE - 1, 1),
    ]

    def expected_image(self) -> bytes:
        data = bytearray(self.SIZE)
        for pattern, offset, length in self.WRITES:
            data[offset : offset + length] = bytes([pattern]) * length
        return bytes(data)

    def test_write_read_patterns(self) -> None:
        """
        Patterns written at aligned and unaligned offsets, and at the last
        byte of the image, read back on the same and on a new connection,
        and are in the image file after a FLUSH and after the server stops
        (C-02, C-04; T-07 with a minimum block size of 1).
        """
        tmp = make_tempdir(self)
        image = make_image(tmp / "disk.img", self.SIZE)
        server = start_server(self, "--image", str(image))
        writes = [f"write -P {p:#x} {o} {n}" for p, o, n in self.WRITES]
        reads = [f"read -P {p:#x} {o} {n}" for p, o, n in self.WRITES]
        qemu_io(server.uri, *writes, *reads, "flush")
        assert_file_content(image, self.expected_image())
        # The untouched gaps read as zeroes too.
        qemu_io(server.uri, *reads, "read -P 0 4096 61440", f"read -P 0 {5 * MiB} {MiB}")
        server.stop()
        assert_file_content(image, self.expected_image())

    def test_memory_backend(self) -> None:
        """
        A C{--memory} RAM disk has the asked size, starts as zeroes and
        keeps what is written, across connections.
        """
        server = start_server(self, "--memory", "8M")
        self.assertEqual(nbdinfo_json(server.uri)["export-size"], self.SIZE)
        writes = [f"write -P {p:#x} {o} {n}" for p, o, n in self.WRITES]
        reads = [f"read -P {p:#x} {o} {n}" for p, o, n in self.WRITES]
        qemu_io(server.uri, "read -P 0 0 8M", *writes, *reads)
        qemu_io(server.uri, *reads, "read -P 0 4096 61440")

    def test_write_fua(self) -> None:
        """A write with FUA (C{write -f}) lands in the file before it is acknowledged (C-03)."""
        tmp = make_tempdir(self)
        image = make_image(tmp / "disk.img", self.SIZE)
        server = start_server(self, "--image", str(image))
        qemu_io(server.uri, "write -f -P 0x5a 12345 6789", "read -P 0x5a 12345 6789")
        self.assertEqual(image.read_bytes()[12345 : 12345 + 6789], b"\x5a" * 6789)

    def test_write_zeroes(self) -> None:
        """
        C{write -z} (WRITE_ZEROES with NO_HOLE), C{write -z -u} (may punch a
        hole) and C{write -z -f} (with FUA), aligned and not, up to the last
        byte, read back as zeroes while the bytes around them are untouched
        (C-04); the image file shows the same.
        """
        tmp = make_tempdir(self)
        image = make_image(tmp / "disk.img", self.SIZE, b"\xff" * self.SIZE)
        server = start_server(self, "--image", str(image))
        zeroes = [
            ("", 0, 64 * 1024),
            ("-u ", MiB, MiB),
            ("", 3 * MiB + 1, 5000),
            ("-u ", 4 * MiB + 100, 2 * MiB + 33),
            ("-f ", 7 * MiB, 4096),
            ("-u ", self.SIZE - 512, 512),
        ]
        expected = bytearray(b"\xff" * self.SIZE)
        for _, offset, length in zeroes:
            expected[offset : offset + length] = bytes(length)
        commands = [f"write -z {flags}{o} {n}" for flags, o, n in zeroes]
        commands += [f"read -P 0 {o} {n}" for _, o, n in zeroes]
        # The neighbours of every range keep their bytes.
        commands += [f"read -P 0xff {o - 1} 1" for _, o, _ in zeroes if o]
        commands += [f"read -P 0xff {o + n} 1" for _, o, n in zeroes if o + n < self.SIZE]
        qemu_io(server.uri, *commands, "flush")
        assert_file_content(image, bytes(expected))
        qemu_io(server.uri, *[f"read -P 0 {o} {n}" for _, o, n in zeroes])


def random_file(path: Path, size: int, holes: Sequence[tuple[int, int]] = ()) -> bytes:
    """Write C{size} random bytes to C{path}, with zeroed C{(offset, length)} holes."""
    data = bytearray(os.urandom(size))
    for offset, length in holes:
        data[offset : offset + length] = bytes(length)
    path.write_bytes(data)
    return bytes(data)


class CopyTests(SynchronousTestCase):
    """Bulk copies with nbdcopy and qemu-img, many requests in flight."""

    #: Zeroed ranges in the copied data: they exercise hole detection
    #: (block status, WRITE_ZEROES) on the way up and down.
    HOLES = [(24 * MiB, 16 * MiB), (COPY_SIZE - 8 * MiB, 8 * MiB)]

    def test_nbdcopy_upload(self) -> None:
        """
        C{nbdcopy FILE nbd://...} (several connections with CAN_MULTI_CONN,
        many requests in flight, a final FLUSH) puts exactly the file's
        bytes into the image, over old contents (C-01, C-02, C-05).
        """
        tmp = make_tempdir(self)
        source = random_file(tmp / "source.bin", COPY_SIZE, self.HOLES)
        image = make_image(tmp / "disk.img", COPY_SIZE, b"\xee" * COPY_SIZE)
        server = start_server(self, "--image", str(image))
        run_tool(
            [require_tool("nbdcopy"), "--flush", str(tmp / "source.bin"), server.uri],
            timeout=COPY_TIMEOUT,
        )
        assert_file_content(image, source)

    def test_nbdcopy_download(self) -> None:
        """
        C{nbdcopy nbd://... FILE} (block status for the holes, parallel
        READs) gets exactly the image's bytes (C-01, T-17).
        """
        tmp = make_tempdir(self)
        data = random_file(tmp / "disk.img", COPY_SIZE, self.HOLES)
        server = start_server(self, "--image", str(tmp / "disk.img"))
        run_tool([require_tool("nbdcopy"), server.uri, str(tmp / "copy.bin")], timeout=COPY_TIMEOUT)
        assert_file_content(tmp / "copy.bin", data)

    def test_small_limits(self) -> None:
        """
        With C{--max-queue-depth 2 --max-bytes-in-flight 1M} the server
        stops reading often (flow control) yet copies up and down, with
        requests larger than the byte limit, complete without stalling.
        """
        tmp = make_tempdir(self)
        source = random_file(tmp / "source.bin", 16 * MiB, [(4 * MiB, 4 * MiB)])
        image = make_image(tmp / "disk.img", 16 * MiB, b"\xee" * 16 * MiB)
        server = start_server(
            self,
            "--image",
            str(image),
            "--max-queue-depth",
            "2",
            "--max-bytes-in-flight",
            "1M",
        )
        nbdcopy = require_tool("nbdcopy")
        run_tool(
            [nbdcopy, f"--request-size={4 * MiB}", str(tmp / "source.bin"), server.uri],
            timeout=COPY_TIMEOUT,
        )
        assert_file_content(image, source)
        run_tool(
            [nbdcopy, f"--request-size={4 * MiB}", server.uri, str(tmp / "copy.bin")],
            timeout=COPY_TIMEOUT,
        )
        assert_file_content(tmp / "copy.bin", source)

    def test_qemu_img_convert_download(self) -> None:
        """C{qemu-img convert nbd://... out.raw} gets exactly the image's bytes."""
        tmp = make_tempdir(self)
        data = random_file(tmp / "disk.img", COPY_SIZE, self.HOLES)
        server = start_server(self, "--image", str(tmp / "disk.img"))
        run_tool(
            [
                require_tool("qemu-img"),
                "convert",
                "-f",
                "raw",
                "-O",
                "raw",
                server.uri,
                str(tmp / "out.raw"),
            ],
            timeout=COPY_TIMEOUT,
        )
        assert_file_content(tmp / "out.raw", data)

    def test_qemu_img_convert_upload(self) -> None:
        """
        C{qemu-img convert -n src.raw nbd://...} replaces the image's old
        contents exactly: its zeroed ranges must be written (WRITE_ZEROES,
        C-04), not skipped.
        """
        tmp = make_tempdir(self)
        source = random_file(tmp / "source.raw", COPY_SIZE, self.HOLES)
        image = make_image(tmp / "disk.img", COPY_SIZE, b"\xee" * COPY_SIZE)
        server = start_server(self, "--image", str(image))
        run_tool(
            [
                require_tool("qemu-img"),
                "convert",
                "-n",
                "-f",
                "raw",
                "-O",
                "raw",
                str(tmp / "source.raw"),
                server.uri,
            ],
            timeout=COPY_TIMEOUT,
        )
        assert_file_content(image, source)
        server.stop()
        assert_file_content(image, source)
