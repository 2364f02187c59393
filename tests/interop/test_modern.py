"""
The server's "modern" NBD features as real clients see them: structured
replies (OFFSET_DATA and OFFSET_HOLE chunks), the C{base:allocation} meta
context and NBD_CMD_BLOCK_STATUS, CACHE, WRITE_ZEROES with FAST_ZERO and
NO_HOLE, block size constraints, CAN_MULTI_CONN, and sparse copies.

Every test starts its own C{twistd -n nbd} on a free loopback port and
drives Debian's libnbd tools (nbdinfo, nbdcopy), qemu's (qemu-img, qemu-io)
and libnbd's Python binding (under C{/usr/bin/python3}). Rule ids (H-, T-,
C-) and section numbers refer to the protocol digest in the shared docs.

Sparse layouts are compared with what the image file's filesystem reports
through C{SEEK_DATA}/C{SEEK_HOLE}; the tests write data only in whole,
4 KiB-aligned blocks so that ext4 (and tmpfs) report it exactly.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import subprocess
import time
from pathlib import Path
from typing import Any, Sequence

import pytest
from twisted.trial.unittest import SkipTest, SynchronousTestCase

from tests.interop.helpers import (
    REPO_ROOT,
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

KiB = 1024
MiB = 1024 * KiB
#: Reads at least this long send holes as OFFSET_HOLE chunks (the server's
#: twisted_nbd.protocol.SPARSE_READ_MIN, written out here: these tests look at
#: the server from outside).
SPARSE_READ_MIN = 256 * KiB
#: The size of the sparse and copied images.
SIZE = 64 * MiB
#: The default block sizes the server advertises (section 5).
DEFAULT_BLOCK_SIZES = (1, 4096, 32 * MiB)
#: Copying 64 MiB through a Python server is quick, but leave room for CI.
COPY_TIMEOUT = 120.0
#: base:allocation status bits (section 3).
STATE_HOLE = 1
STATE_ZERO = 2

#: Where the sparse test image holds data, as C{(offset, length)} in whole
#: 4 KiB blocks: the first 64 KiB, a run just past a 64 KiB boundary, a
#: second run after a short (8 KiB) hole, a lone block in the middle, and
#: the very last block; everything else is a hole.
DATA_RANGES = [
    (0, 64 * KiB),
    (5 * MiB + 64 * KiB, 192 * KiB),
    (5 * MiB + 264 * KiB, 120 * KiB),
    (20 * MiB + 4 * KiB, 4 * KiB),
    (SIZE - 4 * KiB, 4 * KiB),
]
#: The bytes of data in the sparse test image.
DATA_BYTES = sum(length for _, length in DATA_RANGES)

#: One extent as the tests compare them: C{(offset, length, is_data)}.
Layout = list[tuple[int, int, bool]]


# ------------------------------------------------------------------ images and layouts


def make_sparse_image(
    path: Path, size: int = SIZE, ranges: Sequence[tuple[int, int]] = DATA_RANGES
) -> bytes:
    """
    Create a sparse image of C{size} bytes with random data (no 4 KiB
    block of it all zeroes) at C{ranges} and holes elsewhere; its content.
    """
    content = bytearray(size)
    with open(path, "wb") as f:
        f.truncate(size)
        for offset, length in ranges:
            data = bytearray(os.urandom(length))
            for block in range(0, length, 4096):
                data[block] = 0xA5
            os.pwrite(f.fileno(), data, offset)
            content[offset : offset + length] = data
        os.fsync(f.fileno())
    return bytes(content)


def file_layout(path: Path) -> Layout:
    """The file's data and hole runs, from C{SEEK_DATA}/C{SEEK_HOLE}."""
    size = os.path.getsize(path)
    layout: Layout = []
    fd = os.open(path, os.O_RDONLY)
    try:
        pos = 0
        while pos < size:
            try:
                data = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError as e:
                if e.errno != errno.ENXIO:
                    raise
                data = size
            if data > pos:
                layout.append((pos, data - pos, False))
            if data >= size:
                break
            hole = min(os.lseek(fd, data, os.SEEK_HOLE), size)
            layout.append((data, hole - data, True))
            pos = hole
    finally:
        os.close(fd)
    return layout


def merge(extents: Sequence[tuple[int, int, bool]]) -> Layout:
    """
    Merge neighbouring extents of the same kind, checking that they are
    consecutive from the first one's offset and have nonzero lengths.
    """
    merged: Layout = []
    pos = extents[0][0] if extents else 0
    for offset, length, is_data in extents:
        assert offset == pos, (
            f"extent at {offset} does not follow the one ending at {pos}: {extents}"
        )
        assert length > 0, f"an empty extent at {offset}: {extents}"
        if merged and merged[-1][2] == is_data:
            merged[-1] = (merged[-1][0], merged[-1][1] + length, is_data)
        else:
            merged.append((offset, length, is_data))
        pos += length
    return merged


def ranges_layout(size: int, ranges: Sequence[tuple[int, int]]) -> Layout:
    """The layout of a C{size}-byte image with data exactly at C{ranges}."""
    layout: Layout = []
    pos = 0
    for offset, length in sorted(ranges):
        if offset > pos:
            layout.append((pos, offset - pos, False))
        layout.append((offset, length, True))
        pos = offset + length
    if pos < size:
        layout.append((pos, size - pos, False))
    return merge(layout)


