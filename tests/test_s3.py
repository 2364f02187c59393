# -*- test-case-name: tests.test_s3 -*-
"""
Tests for the logic of L{twisted_nbd.backends.s3} against an in-process
fake: the conformance tests, per-object locking of read-modify-write,
sparseness, the listing cache, opening, error mapping, and the treq
transport's retries against a local C{twisted.web} server. The backend
against a real S3 gateway (radosgw) is tested in
C{tests/interop/test_s3.py}.
"""

from __future__ import annotations

import json
from typing import Any, TypeVar, cast

from botocore.credentials import Credentials  # type: ignore[import-untyped]
from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.task import Clock
from twisted.logger import ILogObserver, LogEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web import resource, server

from tests.s3fake import FakeS3
from twisted_nbd._wire import Errno
from twisted_nbd.backends.s3 import (
    META_NAME,
    ImageInfo,
    S3Config,
    S3Device,
    S3Error,
    S3Response,
    Signer,
    TreqTransport,
    plugin,
)
from twisted_nbd.errors import NBDError
from twisted_nbd.interfaces import STATE_HOLE, STATE_ZERO, Extent, IBlockDevice
from twisted_nbd.registry import PluginRef, registry
from twisted_nbd.testing import BlockDeviceConformanceMixin

KiB = 1024
MiB = 1024 * 1024
HOLE = STATE_HOLE | STATE_ZERO
OBJECT = 64 * KiB


_E = TypeVar("_E", bound=BaseException)


async def failed(d: Deferred[Any], kind: type[_E]) -> _E:
    """The exception C{d} fails with, which must be a C{kind}."""
    try:
        result = await d
    except kind as e:
        return e
    raise AssertionError(f"expected {kind.__name__}, got the result {result!r}")


def device(fake: FakeS3, size: int = 4 * MiB, object_size: int = OBJECT) -> S3Device:
    return S3Device(fake, S3Config("b", "img/"), ImageInfo(size, object_size))


class FakeConformanceTests(BlockDeviceConformanceMixin, TestCase):
    """The conformance tests, on 64 KiB objects in the fake."""

    def make_device(self, size: int) -> Deferred[IBlockDevice]:
        return S3Device.open(
            FakeS3(), S3Config("b", "img/", size=size, object_size=OBJECT)
        ).addCallback(lambda d: cast(IBlockDevice, d))


class LockingTests(TestCase):
    """Read-modify-write holds the object's lock: no write is lost."""

    async def test_concurrent_partial_writes(self) -> None:
        """
        Sixteen writes to different parts of one object, all in flight
        together, each reading the object before writing it back: with the
        lock they run one at a time and every one's bytes survive.
        """
        fake = FakeS3(hold={"GET", "PUT"})
        dev = device(fake)
        writes = [dev.write(i * 4 * KiB + 100, bytes([i + 1]) * 3000) for i in range(16)]
        while fake.held:
            fake.release_all()
        await gatherResults(writes)
        self.assertEqual(fake.most_in_flight["img/0000000000000000"], 1)
        data = fake.objects["img/0000000000000000"]
        for i in range(16):
            self.assertEqual(data[i * 4 * KiB + 100 : i * 4 * KiB + 3100], bytes([i + 1]) * 3000)
        self.assertEqual(dev._locks, {})

    async def test_whole_write_waits_for_patch(self) -> None:
        """
        A whole-object write that arrives while a partial write of that
        object is reading it lands after it, so the later write wins.
        """
        fake = FakeS3(hold={"GET"})
        dev = device(fake)
        first = dev.write(10, b"x" * 10)
        second = dev.write(0, b"y" * OBJECT)
        self.assertEqual([h.method for h in fake.held], ["GET"])
        fake.release_all()
        await gatherResults([first, second])
        self.assertEqual(fake.objects["img/0000000000000000"], b"y" * OBJECT)

    async def test_write_spanning_objects(self) -> None:
        """A write across three objects: one whole PUT, two read-modify-writes."""
        fake = FakeS3()
        dev = device(fake)
        await dev.write(OBJECT - 10, b"z" * (OBJECT + 20))
        self.assertEqual(fake.log.count(("PUT", "img/0000000000000001")), 1)
        self.assertNotIn(("GET", "img/0000000000000001"), fake.log)
        self.assertEqual(
            await dev.read(OBJECT - 12, OBJECT + 24), b"\0\0" + b"z" * (OBJECT + 20) + b"\0\0"
        )


