# -*- test-case-name: tests.test_protocol,tests.test_backends -*-
"""
Public test helpers for people who write backends, filters or applications
on top of twisted-nbd.

L{BlockDeviceConformanceMixin} holds the tests every L{IBlockDevice} should
pass; a backend's test module mixes it into a trial C{TestCase} and says how
to make a device. L{FilterConformanceMixin} runs the same tests on a filter
wrapped around a memory device (or any device, or a stack of filters).

L{ControllableBlockDevice} answers nothing by itself: every call is recorded
with an unfired Deferred that the test fires when and how it likes, which is
how the protocol tests show out-of-order replies, queue-depth limits, FLUSH
ordering and connections that close with requests in flight.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Sequence
from unittest import SkipTest

from twisted.internet.defer import Deferred, gatherResults
from zope.interface import implementer
from zope.interface.verify import verifyObject

from twisted_nbd._transport import _drain
from twisted_nbd._wire import Errno
from twisted_nbd.errors import NBDError
from twisted_nbd.interfaces import (
    STATE_HOLE,
    STATE_ZERO,
    Capabilities,
    Extent,
    IBlockDevice,
    IBufferRead,
    IBufferWrite,
    IImmediateIO,
    IPipeRead,
    ISparseRead,
)

if TYPE_CHECKING:
    from twisted.trial.unittest import TestCase as _ConformanceBase
else:
    # At run time the mixin must not be a TestCase itself, or the test
    # runners would collect it and run it without a device.
    _ConformanceBase = object

__all__ = [
    "BlockDeviceConformanceMixin",
    "Call",
    "ControllableBlockDevice",
    "FilterConformanceMixin",
]


@dataclass
class Call:
    """
    One recorded call on a L{ControllableBlockDevice}.

    @ivar method: the method's name (C{"read"}, C{"write"}, ...).
    @ivar args: its arguments, by name.
    @ivar deferred: the Deferred the call returned; fire it to answer.
    """

    method: str
    args: dict[str, Any]
    deferred: Deferred[Any] = field(repr=False)

    def succeed(self, result: Any = None) -> None:
        """Fire the call's Deferred with C{result}."""
        self.deferred.callback(result)

    def fail(self, error: BaseException) -> None:
        """Fail the call's Deferred with C{error}."""
        self.deferred.errback(error)


@implementer(IBlockDevice)
class ControllableBlockDevice:
    """
    An L{IBlockDevice} whose every operation returns a Deferred that the
    test fires by hand, in any order.

    @ivar calls: the calls not yet taken by L{take}, oldest first.
    """

    def __init__(self, size: int, capabilities: Capabilities | None = None) -> None:
        self.size = size
        self.capabilities = capabilities or Capabilities(
            can_fast_zero=True, can_cache=True, can_extents=True
        )
        self.calls: list[Call] = []
        self.closed = False

    def _record(self, method: str, **args: Any) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        self.calls.append(Call(method, args, d))
        return d

    def take(self, method: str | None = None) -> Call:
        """
        Remove and return the oldest recorded call.

        @raise AssertionError: there is none, or it is not a call of
            C{method}.
        """
        if not self.calls:
            raise AssertionError("no call was recorded")
        call = self.calls.pop(0)
        if method is not None and call.method != method:
            raise AssertionError(f"expected a call of {method}, got {call}")
        return call

    def read(self, offset: int, length: int) -> Deferred[bytes]:
        return self._record("read", offset=offset, length=length)

    def write(self, offset: int, data: bytes, fua: bool = False) -> Deferred[None]:
        return self._record("write", offset=offset, data=bytes(data), fua=fua)

    def flush(self) -> Deferred[None]:
        return self._record("flush")

    def trim(self, offset: int, length: int, fua: bool = False) -> Deferred[None]:
        return self._record("trim", offset=offset, length=length, fua=fua)

    def write_zeroes(
        self,
        offset: int,
        length: int,
        fua: bool = False,
        may_trim: bool = True,
        fast: bool = False,
    ) -> Deferred[None]:
        return self._record(
            "write_zeroes", offset=offset, length=length, fua=fua, may_trim=may_trim, fast=fast
        )

    def cache(self, offset: int, length: int) -> Deferred[None]:
        return self._record("cache", offset=offset, length=length)

    def block_status(self, offset: int, length: int) -> Deferred[Sequence[Extent]]:
        return self._record("block_status", offset=offset, length=length)

    def close(self) -> Deferred[None]:
        self.closed = True
        d: Deferred[None] = Deferred()
        d.callback(None)
        return d