def sparse_layout(path: Path) -> Layout:
    """
    The layout of an image made by L{make_sparse_image}, which the
    filesystem must report exactly (else it cannot take part in these
    tests).
    """
    layout = file_layout(path)
    if layout != ranges_layout(os.path.getsize(path), DATA_RANGES):
        raise SkipTest(f"the filesystem of {path} does not report holes exactly: {layout}")
    return layout


def allocated(path: Path) -> int:
    """The bytes the filesystem allocated for C{path}."""
    return os.stat(path).st_blocks * 512


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(MiB):
            digest.update(chunk)
    return digest.hexdigest()


# ------------------------------------------------------------------ clients


def nbdinfo_json(*args: str) -> dict[str, Any]:
    """Run C{nbdinfo --json ARGS}; the whole JSON document."""
    done = run_tool([require_tool("nbdinfo"), "--json", *args])
    info: dict[str, Any] = json.loads(done.stdout)
    return info


def single_export(info: dict[str, Any]) -> dict[str, Any]:
    exports = info["exports"]
    assert len(exports) == 1, exports
    export: dict[str, Any] = exports[0]
    return export


def block_sizes(export: dict[str, Any]) -> tuple[int, int, int]:
    return (
        export["block_size_minimum"],
        export["block_size_preferred"],
        export["block_size_maximum"],
    )


def qemu_io(uri: str, *commands: str, read_only: bool = False) -> str:
    """
    Run C{qemu-io} on C{uri} with each command as a C{-c}; its output.

    @raise AssertionError: qemu-io failed, or a pattern did not verify.
    """
    argv = [require_tool("qemu-io"), "-f", "raw", *(["-r"] if read_only else []), uri]
    for command in commands:
        argv += ["-c", command]
    done = run_tool(argv)
    output = done.stdout + done.stderr
    for bad in ("Pattern verification failed", "error", "failed"):
        if bad in output:
            raise AssertionError(f"qemu-io reported {bad!r}:\n{output}")
    return output


def client_connections(server: NBDServer) -> int:
    """How many connections have reached transmission so far (the log says)."""
    return sum("uses export" in line for line in server.log_text().splitlines())


def wait_for_connections(server: NBDServer, count: int, timeout: float = 10.0) -> int:
    """Poll the log until it shows C{count} connections; the number it shows."""
    deadline = time.monotonic() + timeout
    while (seen := client_connections(server)) < count and time.monotonic() < deadline:
        time.sleep(0.05)
    return seen


# ------------------------------------------------------------------ 1. nbdinfo


class HandshakeFeatureTests(SynchronousTestCase):
    """What C{nbdinfo --json} learns in the handshake (1.4-1.8, 3, 5)."""

    def test_image_features(self) -> None:
        """
        A writable image export negotiates fixed newstyle and structured
        replies, offers the C{base:allocation} context, advertises the
        default block sizes 1/4096/32M (section 5, NBD_INFO_BLOCK_SIZE) and
        every feature the file backend has: CACHE, DF (only with structured
        replies, H-20), FAST_ZERO (only with WRITE_ZEROES, H-20), FLUSH,
        FUA, TRIM, WRITE_ZEROES and CAN_MULTI_CONN (C-05).
        """
        tmp = make_tempdir(self)
        image = make_image(tmp / "disk.img", 4 * MiB)
        server = start_server(self, "--image", str(image))
        info = nbdinfo_json(server.uri)
        self.assertEqual(info["protocol"], "newstyle-fixed")
        self.assertIs(info["structured"], True)
        self.assertIs(info["TLS"], False)
        export = single_export(info)
        self.assertEqual(export["export-size"], 4 * MiB)
        self.assertIn("base:allocation", export["contexts"])
        self.assertEqual(block_sizes(export), DEFAULT_BLOCK_SIZES)
        self.assertIs(export["is_read_only"], False)
        for flag in (
            "can_cache",
            "can_df",
            "can_fast_zero",
            "can_flush",
            "can_fua",
            "can_multi_conn",
            "can_trim",
            "can_zero",
        ):
            self.assertIs(export[flag], True, flag)

    def test_read_only_features(self) -> None:
        """
        With C{--read-only} no writing feature is advertised (H-20): no FUA,
        TRIM, WRITE_ZEROES or FAST_ZERO; structured replies, the
        C{base:allocation} context, CACHE, DF, CAN_MULTI_CONN and the block
        sizes stay.
        """
        tmp = make_tempdir(self)
        image = make_image(tmp / "disk.img", 4 * MiB)
        server = start_server(self, "--image", str(image), "--read-only")
        info = nbdinfo_json(server.uri)
        self.assertIs(info["structured"], True)
        export = single_export(info)
        self.assertIs(export["is_read_only"], True)
        self.assertIn("base:allocation", export["contexts"])
        for flag in ("can_fua", "can_trim", "can_zero", "can_fast_zero"):
            self.assertIs(export[flag], False, flag)
        for flag in ("can_cache", "can_df", "can_multi_conn"):
            self.assertIs(export[flag], True, flag)
        self.assertEqual(block_sizes(export), DEFAULT_BLOCK_SIZES)


# ------------------------------------------------------------------ 2. multi-conn


#: nbdcopy opens at most one connection per thread, and its default number
#: of threads is the number of CPUs: ask for four of each.
PARALLEL = ("--threads=4", "--connections=4", "--requests=64")