class SparseTests(TestCase):
    """Missing objects read as zeroes; zeroing whole objects deletes them."""

    async def test_missing_reads_zeroes(self) -> None:
        fake = FakeS3()
        self.assertEqual(await device(fake).read(100, 3 * OBJECT), bytes(3 * OBJECT))
        self.assertEqual(fake.objects, {})

    async def test_zero_deletes_whole_objects(self) -> None:
        fake = FakeS3()
        dev = device(fake)
        await dev.write(0, b"a" * 4 * OBJECT)
        await dev.write_zeroes(OBJECT // 2, 2 * OBJECT)
        self.assertEqual(
            sorted(fake.objects),
            ["img/0000000000000000", "img/0000000000000002", "img/0000000000000003"],
        )
        self.assertEqual(
            await dev.read(0, 4 * OBJECT),
            b"a" * (OBJECT // 2) + bytes(2 * OBJECT) + b"a" * (OBJECT + OBJECT // 2),
        )

    async def test_zeroing_missing_object_writes_nothing(self) -> None:
        """Zeroing part of an object that does not exist leaves it missing."""
        fake = FakeS3()
        await device(fake).write_zeroes(100, 200)
        self.assertEqual(fake.objects, {})

    async def test_no_hole_keeps_objects(self) -> None:
        """NO_HOLE zeroing of whole objects stores zeroes rather than deleting."""
        fake = FakeS3()
        dev = device(fake)
        await dev.write_zeroes(0, 2 * OBJECT, may_trim=False)
        self.assertEqual(fake.objects["img/0000000000000001"], bytes(OBJECT))

    async def test_trim(self) -> None:
        """Trim deletes whole objects and leaves parts of objects alone."""
        fake = FakeS3()
        dev = device(fake)
        await dev.write(0, b"a" * 3 * OBJECT)
        await dev.trim(10, 2 * OBJECT)
        self.assertEqual(sorted(fake.objects), ["img/0000000000000000", "img/0000000000000002"])
        self.assertEqual(fake.objects["img/0000000000000000"], b"a" * OBJECT)

    async def test_fast_zero_refused(self) -> None:
        fake = FakeS3()
        dev = device(fake)
        await dev.write(0, b"a" * OBJECT)
        error = await failed(dev.write_zeroes(0, OBJECT, fast=True), NBDError)
        self.assertEqual(error.errno, Errno.ENOTSUP)
        self.assertEqual(fake.objects["img/0000000000000000"], b"a" * OBJECT)

    async def test_short_last_object(self) -> None:
        """The last object holds only what is left of the image."""
        fake = FakeS3()
        dev = device(fake, size=OBJECT + 100)
        await dev.write(OBJECT, b"q" * 100)
        self.assertEqual(fake.objects["img/0000000000000001"], b"q" * 100)
        await dev.write_zeroes(OBJECT, 100)
        self.assertNotIn("img/0000000000000001", fake.objects)


class BlockStatusTests(TestCase):
    """Block status from one listing, kept up to date by our own changes."""

    async def test_from_listing(self) -> None:
        """
        Existing objects are data, the others holes; keys that are not
        data objects are ignored; the listing is paged.
        """
        fake = FakeS3(page_size=2)
        fake.objects["img/twisted-nbd.json"] = b"{}"
        fake.objects["img/other"] = b""
        for index in (1, 2, 5):
            fake.objects[f"img/{index:016x}"] = b"x" * OBJECT
        dev = device(fake)
        extents = await dev.block_status(0, 8 * OBJECT)
        self.assertEqual(
            list(extents),
            [
                Extent(OBJECT, HOLE),
                Extent(2 * OBJECT, 0),
                Extent(2 * OBJECT, HOLE),
                Extent(OBJECT, 0),
                Extent(2 * OBJECT, HOLE),
            ],
        )
        self.assertEqual(fake.log.count(("LIST", None)), 3)
        self.assertEqual(dev.listed_pages, 3)
        await dev.block_status(0, OBJECT)
        self.assertEqual(fake.log.count(("LIST", None)), 3, "listed again")

    async def test_changes_while_listing(self) -> None:
        """
        A write and a delete made while the listing is in flight count
        over what the listing says.
        """
        fake = FakeS3(hold={"LIST"})
        fake.objects["img/0000000000000000"] = b"x" * OBJECT
        dev = device(fake)
        status = dev.block_status(0, 2 * OBJECT)
        # The answer as S3 would have made it before the changes below.
        stale = fake.answer("GET", None, [("list-type", "2"), ("prefix", "img/")], b"", {})
        held = fake.held.pop()
        await dev.write(OBJECT, b"y" * OBJECT)
        await dev.trim(0, OBJECT)
        held.deferred.callback(stale)
        self.assertEqual(list(await status), [Extent(OBJECT, HOLE), Extent(OBJECT, 0)])

    async def test_after_writes_and_deletes(self) -> None:
        fake = FakeS3()
        dev = device(fake)
        self.assertEqual(list(await dev.block_status(0, 2 * OBJECT)), [Extent(2 * OBJECT, HOLE)])
        await dev.write(OBJECT + 5, b"a")
        self.assertEqual(
            list(await dev.block_status(0, 2 * OBJECT)), [Extent(OBJECT, HOLE), Extent(OBJECT, 0)]
        )
        await dev.write_zeroes(OBJECT, OBJECT)
        self.assertEqual(list(await dev.block_status(0, 2 * OBJECT)), [Extent(2 * OBJECT, HOLE)])

    async def test_failed_put_counts_as_data(self) -> None:
        """A PUT that failed may have landed: its object is reported as data."""
        fake = FakeS3()
        dev = device(fake)
        await dev.block_status(0, OBJECT)
        fake.inject.append(S3Error("connection lost"))
        await failed(dev.write(0, b"a" * OBJECT), NBDError)
        self.assertEqual(list(await dev.block_status(0, OBJECT)), [Extent(OBJECT, 0)])

    async def test_listing_fails_then_retried(self) -> None:
        fake = FakeS3()
        fake.inject.append(S3Response(403, b"<Error><Code>AccessDenied</Code></Error>"))
        dev = device(fake)
        error = await failed(dev.block_status(0, OBJECT), NBDError)
        self.assertEqual(error.errno, Errno.EIO)
        self.assertIn("AccessDenied", str(error))
        self.assertEqual(list(await dev.block_status(0, OBJECT)), [Extent(OBJECT, HOLE)])
        self.flushLoggedErrors()


class ErrorTests(TestCase):
    """What S3 refuses becomes EIO (ENOSPC for a quota), with the reason logged."""

    def setUp(self) -> None:
        self.events: list[LogEvent] = []
        observer = cast(ILogObserver, self.events.append)
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)

    def logged(self) -> str:
        from twisted.logger import formatEvent

        return "\n".join(formatEvent(e) for e in self.events)

    async def test_forbidden(self) -> None:
        fake = FakeS3()
        fake.inject.append(S3Response(403, b"<Error><Code>AccessDenied</Code></Error>"))
        error = await failed(device(fake).read(0, 10), NBDError)
        self.assertEqual(error.errno, Errno.EIO)
        self.assertIn("HTTP 403 AccessDenied", self.logged())

    async def test_bucket_gone(self) -> None:
        """A read is not zeroes when the bucket itself is missing."""
        fake = FakeS3()
        dev = device(fake)
        fake.bucket_exists = False
        error = await failed(dev.read(0, 10), NBDError)
        self.assertIn("NoSuchBucket", str(error))
        await failed(dev.write(0, b"x"), NBDError)

    async def test_server_error(self) -> None:
        fake = FakeS3()
        fake.inject.append(S3Response(503, b"<Error><Code>SlowDown</Code></Error>"))
        error = await failed(device(fake).write(0, b"a" * OBJECT), NBDError)
        self.assertEqual(error.errno, Errno.EIO)
        self.assertIn("503 SlowDown", self.logged())

    async def test_connection_failure(self) -> None:
        fake = FakeS3()
        fake.inject.append(S3Error("GET x: ConnectionRefusedError (after 5 attempts)"))
        await failed(device(fake).read(0, 10), NBDError)
        self.assertIn("ConnectionRefusedError", self.logged())

    async def test_quota(self) -> None:
        fake = FakeS3()
        fake.inject.append(S3Response(403, b"<Error><Code>QuotaExceeded</Code></Error>"))
        error = await failed(device(fake).write(0, b"a" * OBJECT), NBDError)
        self.assertEqual(error.errno, Errno.ENOSPC)


class OpenTests(TestCase):
    """Opening and creating images: the metadata object and the bucket."""

    async def test_create_then_reopen(self) -> None:
        fake = FakeS3()
        dev = await S3Device.open(fake, S3Config("b", "p/", size=10 * MiB, object_size=OBJECT))
        self.assertEqual((dev.size, dev.object_size), (10 * MiB, OBJECT))
        meta = json.loads(fake.objects["p/" + META_NAME])
        self.assertEqual(meta, {"format": 1, "size": 10 * MiB, "object_size": OBJECT})
        again = await S3Device.open(fake, S3Config("b", "p/"))
        self.assertEqual((again.size, again.object_size), (10 * MiB, OBJECT))
        self.assertEqual(again.capabilities.preferred_block, OBJECT)

    async def test_mismatch(self) -> None:
        fake = FakeS3()
        await S3Device.open(fake, S3Config("b", "p/", size=10 * MiB))
        error = await failed(S3Device.open(fake, S3Config("b", "p/", size=11 * MiB)), ValueError)
        self.assertIn("is 10485760 bytes, not size=11534336", str(error))
        error = await failed(
            S3Device.open(fake, S3Config("b", "p/", object_size=OBJECT)), ValueError
        )
        self.assertIn("4194304-byte objects", str(error))

    async def test_no_image(self) -> None:
        error = await failed(S3Device.open(FakeS3(), S3Config("b", "p/")), ValueError)
        self.assertIn("give size= to create one", str(error))

    async def test_read_only_creates_nothing(self) -> None:
        fake = FakeS3()
        config = S3Config("b", "p/", size=MiB, read_only=True)
        await failed(S3Device.open(fake, config), ValueError)
        self.assertEqual(fake.objects, {})

    async def test_bucket(self) -> None:
        fake = FakeS3(bucket_exists=False)
        error = await failed(S3Device.open(fake, S3Config("b", size=MiB)), ValueError)
        self.assertIn("create=true", str(error))
        await S3Device.open(fake, S3Config("b", size=MiB, create=True))
        self.assertTrue(fake.bucket_exists)

    async def test_bad_metadata(self) -> None:
        fake = FakeS3()
        fake.objects["p/" + META_NAME] = b"not json"
        error = await failed(S3Device.open(fake, S3Config("b", "p/")), ValueError)
        self.assertIn("is not valid", str(error))


class PluginTests(SynchronousTestCase):
    """The backend is known by name, and its keys are checked."""

    def test_registered(self) -> None:
        self.assertIs(registry.get("backend", "s3"), plugin)

    def test_keys(self) -> None:
        _, values = registry.resolve(
            "backend",
            PluginRef("s3", (("bucket", "b"), ("object-size", "1M"), ("max-requests", "4"))),
        )
        self.assertEqual(values["object-size"], MiB)
        self.assertEqual(values["max-requests"], 4)
        self.assertIsNone(values["size"])

    def test_bad_object_size(self) -> None:
        from twisted_nbd.backends import OpenContext

        _, values = registry.resolve(
            "backend", PluginRef("s3", (("bucket", "b"), ("object-size", "3000")))
        )
        with self.assertRaises(ValueError) as caught:
            plugin.open(values, OpenContext(Clock()))
        self.assertIn("power of two", str(caught.exception))

    def test_one_key(self) -> None:
        from twisted_nbd.backends import OpenContext

        _, values = registry.resolve(
            "backend", PluginRef("s3", (("bucket", "b"), ("access-key", "a")))
        )
        with self.assertRaises(ValueError) as caught:
            plugin.open(values, OpenContext(Clock()))
        self.assertIn("both access-key and secret-key", str(caught.exception))


class _Flaky(resource.Resource):
    """Answers 503 C{failures} times, or drops the connection, then 200."""

    isLeaf = True

    def __init__(self, failures: int, drop: bool = False, hang: bool = False) -> None:
        super().__init__()
        self.failures = failures
        self.drop = drop
        self.hang = hang
        self.seen: list[dict[str, str]] = []

    def render(self, request: Any) -> bytes:
        self.seen.append(
            {
                k.decode().lower(): v[-1].decode()
                for k, v in request.requestHeaders.getAllRawHeaders()
            }
        )
        if self.failures:
            self.failures -= 1
            if self.drop:
                request.channel.transport.abortConnection()
                return cast(bytes, server.NOT_DONE_YET)
            if self.hang:
                return cast(bytes, server.NOT_DONE_YET)  # never answered
            request.setResponseCode(503)
            return b"<Error><Code>SlowDown</Code></Error>"
        return b"ok:" + cast(bytes, request.content.read())


class TransportTests(TestCase):
    """The treq transport signs, retries and gives up, against a local server."""

    def serve(self, site: resource.Resource, timeout: float = 5) -> TreqTransport:
        port = cast(Any, reactor).listenTCP(0, server.Site(site), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        signer = Signer(
            f"http://127.0.0.1:{port.getHost().port}", "b", Credentials("AK", "SK"), "us-east-1"
        )
        transport = TreqTransport(
            reactor, signer, max_requests=2, retries=3, backoff=0.01, timeout=timeout
        )
        self.addCleanup(transport.close)
        return transport

    async def test_signed(self) -> None:
        site = _Flaky(0)
        transport = self.serve(site)
        response = await transport("PUT", "k/0", (), b"body", {})
        self.assertEqual((response.status, response.body), (200, b"ok:body"))
        headers = site.seen[0]
        self.assertTrue(headers["authorization"].startswith("AWS4-HMAC-SHA256 Credential=AK/"))
        self.assertIn("x-amz-content-sha256", headers)

    async def test_retries_server_errors(self) -> None:
        site = _Flaky(2)
        transport = self.serve(site)
        response = await transport("GET", "k", (), b"", {})
        self.assertEqual(response.status, 200)
        self.assertEqual(len(site.seen), 3)
        self.flushLoggedErrors()

    async def test_retries_dropped_connections(self) -> None:
        site = _Flaky(2, drop=True)
        transport = self.serve(site)
        response = await transport("GET", "k", (), b"", {})
        self.assertEqual(response.status, 200)
        self.assertEqual(len(site.seen), 3)

    async def test_gives_up(self) -> None:
        """After the retries, the last 5xx answer is returned; a dead server is an S3Error."""
        site = _Flaky(10)
        transport = self.serve(site)
        response = await transport("GET", "k", (), b"", {})
        self.assertEqual(response.status, 503)
        self.assertEqual(len(site.seen), 4)
        site2 = _Flaky(10, drop=True)
        transport2 = self.serve(site2)
        error = await failed(transport2("GET", "k", (), b"", {}), S3Error)
        self.assertIn("after 4 attempts", str(error))

    async def test_timeout(self) -> None:
        """
        A request that gets no answer in time is retried, then given up.
        (Nothing here must answer within the short timeout, so a slow
        machine cannot make it fail.)
        """
        site = _Flaky(10, hang=True)
        transport = self.serve(site, timeout=0.2)
        error = await failed(transport("GET", "k", (), b"", {}), S3Error)
        self.assertIn("no answer within 0.2 s (after 4 attempts)", str(error))