_KiB = 1024
_MiB = 1024 * 1024


def _pattern(length: int, seed: int = 0) -> bytes:
    """
    C{length} bytes, none of them zero, repeating every 255 bytes: a period
    that is not a power of two, so data landing at the wrong offset (a page
    or block away) does not go unnoticed.
    """
    period = bytes((seed + i) % 255 + 1 for i in range(255))
    return (period * (length // 255 + 1))[:length]


class BlockDeviceConformanceMixin(_ConformanceBase):
    """
    Tests every L{IBlockDevice} should pass. Mix into a
    L{twisted.trial.unittest.TestCase} and implement L{make_device}::

        class MyDeviceTests(BlockDeviceConformanceMixin, TestCase):
            def make_device(self, size: int) -> IBlockDevice:
                return MyDevice(size)

    Tests that need a capability the device does not advertise are
    skipped, as are tests of unaligned access when C{min_block} is not 1.
    The tests wait for Deferreds, so devices that answer from a thread pool
    work as well as ones that answer at once.

    @cvar device_size: the size most tests ask L{make_device} for: at least
        9 MiB and deliberately not a multiple of a page, so the partial
        last page is exercised. Override it with a multiple of
        C{min_block} for devices that need one.
    @cvar exact_allocation: C{block_status} reports exactly what the device
        was told: a hole for every 1 MiB-aligned range trimmed or zeroed
        with C{may_trim}, and allocated data for a range zeroed without it.
        Leave it C{False} when that depends on a file system.
    """

    device_size: int = 9 * _MiB + 4 * _KiB + 123
    exact_allocation: bool = False

    def make_device(self, size: int) -> IBlockDevice | Deferred[IBlockDevice]:
        """
        Make a new device of C{size} bytes that reads as zeroes.

        @return: the device, or a Deferred that fires with it.
        """
        raise NotImplementedError(f"{type(self).__name__} must implement make_device")

    # Helpers.

    async def _open(self, size: int | None = None, close_after: bool = True) -> IBlockDevice:
        """Make a device, closing it when the test ends unless told not to."""
        made = self.make_device(self.device_size if size is None else size)
        device = (await made) if isinstance(made, Deferred) else made
        if close_after:
            self.addCleanup(device.close)
        return device

    def _require(self, device: IBlockDevice, *names: str) -> None:
        """Skip the test unless the device has every capability named."""
        for name in names:
            if not getattr(device.capabilities, name):
                raise SkipTest(f"the device does not advertise {name}")

    def _require_bytes(self, device: IBlockDevice) -> None:
        """Skip the test unless the device can be addressed byte by byte."""
        if device.capabilities.min_block != 1:
            raise SkipTest("the device is not byte-addressable (min_block is not 1)")

    def _expect(self, condition: object, message: str) -> None:
        """Fail the test with C{message} unless C{condition} is true."""
        if not condition:
            self.fail(message)

    async def _expect_none(self, d: Deferred[Any], what: str) -> None:
        """Wait for C{d} and fail the test unless it fires with C{None}."""
        result = await d
        self._expect(result is None, f"{what} fired with {result!r}, not None")

    def _assert_bytes(self, actual: object, expected: bytes, what: str) -> None:
        """
        Assert that a read returned C{expected}, naming the first wrong byte
        rather than printing megabytes.
        """
        if not isinstance(actual, (bytes, bytearray, memoryview)):
            self.fail(f"{what}: got {type(actual).__name__}, not bytes")
        data = bytes(actual)
        if len(data) != len(expected):
            self.fail(f"{what}: got {len(data)} bytes, expected {len(expected)}")
        if data != expected:
            first = next(i for i, (a, b) in enumerate(zip(data, expected, strict=True)) if a != b)
            self.fail(
                f"{what}: byte {first} is {data[first]:#04x}, expected {expected[first]:#04x}"
            )

    async def _write(
        self, device: IBlockDevice, model: bytearray, offset: int, data: bytes
    ) -> None:
        """Write to the device and to the model of what it should hold."""
        await device.write(offset, data)
        model[offset : offset + len(data)] = data

    async def _read(self, device: IBlockDevice, offset: int, length: int) -> bytes:
        """Read any length, in pieces no longer than the device accepts."""
        pieces = []
        step = device.capabilities.max_block
        for start in range(offset, offset + length, step):
            data = await device.read(start, min(step, offset + length - start))
            pieces.append(bytes(data))
        return b"".join(pieces)

    async def _assert_model(
        self, device: IBlockDevice, model: bytearray, offset: int = 0, length: int | None = None
    ) -> None:
        """Assert the device holds what the model says, by default everywhere."""
        if length is None:
            length = len(model) - offset
        data = await self._read(device, offset, length)
        self._assert_bytes(data, bytes(model[offset : offset + length]), "device contents")

    def _assert_well_formed(
        self, device: IBlockDevice, offset: int, extents: Sequence[Extent]
    ) -> int:
        """
        Assert C{block_status} returned one or more valid extents that stay
        inside the device.

        @return: the number of bytes they cover.
        """
        extents = list(extents)
        self._expect(extents, f"no extents at {offset}")
        for extent in extents:
            self._expect(isinstance(extent, Extent), f"not an Extent at {offset}: {extent!r}")
            self._expect(extent.length > 0, f"an empty extent at {offset}: {extents}")
            self._expect(
                extent.flags & ~(STATE_HOLE | STATE_ZERO) == 0, f"unknown flags: {extents}"
            )
        covered = sum(extent.length for extent in extents)
        self._expect(
            offset + covered <= device.size, f"extents from {offset} run past the end: {extents}"
        )
        return covered

    async def _extent_map(
        self, device: IBlockDevice, offset: int, end: int
    ) -> list[tuple[int, int, int]]:
        """
        Ask for block status until C{[offset, end)} is covered, checking
        every answer, and check that every range claimed to read as zeroes
        does.

        @return: C{(start, length, flags)} triples, equal neighbours merged
            and the last one cut at C{end}.
        """
        found: list[tuple[int, int, int]] = []
        position = offset
        while position < end:
            extents = await device.block_status(position, end - position)
            self._assert_well_formed(device, position, extents)
            for extent in extents:
                length = min(extent.length, end - position)
                if length <= 0:
                    break
                if found and found[-1][2] == extent.flags and sum(found[-1][:2]) == position:
                    start, previous, flags = found.pop()
                    found.append((start, previous + length, flags))
                else:
                    found.append((position, length, extent.flags))
                position += length
        for start, length, flags in found:
            if flags & STATE_ZERO:
                data = await self._read(device, start, length)
                self._assert_bytes(data, bytes(length), f"range claimed zero at {start}")
        return found

    # The tests.

    async def test_provides_i_block_device(self) -> None:
        """The device provides L{IBlockDevice} and has L{Capabilities}."""
        device = await self._open()
        self._expect(verifyObject(IBlockDevice, device), "verifyObject failed")
        self._expect(
            isinstance(device.capabilities, Capabilities),
            f"capabilities is {device.capabilities!r}",
        )

    async def test_size(self) -> None:
        """The device has the size it was made with."""
        device = await self._open()
        self._expect(
            device.size == self.device_size, f"size is {device.size}, not {self.device_size}"
        )

    async def test_new_device_reads_zeroes(self) -> None:
        """Every byte of a new device reads as zero."""
        device = await self._open()
        data = await self._read(device, 0, device.size)
        self._assert_bytes(data, bytes(device.size), "a new device")

    async def test_zero_length_read(self) -> None:
        """A read of no bytes, even at the very end, returns no bytes."""
        device = await self._open()
        self._assert_bytes(await device.read(0, 0), b"", "read(0, 0)")
        self._assert_bytes(await device.read(device.size, 0), b"", "read(size, 0)")

    async def test_write_aligned(self) -> None:
        """Block-aligned writes read back, and nothing else changes."""
        device = await self._open()
        self._require(device, "can_write")
        model = bytearray(device.size)
        for seed, (offset, length) in enumerate(
            [(0, 4 * _KiB), (4 * _KiB, 4 * _KiB), (64 * _KiB, 64 * _KiB), (_MiB, 300 * _KiB)]
        ):
            await self._write(device, model, offset, _pattern(length, seed))
            self._assert_bytes(
                await device.read(offset, length), _pattern(length, seed), f"at {offset}"
            )
        await self._assert_model(device, model)

    async def test_write_unaligned(self) -> None:
        """Writes at odd offsets and lengths, across pages, read back."""
        device = await self._open()
        self._require(device, "can_write")
        self._require_bytes(device)
        model = bytearray(device.size)
        for seed, (offset, length) in enumerate(
            [(1, 1), (4095, 2), (64 * _KiB - 7, 13), (12345, 200_001), (3 * _MiB + 3, 1)]
        ):
            await self._write(device, model, offset, _pattern(length, seed))
        await self._assert_model(device, model)
        self._assert_bytes(await device.read(4094, 4), b"\0" + _pattern(2, 1) + b"\0", "4094")

    async def test_write_last_bytes(self) -> None:
        """The last block, and the very last byte, can be written and read."""
        device = await self._open()
        self._require(device, "can_write")
        block = device.capabilities.min_block
        size = device.size
        await device.write(size - block, _pattern(block))
        self._assert_bytes(await device.read(size - block, block), _pattern(block), "last block")
        if block == 1:
            await device.write(size - 1, b"\xaa")
            self._assert_bytes(await device.read(size - 2, 2), b"\0\xaa", "last byte")

    async def test_overlapping_writes(self) -> None:
        """A later write wins where it overlaps an earlier one."""
        device = await self._open()
        self._require(device, "can_write")
        model = bytearray(device.size)
        page = 4 * _KiB
        await self._write(device, model, page, _pattern(50 * page, 1))
        await self._write(device, model, 20 * page, _pattern(10 * page, 2))
        await self._write(device, model, 40 * page, _pattern(20 * page, 3))
        await self._write(device, model, 0, _pattern(2 * page, 4))
        await self._assert_model(device, model, 0, 70 * page)
        self._assert_bytes(
            await device.read(20 * page, page), _pattern(page, 2), "the overwritten middle"
        )

    async def test_write_fua(self) -> None:
        """A write with FUA completes and reads back."""
        device = await self._open()
        self._require(device, "can_write", "can_fua")
        await self._expect_none(device.write(8 * _KiB, _pattern(8 * _KiB), fua=True), "write")
        self._assert_bytes(await device.read(8 * _KiB, 8 * _KiB), _pattern(8 * _KiB), "FUA")

    async def test_flush(self) -> None:
        """A flush after writes fires with C{None} and loses nothing."""
        device = await self._open()
        self._require(device, "can_flush")
        if device.capabilities.can_write:
            await device.write(0, _pattern(4 * _KiB))
        await self._expect_none(device.flush(), "flush")
        if device.capabilities.can_write:
            self._assert_bytes(await device.read(0, 4 * _KiB), _pattern(4 * _KiB), "flushed")

    async def test_trim_then_write(self) -> None:
        """
        Trimming leaves the data around the range intact, and the trimmed
        range can be written again.
        """
        device = await self._open()
        self._require(device, "can_write", "can_trim")
        model = bytearray(device.size)
        await self._write(device, model, 0, _pattern(3 * _MiB))
        await self._expect_none(device.trim(_MiB, _MiB), "trim")
        await self._assert_model(device, model, 0, _MiB)
        await self._assert_model(device, model, 2 * _MiB, device.size - 2 * _MiB)
        await self._write(device, model, _MiB + 4 * _KiB, _pattern(8 * _KiB, 5))
        await self._assert_model(device, model, _MiB + 4 * _KiB, 8 * _KiB)
        if device.capabilities.can_fua:
            await device.trim(2 * _MiB, 64 * _KiB, fua=True)
            await self._assert_model(device, model, 2 * _MiB + 64 * _KiB, 64 * _KiB)

    async def _check_write_zeroes(self, may_trim: bool) -> None:
        device = await self._open()
        self._require(device, "can_write", "can_zero")
        model = bytearray(device.size)
        await self._write(device, model, 0, _pattern(3 * _MiB))
        if device.capabilities.min_block == 1:
            ranges = [(64 * _KiB + 100, 2 * _MiB - 77), (5, 1), (3 * _MiB - 1, 1)]
        else:
            ranges = [(64 * _KiB, 2 * _MiB), (4 * _KiB, 4 * _KiB)]
        # A range never written, reaching the end of the device.
        ranges.append((5 * _MiB, device.size - 5 * _MiB))
        for offset, length in ranges:
            await self._expect_none(
                device.write_zeroes(offset, length, may_trim=may_trim), "write_zeroes"
            )
            model[offset : offset + length] = bytes(length)
        await self._assert_model(device, model)
        if device.capabilities.can_fua:
            await device.write_zeroes(_MiB, 4 * _KiB, fua=True, may_trim=may_trim)
            model[_MiB : _MiB + 4 * _KiB] = bytes(4 * _KiB)
            await self._assert_model(device, model, 0, 3 * _MiB)

    async def test_write_zeroes_may_trim(self) -> None:
        """
        Zeroing that may punch holes makes the range read as zeroes and
        leaves its neighbours alone.
        """
        await self._check_write_zeroes(may_trim=True)

    async def test_write_zeroes_no_hole(self) -> None:
        """
        Zeroing with NO_HOLE makes the range read as zeroes and leaves its
        neighbours alone.
        """
        await self._check_write_zeroes(may_trim=False)

    async def test_block_status_well_formed(self) -> None:
        """
        Block status anywhere returns consecutive, non-empty extents inside
        the device, with only the defined flags.
        """
        device = await self._open()
        self._require(device, "can_extents")
        block = device.capabilities.min_block
        if device.capabilities.can_write:
            await device.write(_MiB, _pattern(5 * block + (5000 if block == 1 else 0)))
            await device.write(3 * _MiB + block, _pattern(block))
        size = device.size
        offsets = [0, _MiB - block, _MiB, 2 * _MiB + 3 * block, 3 * _MiB, size - block]
        if block == 1:
            offsets += [1, _MiB + 4999, size - 2]
        for offset in offsets:
            for length in (block, 4 * _KiB, size - offset):
                length = min(length, size - offset)
                extents = await device.block_status(offset, length)
                self._assert_well_formed(device, offset, extents)

    async def test_block_status_data(self) -> None:
        """
        Block status never claims that written data reads as zeroes, and
        every range it does claim to be zero reads as zeroes.
        """
        device = await self._open()
        self._require(device, "can_extents", "can_write")
        await device.write(_MiB, _pattern(64 * _KiB))
        extents = await device.block_status(_MiB, 64 * _KiB)
        self._assert_well_formed(device, _MiB, extents)
        self._expect(not extents[0].flags & STATE_ZERO, f"written data reported zero: {extents}")
        await self._extent_map(device, 0, device.size)

    async def test_block_status_after_zeroing(self) -> None:
        """
        After trimming and zeroing, block status stays truthful (ranges
        claimed zero read as zeroes, written ones are not claimed zero) and,
        for exact devices, reports exactly the holes made.
        """
        device = await self._open()
        self._require(device, "can_extents", "can_write", "can_zero")
        await device.write(0, _pattern(4 * _MiB))
        await device.write_zeroes(_MiB, _MiB, may_trim=True)
        if device.capabilities.can_trim:
            await device.trim(3 * _MiB, 512 * _KiB)
        found = await self._extent_map(device, 0, device.size)
        for start, _, flags in found:
            if flags & STATE_ZERO:
                self._expect(
                    not (start < _MiB or 2 * _MiB <= start < 3 * _MiB),
                    f"data reported as zero: {found}",
                )
        if self.exact_allocation:
            hole = STATE_HOLE | STATE_ZERO
            expected = [(0, _MiB, 0), (_MiB, _MiB, hole), (2 * _MiB, _MiB, 0)]
            if device.capabilities.can_trim:
                expected += [(3 * _MiB, 512 * _KiB, hole), (3 * _MiB + 512 * _KiB, 512 * _KiB, 0)]
            else:
                expected += [(3 * _MiB, _MiB, 0)]
            expected += [(4 * _MiB, device.size - 4 * _MiB, hole)]
            self._expect(found == expected, f"extents {found}, expected {expected}")

    async def test_no_hole_zeroing_stays_allocated(self) -> None:
        """
        Zeroing with NO_HOLE, even where nothing was ever written, leaves the
        range allocated (checked on devices that report allocation exactly).
        """
        if not self.exact_allocation:
            raise SkipTest("the device's allocation reporting is not exact")
        device = await self._open()
        self._require(device, "can_extents", "can_write", "can_zero")
        await device.write(0, _pattern(_MiB))
        await device.write_zeroes(0, _MiB, may_trim=False)
        await device.write_zeroes(2 * _MiB, _MiB, may_trim=False)
        found = await self._extent_map(device, 0, 4 * _MiB)
        # Allocated means STATE_HOLE is clear; STATE_ZERO may be set, and is
        # true here, so only the HOLE bit is compared.
        holes = [(start, length, flags & STATE_HOLE) for start, length, flags in found]
        expected = [
            (0, _MiB, 0),
            (_MiB, _MiB, STATE_HOLE),
            (2 * _MiB, _MiB, 0),
            (3 * _MiB, _MiB, STATE_HOLE),
        ]
        self._expect(holes == expected, f"extents {found}, expected HOLE bits {expected}")

    async def test_fast_zero(self) -> None:
        """
        Fast zeroing either works, reading zeroes afterwards, or fails with
        C{ENOTSUP} leaving the data as it was.
        """
        device = await self._open()
        self._require(device, "can_write", "can_zero", "can_fast_zero")
        model = bytearray(device.size)
        await self._write(device, model, 0, _pattern(3 * _MiB))
        for offset, may_trim in [(64 * _KiB, True), (_MiB + 64 * _KiB, False)]:
            try:
                await device.write_zeroes(offset, 512 * _KiB, may_trim=may_trim, fast=True)
            except NBDError as e:
                self._expect(e.errno == Errno.ENOTSUP, f"fast zero failed with {e}")
            else:
                model[offset : offset + 512 * _KiB] = bytes(512 * _KiB)
            await self._assert_model(device, model, 0, 3 * _MiB)

    async def test_cache(self) -> None:
        """
        Cache fires with C{None} on a device that advertises it, and
        changes nothing that a read sees.
        """
        device = await self._open()
        if device.capabilities.can_write:
            await device.write(_MiB, _pattern(4 * _KiB))
        try:
            await self._expect_none(device.cache(0, device.size), "cache")
        except NBDError:
            if device.capabilities.can_cache:
                raise
        expected = _pattern(4 * _KiB) if device.capabilities.can_write else bytes(4 * _KiB)
        self._assert_bytes(await device.read(_MiB, 4 * _KiB), expected, "after cache")

    async def test_big_read(self) -> None:
        """An 8 MiB read returns exactly the 8 MiB written."""
        device = await self._open()
        self._require(device, "can_write")
        length = 8 * _MiB
        data = _pattern(length, 7)
        step = device.capabilities.max_block
        for start in range(0, length, step):
            await device.write(4 * _KiB + start, data[start : start + step])
        read = await self._read(device, 4 * _KiB, length)
        self._assert_bytes(read, data, "8 MiB read")

    async def _scatter(self, device: IBlockDevice) -> bytearray:
        """Write data here and there, zero some of it; return the model."""
        model = bytearray(device.size)
        if device.capabilities.can_write:
            for i, offset in enumerate([0, 100 * _KiB, _MiB - 7, 3 * _MiB + 4 * _KiB]):
                if device.capabilities.min_block != 1:
                    offset -= offset % device.capabilities.min_block
                await self._write(device, model, offset, _pattern(200 * _KiB, i))
            if device.capabilities.can_zero:
                await device.write_zeroes(128 * _KiB, 64 * _KiB)
                model[128 * _KiB : 192 * _KiB] = bytes(64 * _KiB)
        else:
            model[:] = await self._read(device, 0, device.size)
        return model

    async def test_sparse_read_agrees(self) -> None:
        """
        A device that provides L{ISparseRead} gives, for any range, segments
        that cover it exactly and hold what C{read} returns.
        """
        device = await self._open()
        if not ISparseRead.providedBy(device):
            raise SkipTest("the device does not provide ISparseRead")
        model = await self._scatter(device)
        step = device.capabilities.min_block
        for offset, length in [(0, 4 * _MiB), (64 * _KiB, 256 * _KiB), (_MiB, 2 * _MiB)]:
            offset -= offset % step
            length = min(length, device.size - offset, device.capabilities.max_block)
            segments = list(await device.read_sparse(offset, length))
            position = offset
            for at, part in segments:
                self._expect(at == position, f"segment at {at}, expected {position}")
                if isinstance(part, int):
                    self._expect(part > 0, f"empty zero run at {at}")
                    data = bytes(part)
                else:
                    data = bytes(part)
                self._assert_bytes(data, bytes(model[at : at + len(data)]), f"segment at {at}")
                position += len(data)
            self._expect(position == offset + length, f"segments end at {position}")

    async def test_buffer_read_agrees(self) -> None:
        """
        A device that provides L{IBufferRead} returns from C{read_buffer}
        what C{read} does (or raises, and the server reads instead).
        """
        device = await self._open()
        if not IBufferRead.providedBy(device):
            raise SkipTest("the device does not provide IBufferRead")
        model = await self._scatter(device)
        step = device.capabilities.min_block
        for offset, length in [(0, 4 * _KiB), (_MiB - 4 * _KiB, 64 * _KiB), (5 * _MiB, 4 * _KiB)]:
            offset -= offset % step
            try:
                data = device.read_buffer(offset, length)
            except Exception:
                continue
            self._assert_bytes(data, bytes(model[offset : offset + length]), "read_buffer")

    async def test_immediate_io_agrees(self) -> None:
        """
        A device that provides L{IImmediateIO} returns from C{read_now}
        what C{read} does (or declines with C{None}); what C{write_now}
        says it wrote, C{read} then returns, and the rest is unchanged.
        """
        device = await self._open()
        if not IImmediateIO.providedBy(device):
            raise SkipTest("the device does not provide IImmediateIO")
        model = await self._scatter(device)
        step = device.capabilities.min_block
        for offset, length in [(0, 4 * _KiB), (_MiB - 4 * _KiB, 64 * _KiB), (5 * _MiB, 4 * _KiB)]:
            offset -= offset % step
            data = device.read_now(offset, length)
            if data is not None:
                self._assert_bytes(data, bytes(model[offset : offset + length]), "read_now")
        if not device.capabilities.can_write:
            return
        offset, payload = 2 * _MiB + step, _pattern(8 * _KiB, 99)
        done = device.write_now(offset, memoryview(payload))
        self._expect(0 <= done <= len(payload), f"write_now returned {done}")
        model[offset : offset + done] = payload[:done]
        data = await device.read(offset - step, len(payload) + 2 * step)
        self._assert_bytes(
            data, bytes(model[offset - step : offset + len(payload) + step]), "read after write_now"
        )

    async def test_pipe_read_agrees(self) -> None:
        """
        A device that provides L{IPipeRead} puts into the pipe what C{read}
        returns, or declines; it never moves more than asked, and says how
        much it moved.
        """
        device = await self._open()
        if not IPipeRead.providedBy(device):
            raise SkipTest("the device does not provide IPipeRead")
        model = await self._scatter(device)
        if not hasattr(os, "pipe2"):
            raise SkipTest("no pipes to splice into here")
        source, sink = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            try:
                import fcntl  # not on every system; pipe2 implies it

                # As large as the server's (F_SETPIPE_SZ: Linux's).
                fcntl.fcntl(sink, getattr(fcntl, "F_SETPIPE_SZ", 1031), _MiB)
            except OSError:
                pass
            for offset, length in [(0, 64 * _KiB), (_MiB, 256 * _KiB), (3 * _MiB, 64 * _KiB)]:
                moved = device.read_to_pipe(sink, offset, length)
                self._expect(0 <= moved <= length, f"read_to_pipe moved {moved} of {length}")
                data = _drain(source, moved)
                self._assert_bytes(data, bytes(model[offset : offset + moved]), "read_to_pipe")
        finally:
            os.close(source)
            os.close(sink)

    async def test_buffer_write_agrees(self) -> None:
        """
        A device that provides L{IBufferWrite}: what is put into the view
        C{write_buffer} gives (unless it declines with C{None}), C{read}
        then returns, and the bytes around it are unchanged, holes included.
        """
        device = await self._open()
        if not IBufferWrite.providedBy(device):
            raise SkipTest("the device does not provide IBufferWrite")
        self._require(device, "can_write")
        model = await self._scatter(device)
        step = device.capabilities.min_block
        # Across a hole (the end of the device is never written by _scatter).
        for offset, payload in [
            (2 * _MiB + step, _pattern(300 * _KiB, 98)),
            (device.size - 256 * _KiB - step, _pattern(256 * _KiB, 97)),
        ]:
            view = device.write_buffer(offset, len(payload))
            if view is None:
                continue
            self._expect(len(view) == len(payload), f"write_buffer gave {len(view)} bytes")
            view[:] = payload
            view.release()
            model[offset : offset + len(payload)] = payload
            data = await device.read(offset - step, len(payload) + 2 * step)
            self._assert_bytes(
                data,
                bytes(model[offset - step : offset + len(payload) + step]),
                "read after write_buffer",
            )

    async def test_concurrent_requests(self) -> None:
        """
        Many requests in flight at once, as several connections would send,
        all complete and land where they were aimed.
        """
        device = await self._open()
        self._require(device, "can_write")
        chunk = 64 * _KiB
        writes = [device.write(i * chunk, _pattern(chunk, i)) for i in range(32)]
        await gatherResults(writes)
        reads = [device.read(i * chunk, chunk) for i in range(32)]
        results = await gatherResults(reads)
        for i, data in enumerate(results):
            self._assert_bytes(data, _pattern(chunk, i), f"chunk {i}")

    async def test_close(self) -> None:
        """Close fires with C{None}."""
        device = await self._open(close_after=False)
        await self._expect_none(device.close(), "close")


class FilterConformanceMixin(BlockDeviceConformanceMixin):
    """
    The tests of L{BlockDeviceConformanceMixin}, run on a filter (or a stack
    of filters) around a fresh device. Implement L{make_filter}::

        class MyFilterTests(FilterConformanceMixin, TestCase):
            def make_filter(self, inner: IBlockDevice) -> IBlockDevice:
                return MyFilter(inner)

    The device below is a sparse L{MemoryBlockDevice
    <twisted_nbd.backends.memory.MemoryBlockDevice>} unless L{make_inner}
    says otherwise; L{inner_size} gives it a different size than the
    filter's (for a filter that serves a slice of it, say).
    """

    def make_filter(self, inner: IBlockDevice) -> IBlockDevice | Deferred[IBlockDevice]:
        """
        Wrap C{inner} in the filter under test.

        @return: the filter, or a Deferred that fires with it.
        """
        raise NotImplementedError(f"{type(self).__name__} must implement make_filter")

    def inner_size(self, size: int) -> int:
        """The size of the device below for a filter of C{size} bytes."""
        return size

    def make_inner(self, size: int) -> IBlockDevice:
        """A new device of C{size} bytes that reads as zeroes, to filter."""
        from twisted_nbd.backends.memory import MemoryBlockDevice

        return MemoryBlockDevice(size)

    def make_device(self, size: int) -> IBlockDevice | Deferred[IBlockDevice]:
        return self.make_filter(self.make_inner(self.inner_size(size)))