class MultiConnTests(SynchronousTestCase):
    """Several connections to one export at once (C-05)."""

    def test_nbdcopy_four_connections(self) -> None:
        """
        C{nbdcopy --connections=4 --requests=64} (and C{--threads=4}) copies 64 MiB of random
        data up (file to NBD, with a FLUSH) and down (NBD to file) exactly:
        the server advertises CAN_MULTI_CONN, so writes on one connection
        are visible on the others and a FLUSH on any of them covers them
        all (C-05), with many requests in flight on each (C-01). The log
        shows that nbdcopy did open several connections each way.
        """
        nbdcopy = require_tool("nbdcopy")
        tmp = make_tempdir(self)
        source = tmp / "source.bin"
        source.write_bytes(os.urandom(SIZE))
        image = make_image(tmp / "disk.img", SIZE, b"\xee" * MiB)
        server = start_server(self, "--image", str(image))
        self.assertIs(single_export(nbdinfo_json(server.uri))["can_multi_conn"], True)

        before = wait_for_connections(server, 1)
        run_tool(
            [nbdcopy, *PARALLEL, "--flush", str(source), server.uri],
            timeout=COPY_TIMEOUT,
        )
        self.assertGreaterEqual(wait_for_connections(server, before + 4) - before, 4)
        self.assertEqual(file_sha256(image), file_sha256(source))

        before = wait_for_connections(server, before + 4)
        run_tool(
            [nbdcopy, *PARALLEL, server.uri, str(tmp / "copy.bin")],
            timeout=COPY_TIMEOUT,
        )
        self.assertGreaterEqual(wait_for_connections(server, before + 4) - before, 4)
        self.assertEqual(file_sha256(tmp / "copy.bin"), file_sha256(source))


# ------------------------------------------------------------------ 3. maps


def nbdinfo_map(uri: str) -> tuple[Layout, Layout]:
    """
    C{nbdinfo --map} and C{nbdinfo --map --json} of C{uri}, each as a
    merged layout; every extent is data (type 0) or a hole that reads as
    zeroes (type 3).
    """
    nbdinfo = require_tool("nbdinfo")
    text = run_tool([nbdinfo, "--map", uri]).stdout
    from_text: list[tuple[int, int, int]] = []
    for line in text.splitlines():
        fields = line.split(None, 3)
        from_text.append((int(fields[0]), int(fields[1]), int(fields[2])))
    from_json: list[tuple[int, int, int]] = [
        (e["offset"], e["length"], e["type"])
        for e in json.loads(run_tool([nbdinfo, "--map", "--json", uri]).stdout)
    ]
    for extents in (from_text, from_json):
        for start, _, kind in extents:
            assert kind in (0, STATE_HOLE | STATE_ZERO), f"extent type at {start}: {extents}"
    return (
        merge([(o, n, not t & STATE_HOLE) for o, n, t in from_text]),
        merge([(o, n, not t & STATE_HOLE) for o, n, t in from_json]),
    )


def qemu_img_map(uri: str) -> Layout:
    """C{qemu-img map --output=json} of C{uri} as a merged layout."""
    done = run_tool([require_tool("qemu-img"), "map", "--output=json", "-f", "raw", uri])
    extents = json.loads(done.stdout)
    for e in extents:
        # Holes read as zeroes; the data here is never known to be zeroes.
        assert e["zero"] is (not e["data"]), f"extent {e} in {extents}"
    return merge([(e["start"], e["length"], e["data"]) for e in extents])


class MapTests(SynchronousTestCase):
    """Block status (T-17, section 3) as the mapping tools see it."""

    def test_file_layout(self) -> None:
        """
        C{nbdinfo --map} (text and JSON) and C{qemu-img map} of a sparse
        image agree with the file's own layout (SEEK_DATA/SEEK_HOLE): its
        data runs are data and its holes are C{hole,zero} (qemu: C{"data":
        false, "zero": true}), down to a lone 4 KiB block, an 8 KiB hole
        and the image's last block.
        """
        tmp = make_tempdir(self)
        image = tmp / "sparse.img"
        make_sparse_image(image)
        layout = sparse_layout(image)
        server = start_server(self, "--image", str(image), "--read-only")
        from_text, from_json = nbdinfo_map(server.uri)
        self.assertEqual(from_text, layout)
        self.assertEqual(from_json, layout)
        self.assertEqual(qemu_img_map(server.uri), layout)

    def test_memory_layout(self) -> None:
        """
        A C{--memory} export reports its page map: only the 64 KiB pages
        that clients wrote to are data, the rest are holes that read as
        zeroes.
        """
        server = start_server(self, "--memory", "16M")
        page = 64 * KiB
        qemu_io(
            server.uri,
            f"write -P 0x11 {3 * page + 10} 100",
            f"write -P 0x22 {8 * MiB - 1} 2",
            f"write -P 0x33 {16 * MiB - 1} 1",
        )
        expected = ranges_layout(
            16 * MiB, [(3 * page, page), (8 * MiB - page, 2 * page), (16 * MiB - page, page)]
        )
        from_text, from_json = nbdinfo_map(server.uri)
        self.assertEqual(from_text, expected)
        self.assertEqual(from_json, expected)
        self.assertEqual(qemu_img_map(server.uri), expected)


# ------------------------------------------------------------------ 4. sparse copies


