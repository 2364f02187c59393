"""
Plain pytest tests, run by pytest only (trial collects TestCase classes, and
there are none here): the interop helpers, and the Twisted client against a
server built in this process, awaited through pytest-twisted.

pytest-twisted runs the reactor for the whole pytest session; a test
decorated with C{pytest_twisted.ensureDeferred} is an C{async def} whose
awaits on Deferreds are driven by that reactor; the C{reactor} fixture
below hands it that reactor. See docs/architecture.md for which runner suits what.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.application.internet import StreamServerEndpointService
from twisted.internet.defer import Deferred

from tests.interop.helpers import first_difference, free_port, make_image
from tests.test_compose import bound_port
from twisted_nbd.client import NBDError, NBDHandshakeError, connect, list_exports
from twisted_nbd.config import Config, ExportSpec
from twisted_nbd.errors import Errno
from twisted_nbd.service import NBDService, build

MiB = 1 << 20


# ------------------------------------------------------------ the interop helpers


def test_first_difference() -> None:
    """first_difference finds the first differing offset, or where one input ends."""
    assert first_difference(b"abc", b"abc") is None
    assert first_difference(b"abc", b"abd") == 2
    assert first_difference(b"ab", b"abc") == 2
    big = bytes(200_000)
    assert first_difference(big, big[:150_000] + b"\1" + big[150_001:]) == 150_000


def test_make_image(tmp_path: Path) -> None:
    """make_image makes a sparse file of the size asked for, starting with the data given."""
    path = make_image(tmp_path / "disk.img", 4 * MiB, b"head")
    assert path.stat().st_size == 4 * MiB
    assert path.read_bytes()[:5] == b"head\0"
    # Sparse: far fewer blocks than bytes.
    assert path.stat().st_blocks * 512 < MiB


def test_free_port() -> None:
    """free_port gives a port of 127.0.0.1 that can be bound."""
    import socket

    port = free_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))


# ------------------------------------------------------------ the client, awaited


@pytest.fixture
def reactor() -> Any:
    """The reactor pytest-twisted runs (it installs one when the session starts)."""
    from twisted.internet import reactor as running

    return running


@pytest_twisted.async_yield_fixture
async def server(reactor: Any) -> AsyncIterator[tuple[NBDService, str]]:
    """A memory export "disk" (and a read-only "ro") served on a free loopback port."""
    config = Config(
        [
            ExportSpec(name="disk", memory=8 * MiB, description="scratch"),
            ExportSpec(name="ro", memory=MiB, read_only=True),
        ],
        default="disk",
        listen=("tcp:0:interface=127.0.0.1",),
    )
    service = build(config, reactor)
    service.startService()
    [listener] = [s for s in service if isinstance(s, StreamServerEndpointService)]
    port = await bound_port(listener)
    yield service, f"tcp:127.0.0.1:{port}"
    await service.stopService()


@pytest_twisted.ensureDeferred
async def test_write_read_flush(server: tuple[NBDService, str], reactor: Any) -> None:
    """connect() fires with a client; many requests in flight come back in any order."""
    _, endpoint = server
    client = await connect(reactor, endpoint, "disk")
    assert client.size == 8 * MiB
    assert client.extended_headers
    data = os.urandom(MiB)
    await Deferred.fromCoroutine(_write_all(client, data))
    await client.flush()
    got = await client.read(0, MiB)
    assert got == data
    await client.disconnect()


async def _write_all(client: Any, data: bytes) -> None:
    from twisted.internet.defer import gatherResults

    pieces = [client.write(at, data[at : at + 4096]) for at in range(0, len(data), 4096)]
    await gatherResults(pieces)


@pytest_twisted.ensureDeferred
async def test_list_exports(server: tuple[NBDService, str], reactor: Any) -> None:
    """list_exports() fires with every export and its description."""
    _, endpoint = server
    exports = await list_exports(reactor, endpoint)
    assert sorted(exports) == [("disk", "scratch"), ("ro", "")]


@pytest_twisted.ensureDeferred
async def test_errors(server: tuple[NBDService, str], reactor: Any) -> None:
    """The server's refusals arrive as exceptions with the NBD errno or reply."""
    _, endpoint = server
    with pytest.raises(NBDHandshakeError):
        await connect(reactor, endpoint, "no-such-export")
    ro = await connect(reactor, endpoint, "ro")
    assert ro.read_only
    # A polite client refuses to send a write to a read-only export ...
    with pytest.raises(ValueError):
        await ro.write(0, b"x" * 512)
    # ... and the server refuses it when sent anyway.
    with pytest.raises(NBDError) as caught:
        await ro.request(1, 0, 512, 0x20 if ro.extended_headers else 0, b"x" * 512)
    assert caught.value.errno == Errno.EPERM
    await ro.disconnect()
