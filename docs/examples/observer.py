"""
Watch a server's requests with an observer: count them by command, add up
the time they took, and log the ones that fail.

Run this file to serve a RAM disk on 127.0.0.1:10809 and log to the
terminal until Ctrl-C:

    python3 docs/examples/observer.py
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from twisted.logger import Logger

from twisted_nbd.config import Config, ExportSpec
from twisted_nbd.constants import Cmd, Errno
from twisted_nbd.events import Request
from twisted_nbd.observers import ConnectionInfo, ServerObserver
from twisted_nbd.service import NBDService, build

MiB = 1 << 20


class RequestStats(ServerObserver):
    """Counts finished requests by command; logs each export opened and each failure."""

    log = Logger()

    def __init__(self) -> None:
        self.finished: Counter[str] = Counter()
        self.failed: Counter[str] = Counter()
        self.seconds = 0.0

    def export_chosen(self, connection: ConnectionInfo, name: str) -> None:
        self.log.info("{peer} opened export {name!r}", peer=connection.peer, name=name)

    def request_finished(
        self, connection: ConnectionInfo, request: Request, errno: int, elapsed: float
    ) -> None:
        # Called in the reactor thread for every reply: keep it quick, never raise.
        command = Cmd(request.command).name
        self.finished[command] += 1
        self.seconds += elapsed
        if errno:
            self.failed[command] += 1
            self.log.warn(
                "{peer}: {command} of {length} bytes at {offset} failed: {errno}",
                peer=connection.peer,
                command=command,
                length=request.length,
                offset=request.offset,
                errno=Errno(errno).name,
            )


def make_service(reactor: Any, listen: str, stats: RequestStats) -> NBDService:
    """A server of one RAM disk on C{listen}, whose requests C{stats} sees."""
    config = Config([ExportSpec(name="disk", memory=64 * MiB)], listen=(listen,))
    return build(config, reactor, observers=[stats])


if __name__ == "__main__":
    import sys

    from twisted.internet import reactor
    from twisted.logger import globalLogBeginner, textFileLogObserver

    globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stdout)])
    stats = RequestStats()
    server = make_service(reactor, "tcp:10809:interface=127.0.0.1", stats)
    server.startService()
    reactor.addSystemEventTrigger("before", "shutdown", server.stopService)
    reactor.run()
    print("requests:", dict(stats.finished), "failed:", dict(stats.failed))