class SparseCopyTests(SynchronousTestCase):
    """nbdcopy keeps holes holes, through block status and WRITE_ZEROES."""

    def test_nbd_to_nbd(self) -> None:
        """
        C{nbdcopy nbd://src nbd://dst} from a sparse image into a fresh
        sparse image on a second server copies the content exactly and
        leaves the destination sparse: the holes, found with block status
        (T-17), are skipped or zeroed with WRITE_ZEROES that may punch
        holes (no NO_HOLE, C-04), never written as data. Copied again with
        C{--allocated}, nbdcopy zeroes the holes with NO_HOLE, and the
        destination becomes fully allocated (C-04) with the same content.
        """
        nbdcopy = require_tool("nbdcopy")
        tmp = make_tempdir(self)
        content = make_sparse_image(tmp / "src.img")
        sparse_layout(tmp / "src.img")
        dst = make_image(tmp / "dst.img", SIZE)
        src_server = start_server(self, "--image", str(tmp / "src.img"), "--read-only")
        dst_server = start_server(self, "--image", str(dst))
        run_tool([nbdcopy, "--flush", src_server.uri, dst_server.uri], timeout=COPY_TIMEOUT)
        assert_file_content(dst, content)
        self.assertLessEqual(allocated(dst), DATA_BYTES + MiB, f"{allocated(dst)} bytes allocated")

        run_tool(
            [nbdcopy, "--allocated", "--flush", src_server.uri, dst_server.uri],
            timeout=COPY_TIMEOUT,
        )
        assert_file_content(dst, content)
        self.assertGreaterEqual(allocated(dst), SIZE)

    def test_file_to_nbd_over_data(self) -> None:
        """
        C{nbdcopy FILE nbd://...} from a sparse file onto an image full of
        old data zeroes the holes with WRITE_ZEROES (C-04): the content is
        exact, and since nbdcopy does not ask for NO_HOLE the server punches
        the holes, so the image ends up sparse.
        """
        nbdcopy = require_tool("nbdcopy")
        tmp = make_tempdir(self)
        content = make_sparse_image(tmp / "src.img")
        sparse_layout(tmp / "src.img")
        dst = make_image(tmp / "dst.img", SIZE, b"\xee" * SIZE)
        server = start_server(self, "--image", str(dst))
        run_tool([nbdcopy, "--flush", str(tmp / "src.img"), server.uri], timeout=COPY_TIMEOUT)
        assert_file_content(dst, content)
        self.assertLessEqual(allocated(dst), DATA_BYTES + MiB, f"{allocated(dst)} bytes allocated")

    def test_nbd_to_file(self) -> None:
        """
        C{nbdcopy nbd://... FILE} into a sparse local file makes a sparse
        copy with the source's layout (block status tells nbdcopy where the
        holes are, T-17) and exactly its content; with C{--allocated} the
        copy is exact too. (How much of a local file nbdcopy 1.14 then
        allocates is its own business: on ext4 it leaves the holes, even
        copying from a local file, so that is not checked.)
        """
        nbdcopy = require_tool("nbdcopy")
        tmp = make_tempdir(self)
        content = make_sparse_image(tmp / "src.img")
        layout = sparse_layout(tmp / "src.img")
        server = start_server(self, "--image", str(tmp / "src.img"), "--read-only")
        sparse = make_image(tmp / "sparse.bin", SIZE)
        run_tool([nbdcopy, server.uri, str(sparse)], timeout=COPY_TIMEOUT)
        assert_file_content(sparse, content)
        self.assertLessEqual(allocated(sparse), DATA_BYTES + MiB, f"{allocated(sparse)} allocated")
        self.assertEqual(file_layout(sparse), layout)

        full = make_image(tmp / "full.bin", SIZE)
        run_tool([nbdcopy, "--allocated", server.uri, str(full)], timeout=COPY_TIMEOUT)
        assert_file_content(full, content)


# ------------------------------------------------------------------ 5. libnbd reads

# Shared by the scripts, which run under the interpreter that has libnbd and
# print their findings as JSON on their last line.
_PRELUDE = """
import hashlib, json, sys
import nbd

def errnum(call, *args):
    try:
        call(*args)
    except nbd.Error as e:
        return e.errnum
    return 0

def connect(uri):
    h = nbd.NBD()
    h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    h.set_strict_mode(0)  # let the server judge what is out of range
    h.connect_uri(uri)
    return h

def status(h, count, offset, flags=0):
    calls = []
    def extent(context, off, entries, err):
        calls.append([context, off, list(entries)])
        return 0
    h.block_status(count, offset, extent, flags)
    return calls
"""

STRUCTURED_READ_SCRIPT = (
    _PRELUDE
    + """
h = connect(sys.argv[1])
out = {
    "structured": h.get_structured_replies_negotiated(),
    "base_allocation": h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION),
    "reads": [],
}
for offset, count, flags in json.loads(sys.argv[2]):
    chunks = []
    def chunk(buf, off, status, err):
        buf = bytes(buf)
        chunks.append([off, len(buf), status, hashlib.sha256(buf).hexdigest()])
        return 0
    data = h.pread_structured(count, offset, chunk, flags)
    plain = h.pread(count, offset)
    out["reads"].append({
        "chunks": chunks,
        "sha256": hashlib.sha256(data).hexdigest(),
        "plain_sha256": hashlib.sha256(plain).hexdigest(),
    })
h.shutdown()
print(json.dumps(out))
"""
)

