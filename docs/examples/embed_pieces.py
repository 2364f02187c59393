"""
Build an NBD server from its pieces: your own devices, exports and
factory, for what a Config cannot describe (a device of your own, a filter
stack, per-connection layers).

Run this file to serve on 127.0.0.1:10809 until Ctrl-C:

    python3 docs/examples/embed_pieces.py
"""

from __future__ import annotations

from typing import Any

from twisted.application import strports

from twisted_nbd.backends.memory import MemoryBlockDevice
from twisted_nbd.exports import Export, ExportRegistry
from twisted_nbd.protocol import NBDServerFactory
from twisted_nbd.service import BlockDeviceService, NBDService

MiB = 1 << 20


def make_service(reactor: Any, listen: str) -> NBDService:
    """A server of two exports, "scratch" (the default) and "iso", on C{listen}."""
    # Any IBlockDevice will do here: a backend of your own, or a stack of filters.
    scratch = MemoryBlockDevice(64 * MiB)
    iso = MemoryBlockDevice(16 * MiB)
    registry = ExportRegistry.of(
        [
            Export("scratch", scratch, description="a RAM disk"),
            Export("iso", iso, description="read-only", read_only=True),
        ],
        default_name="scratch",
    )
    factory = NBDServerFactory(
        registry, max_queue_depth=64, max_bytes_in_flight=8 * MiB, reactor=reactor
    )
    # NBDService stops in order: stop listening, let the connections finish
    # (at most shutdown_timeout seconds), then stop its child named "device".
    top = NBDService(factory, reactor, shutdown_timeout=10.0)
    devices = BlockDeviceService([scratch, iso])  # closes the devices when stopped
    devices.setName("device")
    devices.setServiceParent(top)
    strports.service(listen, factory, reactor=reactor).setServiceParent(top)
    return top


if __name__ == "__main__":
    from twisted.internet import reactor

    server = make_service(reactor, "tcp:10809:interface=127.0.0.1")
    server.startService()
    reactor.addSystemEventTrigger("before", "shutdown", server.stopService)
    reactor.run()
