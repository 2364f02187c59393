"""
Build the server from twistd-style arguments, as `twistd nbd` does.

Options parses and checks the arguments (an image must exist or be
creatable) and raises UsageError with a one-line message; makeService
builds the service tree. Run this file with the server's options:

    python3 docs/examples/embed_options.py --image disk.img --size 1G
"""

from __future__ import annotations

from typing import Any, Sequence

from twisted.application.service import MultiService

from twisted_nbd.tap import Options, makeService


def make_service(
    reactor: Any, listen: str, arguments: Sequence[str] = ("--memory", "64M", "--name", "disk")
) -> MultiService:
    """
    The service tree C{twistd nbd ARGUMENTS --listen LISTEN} would run.

    @raise twisted.python.usage.UsageError: the arguments are wrong.
    """
    options = Options()
    options.parseOptions([*arguments, "--listen", listen])
    return makeService(options, reactor)


if __name__ == "__main__":
    import sys

    from twisted.internet import reactor
    from twisted.python.usage import UsageError

    try:
        server = make_service(reactor, "tcp:10809:interface=127.0.0.1", sys.argv[1:])
    except UsageError as e:
        sys.exit(f"{sys.argv[0]}: {e}")
    server.startService()
    reactor.addSystemEventTrigger("before", "shutdown", server.stopService)
    reactor.run()
