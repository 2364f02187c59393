# -*- test-case-name: tests.test_logs -*-
"""
What the server logs about its clients, as structured events.

Every event goes through L{twisted.logger} with a format string (so
twistd's default log shows a readable line) and with its values as fields
(so a JSON log keeps them). Each carries C{nbd_event}, the kind of event,
and C{connection}, the connection's number in this process
(L{ConnectionInfo.id}):

  - C{connection-open} (info): C{peer}, the client's address.
  - C{export-chosen} (info): C{peer}, C{export}.
  - C{connection-close} (info): C{peer}, C{export} (C{None} if the client
    never chose one), C{tls_peer} (its certificate's subject DN, or
    C{"PSK name"}; empty without either), C{requests}, C{errors},
    C{bytes_read} and C{bytes_written} (payload bytes of READs and WRITEs),
    C{duration} (seconds) and C{reason} (C{"closed"} when the client or the
    server closed cleanly; else why the connection was dropped).
  - C{request-failed} (warn): the backend answered a request with an
    error: C{peer}, C{export}, C{command} (C{"READ"}, ...), C{offset},
    C{length}, C{errno} (C{"EIO"}, ...) and C{reason}. An unexpected
    exception (a bug in a backend) is logged with its traceback
    (C{log_failure}).
  - C{request-refused} (info): a request refused before it reached the
    backend (out of range, bad flags, read-only...); the same fields.
  - C{request} (debug), only with C{--verbose} (L{RequestLog}): every
    request as it finishes: C{peer}, C{export}, C{command}, C{offset},
    C{length}, C{errno} (C{"OK"} on success) and C{elapsed} (seconds).

Connection events are in the namespace C{twisted_nbd.connections},
per-request ones in C{twisted_nbd.requests}. C{twistd --logger
twisted_nbd.logs.json_observer} writes every event as one JSON object per
line (see L{json_observer}).
"""

from __future__ import annotations

import os
import sys
from typing import IO, TYPE_CHECKING, Any

from twisted.logger import (
    FileLogObserver,
    Logger,
    eventAsJSON,
    formatEvent,
)
from twisted.python.failure import Failure

from twisted_nbd.constants import Cmd, Errno
from twisted_nbd.events import Request, RequestRejected
from twisted_nbd.observers import ConnectionInfo, ServerObserver

if TYPE_CHECKING:
    from twisted_nbd.limits import RateLimitedLog

__all__ = [
    "CONNECTIONS",
    "JSON_LOG_ENV",
    "REQUESTS",
    "RequestLog",
    "connection_closed",
    "connection_opened",
    "export_chosen",
    "json_observer",
    "request_failed",
    "request_refused",
]

#: Connections opening, choosing an export and closing, and failed requests.
CONNECTIONS = Logger(namespace="twisted_nbd.connections")
#: Every request, with C{--verbose}.
REQUESTS = Logger(namespace="twisted_nbd.requests")

#: If set, L{json_observer} appends to this file instead of writing to
#: standard output (which twistd points at /dev/null when it daemonizes).
JSON_LOG_ENV = "TWISTED_NBD_JSON_LOG"


def _name(kind: type[Cmd] | type[Errno], number: int) -> str:
    """A command's or an errno's name, or its number if it has none."""
    try:
        return kind(number).name
    except ValueError:
        return str(number)


def connection_opened(info: ConnectionInfo) -> None:
    """Log a new connection (C{connection-open})."""
    CONNECTIONS.info(
        "Client {peer} connected (connection {connection})",
        nbd_event="connection-open",
        connection=info.id,
        peer=info.peer,
    )


def export_chosen(info: ConnectionInfo) -> None:
    """Log the export a client chose (C{export-chosen})."""
    CONNECTIONS.info(
        "Client {peer} uses export {export!r}",
        nbd_event="export-chosen",
        connection=info.id,
        peer=info.peer,
        export=info.export,
    )


def connection_closed(info: ConnectionInfo, reason: str, duration: float) -> None:
    """Log a connection's end, with what it did (C{connection-close})."""
    CONNECTIONS.info(
        "Client {peer} disconnected ({reason}) after {duration:.3f}s: export {export!r},"
        " {requests} requests ({errors} failed), {bytes_read} bytes read,"
        " {bytes_written} bytes written",
        nbd_event="connection-close",
        connection=info.id,
        peer=info.peer,
        export=info.export,
        tls_peer=info.tls_peer,
        requests=info.requests,
        errors=info.errors,
        bytes_read=info.bytes_read,
        bytes_written=info.bytes_written,
        duration=duration,
        reason=reason,
    )