BLOCK_STATUS_SCRIPT = (
    _PRELUDE
    + """
h = connect(sys.argv[1])
size = h.get_size()
out = {"size": size}
# The whole export, in requests whose length is only a hint.
walk, pos = [], 0
while pos < size:
    calls = status(h, min(size - pos, 16 << 20), pos)
    walk.append(calls)
    entries = [c for c in calls if c[0] == "base:allocation"][0][2]
    pos += sum(entries[0::2])
out["walk"] = walk
out["req_one"] = [
    [offset, count, status(h, count, offset, nbd.CMD_FLAG_REQ_ONE)]
    for offset, count in json.loads(sys.argv[2])
]
out["last_byte"] = status(h, 1, size - 1)
out["last_byte_one"] = status(h, 1, size - 1, nbd.CMD_FLAG_REQ_ONE)
out["past_end"] = errnum(status, h, 4096, size)
out["straddling"] = errnum(status, h, 8192, size - 4096)
out["far"] = errnum(status, h, 4096, 2**62)
# The connection survives the errors.
out["tail"] = hashlib.sha256(h.pread(4096, size - 4096)).hexdigest()
h.shutdown()
print(json.dumps(out))
"""
)

#: libnbd's chunk statuses (nbd.READ_DATA, nbd.READ_HOLE) and flags.
READ_DATA = 1
READ_HOLE = 2
CMD_FLAG_DF = 4
CMD_FLAG_NO_HOLE = 2
CMD_FLAG_FAST_ZERO = 16


class LibnbdSparseTests(SynchronousTestCase):
    """Structured reads and block status through libnbd's Python binding."""

    def setUp(self) -> None:
        tmp = make_tempdir(self)
        self.image = tmp / "sparse.img"
        self.content = make_sparse_image(self.image)
        self.layout = sparse_layout(self.image)
        self.server = start_server(self, "--image", str(self.image), "--read-only", workdir=tmp)

    def test_structured_reads(self) -> None:
        """
        Reads that span holes return exactly the file's bytes, zeroes for
        the holes (T-15). The chunks cover the range without overlap or
        empty chunks (T-14); in reads of 256 KiB and more (where the server
        looks for holes) every hole of 4 KiB or more (the 8 KiB one too)
        comes as OFFSET_HOLE chunks and all data as OFFSET_DATA chunks;
        smaller reads may send holes as data. With DF a 64 KiB read gets a
        single chunk (T-16).
        """
        reads = [
            # hole, data, the 8 KiB hole, data, hole
            (4 * MiB + 512 * KiB, MiB + 512 * KiB, 0),
            # the first data run and the hole after it
            (0, 128 * KiB, 0),
            (0, 256 * KiB, 0),
            # the lone block in a hole, at an odd offset and length
            (20 * MiB - 12345, 64 * KiB + 7, 0),
            # the hole before the last block, and the last block
            (SIZE - 256 * KiB, 256 * KiB, 0),
            # a maximum-size read
            (0, 32 * MiB, 0),
            # DF, across a hole and data: one chunk
            (5 * MiB + 32 * KiB, 64 * KiB, CMD_FLAG_DF),
        ]
        out = run_libnbd(STRUCTURED_READ_SCRIPT, self.server.uri, json.dumps(reads))
        self.assertIs(out["structured"], True)
        self.assertIs(out["base_allocation"], True)
        for (offset, count, flags), got in zip(reads, out["reads"], strict=True):
            expected = self.content[offset : offset + count]
            where = f"read of {count} at {offset}"
            self.assertEqual(got["sha256"], sha256(expected), where)
            self.assertEqual(got["plain_sha256"], sha256(expected), where)
            chunks = sorted(got["chunks"])
            pos = offset
            for start, length, status, digest in chunks:
                self.assertEqual(start, pos, f"{where}: chunks {chunks}")
                self.assertGreater(length, 0, f"{where}: chunks {chunks}")
                self.assertIn(status, (READ_DATA, READ_HOLE), f"{where}: chunks {chunks}")
                self.assertEqual(digest, sha256(self.content[start : start + length]), where)
                pos += length
            self.assertEqual(pos, offset + count, f"{where}: chunks {chunks}")
            if flags & CMD_FLAG_DF:
                self.assertEqual(len(chunks), 1, f"{where} with DF: chunks {chunks}")
                continue
            if count < SPARSE_READ_MIN:
                continue
            holes = [
                (s, n)
                for s, n, d in merge([(s, n, st == READ_DATA) for s, n, st, _ in chunks])
                if not d
            ]
            expected_holes = []
            for start, length, is_data in self.layout:
                lo, hi = max(start, offset), min(start + length, offset + count)
                if not is_data and hi - lo >= 4096:
                    expected_holes.append((lo, hi - lo))
            self.assertEqual(holes, expected_holes, f"{where}: chunks {chunks}")

    def test_block_status(self) -> None:
        """
        NBD_CMD_BLOCK_STATUS on C{base:allocation} (T-17, section 3):
        walking the export gives one context per reply, extents that are
        consecutive and nonzero and agree with the file's layout, holes
        flagged HOLE|ZERO and data 0. REQ_ONE gets exactly one extent, no
        longer than asked and of the right kind. The very last byte has a
        status; requests past or straddling the end get EINVAL (T-06) and
        the connection keeps working.
        """
        req_one = [
            (0, 1),  # data, one byte
            (0, MiB),  # data, then a hole
            (64 * KiB, 4096),  # a hole, exactly one block
            (MiB + 3, 100),  # inside a hole, unaligned
            (5 * MiB + 256 * KiB, 32 * KiB),  # the 8 KiB hole, then data
            (20 * MiB, 16 * MiB),  # a hole, then the lone block
            (SIZE - 8 * KiB, 8 * KiB),  # the hole before the last block
        ]
        out = run_libnbd(BLOCK_STATUS_SCRIPT, self.server.uri, json.dumps(req_one))
        self.assertEqual(out["size"], SIZE)

        extents = []
        pos = 0
        for calls in out["walk"]:
            self.assertEqual([c[0] for c in calls], ["base:allocation"], calls)
            _, offset, entries = calls[0]
            self.assertEqual(offset, pos)
            for length, flags in zip(entries[0::2], entries[1::2], strict=True):
                self.assertIn(flags, (0, STATE_HOLE | STATE_ZERO), entries)
                extents.append((pos, length, flags == 0))
                pos += length
        self.assertEqual(merge(extents), self.layout)

        for offset, count, calls in out["req_one"]:
            where = f"REQ_ONE of {count} at {offset}: {calls}"
            self.assertEqual(len(calls), 1, where)
            _, start, entries = calls[0]
            self.assertEqual(start, offset, where)
            self.assertEqual(len(entries), 2, where)
            length, flags = entries
            self.assertTrue(0 < length <= count, where)
            self.assertEqual(self._kind_at(offset, length), flags == 0, where)

        for key in ("last_byte", "last_byte_one"):
            calls = out[key]
            self.assertEqual(len(calls), 1, calls)
            _, start, entries = calls[0]
            self.assertEqual((start, entries), (SIZE - 1, [1, 0]), f"{key}: {calls}")

        self.assertEqual(out["past_end"], errno.EINVAL)
        self.assertEqual(out["straddling"], errno.EINVAL)
        self.assertEqual(out["far"], errno.EINVAL)
        self.assertEqual(out["tail"], sha256(self.content[-4096:]))

    def _kind_at(self, offset: int, length: int) -> bool:
        """Whether C{[offset, offset + length)} is data (else a hole); it must be one kind."""
        for start, run, is_data in self.layout:
            if start <= offset < start + run:
                self.assertLessEqual(
                    offset + length, start + run, f"{offset}+{length} crosses {start}+{run}"
                )
                return is_data
        raise AssertionError(f"offset {offset} beyond the layout")


