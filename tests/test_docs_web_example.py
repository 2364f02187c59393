"""
docs/examples/web_beside_nbd.py, shown on docs/embedding.md: the NBD
server and the web site run in one service tree; nbdinfo reads the export
while a Twisted client holds a connection that the /status page counts.
"""

from __future__ import annotations

import json
import os

import pytest
from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import MultiService
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent, readBody
from twisted.web.server import Site

from docs.examples import web_beside_nbd
from tests.interop.helpers import require_tool
from tests.test_compose import bound_port
from twisted_nbd.client import connect
from twisted_nbd.protocol import NBDServerFactory

pytestmark = pytest.mark.interop

LISTEN = "tcp:0:interface=127.0.0.1"


def listeners(service: MultiService) -> list[StreamServerEndpointService]:
    """The listening services anywhere in a service tree."""
    found: list[StreamServerEndpointService] = []
    for child in service:
        if isinstance(child, StreamServerEndpointService):
            found.append(child)
        elif isinstance(child, MultiService):
            found.extend(listeners(child))
    return found


class WebBesideNBDTests(TestCase):
    """The example's two services, started and stopped together."""

    async def test_nbdinfo_and_status(self) -> None:
        nbdinfo = require_tool("nbdinfo")
        top = web_beside_nbd.make_service(reactor, LISTEN, LISTEN)
        top.startService()

        def stop() -> Deferred[None] | None:
            return top.stopService() if top.running else None

        self.addCleanup(stop)
        ports = {}
        for listener in listeners(top):
            kind = "web" if isinstance(listener.factory, Site) else "nbd"
            self.assertTrue(kind == "web" or isinstance(listener.factory, NBDServerFactory))
            ports[kind] = await bound_port(listener)
        self.assertEqual(set(ports), {"nbd", "web"})

        out, err, code = await getProcessOutputAndValue(
            nbdinfo, ["--json", f"nbd://127.0.0.1:{ports['nbd']}/disk"], env=dict(os.environ)
        )
        self.assertEqual(code, 0, err)
        [export] = json.loads(out)["exports"]
        self.assertEqual(export["export-size"], 64 << 20)

        client = await connect(reactor, f"tcp:127.0.0.1:{ports['nbd']}", "disk")
        agent = Agent(reactor)
        response = await agent.request(b"GET", f"http://127.0.0.1:{ports['web']}/status".encode())
        self.assertEqual(response.code, 200)
        self.assertEqual(response.headers.getRawHeaders(b"content-type"), [b"application/json"])
        status = json.loads(await readBody(response))
        self.assertEqual(
            status,
            {
                "exports": [{"name": "disk", "size": 64 << 20, "read_only": False}],
                "connections": 1,
            },
        )
        await client.disconnect()
        await top.stopService()
        self.assertFalse(top.running)