def request_failed(
    info: ConnectionInfo,
    request: Request,
    errno: int,
    reason: str,
    failure: Failure | None = None,
    limit: RateLimitedLog | None = None,
) -> None:
    """
    Log a request the backend failed (C{request-failed}); with C{failure},
    an unexpected exception, logged with its traceback (always: a bug).
    With C{limit}, expected failures go through that rate-limited log, so a
    client whose requests keep failing does not flood the log.
    """
    fields: dict[str, Any] = {
        "nbd_event": "request-failed",
        "connection": info.id,
        "peer": info.peer,
        "export": info.export,
        "command": _name(Cmd, request.command),
        "offset": request.offset,
        "length": request.length,
        "errno": _name(Errno, errno),
        "reason": reason,
    }
    text = "{command} at {offset} for {length} bytes from {peer} failed: {errno}: {reason}"
    if failure is not None:
        CONNECTIONS.failure(text, failure, **fields)
    elif limit is not None:
        limit.warn("request-failed", "failed requests", text, level="warn", **fields)
    else:
        CONNECTIONS.warn(text, **fields)


def request_refused(
    info: ConnectionInfo, event: RequestRejected, limit: RateLimitedLog | None = None
) -> None:
    """
    Log a request refused before it reached the backend (C{request-refused}),
    through C{limit} if given (a rate-limited log: a storm of refused
    requests is counted, not logged line by line).
    """
    fields: dict[str, Any] = dict(
        nbd_event="request-refused",
        connection=info.id,
        peer=info.peer,
        export=info.export,
        command=_name(Cmd, event.command),
        offset=event.offset,
        length=event.length,
        errno=_name(Errno, event.errno),
        reason=event.reason,
    )
    text = "Refused {command} at {offset} for {length} bytes from {peer}: {errno}: {reason}"
    if limit is not None:
        limit.warn("request-refused", "refused requests", text, level="info", **fields)
    else:
        CONNECTIONS.info(text, **fields)


class RequestLog(ServerObserver):
    """
    Logs every request as it finishes (C{request} events, at debug level):
    what C{--verbose} adds. Being an observer, it takes the protocol off
    its fastest paths, which is why it is off by default.
    """

    def request_finished(
        self, connection: ConnectionInfo, request: Request, errno: int, elapsed: float
    ) -> None:
        REQUESTS.debug(
            "{command} at {offset} for {length} bytes from {peer}: {errno} in {elapsed:.6f}s",
            nbd_event="request",
            connection=connection.id,
            peer=connection.peer,
            export=connection.export,
            command=_name(Cmd, request.command),
            offset=request.offset,
            length=request.length,
            errno=_name(Errno, errno) if errno else "OK",
            elapsed=elapsed,
        )


def _json_line(event: dict[str, Any]) -> str:
    """
    One event as a line of JSON: what L{eventAsJSON} keeps (every field
    that JSON can hold, so L{twisted.logger.eventFromJSON} reads it back),
    plus C{log_text}, the formatted message, for readers that do not
    format Twisted's format strings themselves.
    """
    return eventAsJSON({**event, "log_text": formatEvent(event)}) + "\n"


def json_observer(out: IO[str] | None = None) -> FileLogObserver:
    """
    A log observer that writes each event as one line of JSON: for
    C{twistd --logger twisted_nbd.logs.json_observer}. twistd calls it
    with no arguments before it redirects standard output into the log,
    so the lines go to the real standard output (the terminal, or
    journald under systemd); run twistd with C{-n}, or set
    C{TWISTED_NBD_JSON_LOG} to a file's path to append to that file
    instead (twistd's C{--logfile} does not apply to a C{--logger}).

    @param out: where to write instead (tests).
    """
    if out is None:
        path = os.environ.get(JSON_LOG_ENV)
        out = open(path, "a", encoding="utf-8") if path else sys.stdout  # noqa: SIM115
    return FileLogObserver(out, _json_line)