# ------------------------------------------------------------------ 6. CACHE, FAST_ZERO, NO_HOLE


CACHE_AND_ZERO_SCRIPT = (
    _PRELUDE
    + """
h = connect(sys.argv[1])
size = h.get_size()
out = {"can_cache": h.can_cache(), "can_fast_zero": h.can_fast_zero()}
out["cache"] = errnum(h.cache, 1 << 20, 12345)
out["cache_all"] = errnum(h.cache, size, 0)
out["cache_tail"] = errnum(h.cache, 1, size - 1)
results = []
for offset, count, flags in json.loads(sys.argv[2]):
    e = errnum(h.zero, count, offset, flags)
    results.append([offset, count, e, hashlib.sha256(h.pread(count, offset)).hexdigest()])
out["zero"] = results
h.flush()
h.shutdown()
print(json.dumps(out))
"""
)


class CacheAndZeroTests(SynchronousTestCase):
    """NBD_CMD_CACHE, and WRITE_ZEROES with FAST_ZERO and NO_HOLE."""

    def _cache_and_fast_zero(self, uri: str, content: bytes, must_succeed: bool) -> bytes:
        """
        CACHE (of a range, of everything, of the last byte) succeeds; each
        FAST_ZERO request either succeeds and reads back zeroes, or fails
        with ENOTSUP (the only use of ENOTSUP, T-18) leaving the data as it
        was. The content afterwards.
        """
        zeroes = [
            (MiB, 256 * KiB, CMD_FLAG_FAST_ZERO),
            (2 * MiB + 1, 5000, CMD_FLAG_FAST_ZERO),
            (3 * MiB, 64 * KiB, CMD_FLAG_FAST_ZERO | CMD_FLAG_NO_HOLE),
        ]
        out = run_libnbd(CACHE_AND_ZERO_SCRIPT, uri, json.dumps(zeroes))
        self.assertEqual((out["can_cache"], out["can_fast_zero"]), (True, True))
        self.assertEqual((out["cache"], out["cache_all"], out["cache_tail"]), (0, 0, 0))
        after = bytearray(content)
        for offset, count, error, digest in out["zero"]:
            where = f"FAST_ZERO of {count} at {offset}"
            if must_succeed:
                self.assertEqual(error, 0, where)
            self.assertIn(error, (0, errno.ENOTSUP), where)
            if error == 0:
                self.assertEqual(digest, sha256(bytes(count)), where)
                after[offset : offset + count] = bytes(count)
            else:
                self.assertEqual(digest, sha256(content[offset : offset + count]), where)
        return bytes(after)

    def test_file_backend(self) -> None:
        """
        On an image file CACHE succeeds, and FAST_ZERO succeeds with and
        without NO_HOLE (ext4 zeroes ranges quickly). WRITE_ZEROES with
        NO_HOLE leaves its range allocated (C-04): zeroing 1 MiB of a hole
        and 1 MiB of data adds at least 1 MiB of allocated blocks (ext4's
        ZERO_RANGE leaves unwritten extents, which SEEK_DATA may call a
        hole, so C{st_blocks} is the measure), and both read back as
        zeroes, through NBD and in the file.
        """
        tmp = make_tempdir(self)
        content = b"\xff" * (4 * MiB) + bytes(4 * MiB)
        image = make_image(tmp / "disk.img", 8 * MiB, content[: 4 * MiB])
        server = start_server(self, "--image", str(image))
        expected = bytearray(self._cache_and_fast_zero(server.uri, content, True))
        assert_file_content(image, bytes(expected))

        before = allocated(image)
        zeroes = [(5 * MiB, MiB, CMD_FLAG_NO_HOLE), (2 * MiB + 512 * KiB, MiB, CMD_FLAG_NO_HOLE)]
        out = run_libnbd(CACHE_AND_ZERO_SCRIPT, server.uri, json.dumps(zeroes))
        for offset, count, error, digest in out["zero"]:
            self.assertEqual((error, digest), (0, sha256(bytes(count))), f"zero at {offset}")
            expected[offset : offset + count] = bytes(count)
        self.assertGreaterEqual(allocated(image) - before, MiB, f"{before} bytes before")
        assert_file_content(image, bytes(expected))

    def test_memory_backend(self) -> None:
        """
        On a C{--memory} export CACHE succeeds and FAST_ZERO either
        succeeds or fails with ENOTSUP leaving the data (T-18); a new
        connection reads what the first one left.
        """
        server = start_server(self, "--memory", "8M")
        qemu_io(server.uri, "write -P 0xff 0 4M")
        content = b"\xff" * (4 * MiB) + bytes(4 * MiB)
        expected = self._cache_and_fast_zero(server.uri, content, False)
        out = run_libnbd(STRUCTURED_READ_SCRIPT, server.uri, json.dumps([[0, 8 * MiB, 0]]))
        self.assertEqual(out["reads"][0]["sha256"], sha256(expected))


