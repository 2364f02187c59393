"""
A static file server for the C{http} backend's tests and benchmark:
twisted.web's C{File} (which serves byte ranges), on 127.0.0.1, with
C{TCP_NODELAY} on its connections as production servers set it (nginx's
C{tcp_nodelay on} is the default). Without it, each response's body waits
for the client's delayed ACK of its headers, about 40 ms a request on
Linux's loopback, and the test would measure that rather than the backend.

    python3 -m tests.interop.webserver PORT DIRECTORY
"""

from __future__ import annotations

import sys
from typing import Any

from twisted.web.http import HTTPChannel
from twisted.web.server import Site
from twisted.web.static import File


class _Channel(HTTPChannel):
    def connectionMade(self) -> None:
        super().connectionMade()
        transport: Any = self.transport
        transport.setTcpNoDelay(True)


def site(directory: str) -> Site:
    """A C{Site} serving C{directory} with C{TCP_NODELAY} connections."""
    made = Site(File(directory))
    made.protocol = _Channel  # type: ignore[assignment]
    return made


def main(argv: list[str]) -> None:
    from twisted.internet import reactor as global_reactor

    reactor: Any = global_reactor
    port, directory = int(argv[1]), argv[2]
    reactor.listenTCP(port, site(directory), interface="127.0.0.1")
    reactor.run()


if __name__ == "__main__":
    main(sys.argv)
