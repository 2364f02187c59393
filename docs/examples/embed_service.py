"""
Embed an NBD server in a Twisted program, without a command line.

make_service() builds the server's service tree from a Config: two RAM
disks, served on the endpoint given. Add the tree to your application's
own services, or run this file to serve on 127.0.0.1:10809 until Ctrl-C:

    python3 docs/examples/embed_service.py
"""

from __future__ import annotations

from typing import Any

from twisted_nbd.config import Config, ExportSpec
from twisted_nbd.service import NBDService, build

MiB = 1 << 20


def make_service(reactor: Any, listen: str) -> NBDService:
    """A server of two RAM disks, "disk" (the default) and "iso", on C{listen}."""
    config = Config(
        [
            ExportSpec(name="disk", memory=64 * MiB, description="a RAM disk"),
            ExportSpec(name="iso", memory=16 * MiB, read_only=True),
        ],
        default="disk",
        listen=(listen,),
        max_queue_depth=32,
        shutdown_timeout=5.0,
    )
    return build(config, reactor)


if __name__ == "__main__":
    from twisted.internet import reactor

    server = make_service(reactor, "tcp:10809:interface=127.0.0.1")
    server.startService()
    # Ctrl-C stops the reactor, which first waits for the server to stop gracefully.
    reactor.addSystemEventTrigger("before", "shutdown", server.stopService)
    reactor.run()
