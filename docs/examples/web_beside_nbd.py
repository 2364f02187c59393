"""
An NBD server and a web application in one process, one service tree.

make_service() puts two services under one MultiService: the NBD server
(a 64 MiB RAM disk) and a twisted.web site whose /status page reports, as
JSON, the exports the NBD server serves and how many clients it has right
now. Both run on the same reactor, so the page reads the server's state
directly: no locks, no second process. Run it to serve NBD on
127.0.0.1:10809 and the site on http://127.0.0.1:8080/status until Ctrl-C:

    python3 docs/examples/web_beside_nbd.py
"""

from __future__ import annotations

import json
from typing import Any

from twisted.application import strports
from twisted.application.service import MultiService
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from twisted_nbd.config import Config, ExportSpec
from twisted_nbd.service import NBDService, build

MiB = 1 << 20


class Status(Resource):
    """GET /status: the NBD server's exports and open connections, as JSON."""

    isLeaf = True

    def __init__(self, nbd: NBDService) -> None:
        super().__init__()
        self.nbd = nbd

    def render_GET(self, request: Request) -> bytes:
        factory = self.nbd.factory
        status = {
            "exports": [
                {"name": export.name, "size": export.size, "read_only": export.read_only}
                for export in factory.registry
            ],
            "connections": factory.connection_count,
        }
        request.setHeader(b"content-type", b"application/json")
        return json.dumps(status).encode("utf-8")


def make_service(reactor: Any, listen: str, web_listen: str) -> MultiService:
    """
    The NBD server on C{listen} and the status site on C{web_listen}
    (Twisted endpoint strings), under one parent: starting or stopping
    the parent starts or stops both.
    """
    config = Config([ExportSpec(name="disk", memory=64 * MiB)], listen=(listen,))
    nbd = build(config, reactor)
    root = Resource()
    root.putChild(b"status", Status(nbd))
    web = strports.service(web_listen, Site(root), reactor=reactor)
    top = MultiService()
    nbd.setServiceParent(top)
    web.setServiceParent(top)
    return top


if __name__ == "__main__":
    from twisted.internet import reactor

    top = make_service(reactor, "tcp:10809:interface=127.0.0.1", "tcp:8080:interface=127.0.0.1")
    top.startService()
    # Ctrl-C stops the reactor, which first waits for both services to stop.
    reactor.addSystemEventTrigger("before", "shutdown", top.stopService)
    reactor.run()