# ------------------------------------------------------------------ 7. config files and block sizes


def run_twistd(case: SynchronousTestCase, *args: str) -> subprocess.CompletedProcess[str]:
    """
    Run C{twistd -n nbd ARGS} to completion (for arguments it must refuse);
    it would listen on an ephemeral loopback port if it started after all.
    """
    server = NBDServer(args, make_tempdir(case))
    path = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return run_tool(
        server.command(0), timeout=30.0, check=False, env={**os.environ, "PYTHONPATH": path}
    )


CONFIG = """\
# Three exports for the interop tests.
default = "disk"

[[export]]
name = "disk"
image = "disk.img"          # relative to this file
description = "the system disk"

[[export]]
name = "scratch"
memory = "16M"
description = "a RAM disk"

[[export]]
name = "iso"
image = "iso.img"
read-only = true
description = "a read-only image"
min-block = 512
max-block = "1M"
"""

UNKNOWN_THEN_GO_SCRIPT = (
    _PRELUDE
    + """
h = nbd.NBD()
h.set_opt_mode(True)
h.connect_uri(sys.argv[1])
h.set_export_name("nosuch")
out = {"go_unknown": errnum(h.opt_go)}
# Same connection, still haggling (H-13): now a real export.
h.set_export_name("scratch")
h.opt_go()
out["size"] = h.get_size()
h.pwrite(b"\\x5a" * 4096, 8192)
out["read"] = h.pread(4096, 8192) == b"\\x5a" * 4096
h.shutdown()
print(json.dumps(out))
"""
)

BLOCK_SIZE_SCRIPT = (
    _PRELUDE
    + """
h = connect(sys.argv[1])
out = {
    "sizes": [
        h.get_block_size(nbd.SIZE_MINIMUM),
        h.get_block_size(nbd.SIZE_PREFERRED),
        h.get_block_size(nbd.SIZE_MAXIMUM),
    ],
    "read_offset": errnum(h.pread, 512, 100),
    "read_length": errnum(h.pread, 100, 0),
    "write_offset": errnum(h.pwrite, b"\\x55" * 512, 1000),
    "write_length": errnum(h.pwrite, b"\\x55" * 1000, 512),
    "zero": errnum(h.zero, 100, 4096),
    "trim": errnum(h.trim, 4096, 4097),
    "cache": errnum(h.cache, 100, 0),
    "status": errnum(status, h, 4096, 1),
    "read_over_max": errnum(h.pread, 2 << 20, 0),
    "write_over_max": errnum(h.pwrite, b"\\x66" * (2 << 20), 0),
}
# The connection survives all that: aligned requests up to the maximum work.
h.pwrite(b"\\x77" * (1 << 20), 512)
out["aligned"] = h.pread(1 << 20, 512) == b"\\x77" * (1 << 20)
h.flush()
h.shutdown()
print(json.dumps(out))
"""
)


