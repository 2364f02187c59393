"""
The twisted-nbd client against an in-process twisted-nbd server.

Starts a server on 127.0.0.1 (a free port) exporting a 64 MiB RAM disk,
connects to it, writes, reads back, asks for block status, and disconnects.

Run it from the repository root:  python3 docs/examples/client_example.py
"""

from __future__ import annotations

from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IReactorCore
from twisted.internet.task import react

from twisted_nbd.backends.memory import MemoryBlockDevice
from twisted_nbd.client import connect, list_exports
from twisted_nbd.exports import Export, ExportRegistry
from twisted_nbd.protocol import NBDServerFactory

MiB = 1024 * 1024


async def main(reactor: IReactorCore) -> None:
    # A server: one export named "ram", 64 MiB, kept in memory.
    registry = ExportRegistry.of([Export("ram", MemoryBlockDevice(64 * MiB), "a RAM disk")])
    port = await serverFromString(reactor, "tcp:0:interface=127.0.0.1").listen(
        NBDServerFactory(registry)
    )
    endpoint = f"tcp:127.0.0.1:{port.getHost().port}"

    print("exports:", await list_exports(reactor, endpoint))

    client = await connect(reactor, endpoint, "ram")
    print("export:", client.export_name, "-", client.description)
    print("size:", client.size)
    print("extended headers:", client.extended_headers)
    print("block sizes (min, preferred, max):", tuple(client.block_size))

    # Requests may be in flight together; each method returns a Deferred.
    await gatherResults(
        [
            client.write(0, b"Hello, NBD!"),
            client.write(1 * MiB, b"\xff" * 4096),
        ]
    )
    await client.flush()
    print("read back:", await client.read(0, 11))

    status = await client.block_status(0, client.size)
    for context, extents in status.items():
        described = ", ".join(f"{e.length} bytes flags={e.flags}" for e in extents)
        print(f"{context}: {described}")

    await client.disconnect()
    print("disconnected")
    await port.stopListening()


if __name__ == "__main__":
    react(lambda reactor: Deferred.fromCoroutine(main(reactor)))