class ConfigTests(SynchronousTestCase):
    """Several exports from C{--config FILE}, and block size options."""

    def test_three_exports(self) -> None:
        """
        A config file with an image, a RAM disk and a read-only image
        (with its own block sizes) serves all three: C{nbdinfo --list}
        (NBD_OPT_LIST, then INFO per export) shows their names,
        descriptions, sizes and flags; each answers to its name, and the
        empty name gets the C{default} one. An unknown name fails cleanly
        (NBD_REP_ERR_UNKNOWN, H-13), on its own connection and on one that
        goes on to a real export, and the server keeps serving.
        """
        tmp = make_tempdir(self)
        make_image(tmp / "disk.img", 8 * MiB)
        make_image(tmp / "iso.img", 2 * MiB, b"\x42" * 4096)
        (tmp / "exports.toml").write_text(CONFIG)
        server = start_server(self, "--config", str(tmp / "exports.toml"))
        nbdinfo = require_tool("nbdinfo")

        info = json.loads(run_tool([nbdinfo, "--list", "--json", server.uri]).stdout)
        exports = {e["export-name"]: e for e in info["exports"]}
        self.assertEqual(
            {name: (e.get("description"), e["export-size"]) for name, e in exports.items()},
            {
                "disk": ("the system disk", 8 * MiB),
                "scratch": ("a RAM disk", 16 * MiB),
                "iso": ("a read-only image", 2 * MiB),
            },
        )
        self.assertEqual(
            {name: e["is_read_only"] for name, e in exports.items()},
            {"disk": False, "scratch": False, "iso": True},
        )
        self.assertEqual(block_sizes(exports["disk"]), DEFAULT_BLOCK_SIZES)
        self.assertEqual(block_sizes(exports["scratch"]), DEFAULT_BLOCK_SIZES)
        self.assertEqual(block_sizes(exports["iso"]), (512, 4096, MiB))
        for e in exports.values():
            self.assertIn("base:allocation", e["contexts"])

        for name, size in (
            ("disk", 8 * MiB),
            ("scratch", 16 * MiB),
            ("iso", 2 * MiB),
            ("", 8 * MiB),
        ):
            export = single_export(nbdinfo_json(f"{server.uri}/{name}"))
            self.assertEqual(export["export-size"], size, name)
        qemu_io(f"{server.uri}/iso", "read -P 0x42 0 4k", "read -P 0 4k 1020k", read_only=True)

        done = run_tool([nbdinfo, f"{server.uri}/nosuch"], check=False)
        self.assertNotEqual(done.returncode, 0, done.stdout)
        self.assertIn("nosuch", done.stderr)
        self.assertNotIn("Traceback", done.stderr)
        out = run_libnbd(UNKNOWN_THEN_GO_SCRIPT, server.uri)
        self.assertNotEqual(out["go_unknown"], 0)
        self.assertEqual((out["size"], out["read"]), (16 * MiB, True))
        self.assertTrue(server.alive())
        self.assertEqual(single_export(nbdinfo_json(f"{server.uri}/disk"))["export-size"], 8 * MiB)

    def _refused(self, config: Path, line: int) -> str:
        """
        twistd refuses C{config}: it exits non-zero, with no traceback, and
        its last line names the file and C{line}; that line.
        """
        done = run_twistd(self, "--config", str(config))
        output = done.stdout + done.stderr
        self.assertNotEqual(done.returncode, 0, output)
        self.assertNotIn("Traceback", output)
        lines = [text for text in output.splitlines() if text.strip()]
        naming = [text for text in lines if config.name in text]
        self.assertEqual(len(naming), 1, output)
        self.assertEqual(naming[0], lines[-1], output)
        self.assertRegex(naming[0], rf"{re.escape(str(config))}:{line}: \S", output)
        return naming[0]

    def test_syntax_error(self) -> None:
        """
        A config file that is not valid TOML stops twistd with one line
        naming the file and the line of the mistake.
        """
        tmp = make_tempdir(self)
        config = tmp / "broken.toml"
        config.write_text('default = "disk"\n\n[[export]]\nname = "disk"\nimage = "disk.img\n')
        self._refused(config, 5)

    def test_missing_image(self) -> None:
        """
        A config file whose export names an image that does not exist (and
        gives no size to create it) stops twistd with one line naming the
        file, the line of the export's image and the missing path.
        """
        tmp = make_tempdir(self)
        config = tmp / "exports.toml"
        config.write_text(
            'default = "disk"\n\n[[export]]\nname = "disk"\nimage = "missing.img"\n'
            'description = "not there"\n'
        )
        line = self._refused(config, 5)
        self.assertIn("missing.img", line)

    def test_block_size_options(self) -> None:
        """
        C{--min-block 512 --max-block 1M} are advertised in
        NBD_INFO_BLOCK_SIZE (section 5), as nbdinfo and libnbd see. With
        libnbd's strict mode off, READ, WRITE, WRITE_ZEROES, TRIM, CACHE and
        BLOCK_STATUS not aligned to 512 bytes get EINVAL (T-07), as do a
        READ and a WRITE of 2 MiB (over the maximum payload; the WRITE's
        payload is drained, T-05, T-10); none of them changes the image or
        ends the connection, which then reads and writes 1 MiB aligned.
        qemu-io, which obeys the constraints, writes unaligned ranges
        (read-modify-write) and reads them back.
        """
        tmp = make_tempdir(self)
        image = make_image(tmp / "disk.img", 8 * MiB, b"\xaa" * (4 * MiB))
        server = start_server(
            self, "--image", str(image), "--min-block", "512", "--max-block", "1M"
        )
        export = single_export(nbdinfo_json(server.uri))
        self.assertEqual(block_sizes(export), (512, 4096, MiB))

        out = run_libnbd(BLOCK_SIZE_SCRIPT, server.uri)
        self.assertEqual(out.pop("sizes"), [512, 4096, MiB])
        self.assertIs(out.pop("aligned"), True)
        self.assertEqual(out, {key: errno.EINVAL for key in out})
        expected = bytearray(b"\xaa" * (4 * MiB) + bytes(4 * MiB))
        expected[512 : 512 + MiB] = b"\x77" * MiB
        assert_file_content(image, bytes(expected))

        qemu_io(
            server.uri,
            "write -P 0x33 1000 3000",
            f"write -P 0x44 {5 * MiB + 7} {3 * MiB - 7}",
            "read -P 0x33 1000 3000",
            f"read -P 0x44 {5 * MiB + 7} {3 * MiB - 7}",
        )
        expected[1000:4000] = b"\x33" * 3000
        expected[5 * MiB + 7 :] = b"\x44" * (3 * MiB - 7)
        assert_file_content(image, bytes(expected))
