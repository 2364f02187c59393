# -*- test-case-name: tests.test_captive -*-
"""
Captive mode (C{--run COMMAND}) and C{--print-uri}.

C{twistd -n nbd --memory 1G --run 'qemu-img convert -n disk.qcow2 "$uri"'}
serves the export on a Unix socket in a private temporary directory, runs
COMMAND through C{/bin/sh -c} once the server listens, and exits with the
command's status when it ends, after the server has stopped (requests still
in flight finish first, as on any stop). This is nbdkit's captive mode; the
command sees the same variables nbdkit sets:

  - C{$uri}: the NBD URI of the default export
    (C{nbd+unix:///NAME?socket=PATH}, C{nbds+unix://...} with
    C{--tls require});
  - C{$nbd}: the same (nbdkit's older name for it);
  - C{$unixsocket}: the socket's path;
  - C{$exportname}: the default export's name;
  - C{$tls}: 0, 1 or 2 for C{--tls off}, C{on} and C{require}.

How the status gets out: twistd has no way for an application to choose
its exit status (its runner returns normally once the reactor has stopped,
and a C{SystemExit} raised in a shutdown trigger is caught as a failure).
So the process protocol records the status and stops the reactor, twistd
stops the services and cleans up (its pid file included), and an C{atexit}
handler registered before twistd's own ends the process with that status
(C{os._exit}, after flushing standard output). A command killed by a
signal makes the server die of the same signal, as nbdkit does.

C{--print-uri} prints the URI clients should use to standard output once
the first listener listens (its real address: a port chosen by the system
or a socket passed by systemd included).
"""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import sys
import tempfile
from typing import Any, Callable, Mapping
from urllib.parse import quote

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import MultiService, Service
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from twisted_nbd.tls import TLSSettings

__all__ = [
    "CaptiveService",
    "PrintURIService",
    "attach",
    "private_socket",
    "run_environment",
    "uri_for",
]

_log = Logger()

#: The status the process exits with, once captive mode has one.
_exit: list[tuple[str, int]] = []


def _exit_with_status() -> None:
    """
    The C{atexit} handler: end the process with the captive command's status
    (see the module docstring). Registered at import, before twistd's own
    handlers, so it runs after them.
    """
    if not _exit:
        return
    kind, value = _exit[-1]
    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        try:
            if stream is not None:
                stream.flush()
        except Exception:
            pass
    if kind == "signal":
        try:
            signal.signal(value, signal.SIG_DFL)  # SIGKILL and SIGSTOP refuse
        except (OSError, ValueError):
            pass
        os.kill(os.getpid(), value)
        # Still here (a signal that does not kill): exit as a shell reports it.
        os._exit(128 + value)
    os._exit(value)


atexit.register(_exit_with_status)


def private_socket() -> str:
    """
    A path for a Unix socket in a new directory only this user can enter;
    the directory is removed when the process exits.
    """
    directory = tempfile.mkdtemp(prefix="twisted-nbd-")
    atexit.register(shutil.rmtree, directory, True)
    return os.path.join(directory, "nbd.sock")


def uri_for(address: object, export_name: str, tls: TLSSettings) -> str:
    """
    The NBD URI (as libnbd, qemu and nbdkit write them) of C{export_name}
    on a server listening at C{address} (an L{IPv4Address},
    L{IPv6Address} or L{UNIXAddress}).

    With C{--tls require} the scheme is C{nbds} (C{nbds+unix}), with
    libnbd's query parameters for the credentials where the server's own
    say where the client's are: C{tls-certificates=DIR} (the client finds
    C{ca-cert.pem} there) for C{--tls-certificates DIR}, and
    C{tls-psk-file=FILE&tls-username=NAME} (the file's first user) for
    C{--tls-psk FILE}.

    @raise ValueError: C{address} is of another kind.
    """
    secure = tls.mode == "require"
    path = "/" + quote(export_name, safe="")
    query: list[str] = []
    if isinstance(address, UNIXAddress):
        name = _socket_path(address)
        scheme = "nbds+unix" if secure else "nbd+unix"
        base = f"{scheme}://{path}"
        query.append("socket=" + quote(name, safe="/"))
    elif isinstance(address, (IPv4Address, IPv6Address)):
        host = address.host
        if host in ("0.0.0.0", "::", ""):
            host = "localhost"
        elif isinstance(address, IPv6Address):
            host = f"[{host}]"
        base = f"{'nbds' if secure else 'nbd'}://{host}:{address.port}{path}"
    else:
        raise ValueError(f"no NBD URI for an address like {address!r}")
    if secure:
        if tls.psk_file is not None:
            query.append("tls-psk-file=" + quote(tls.psk_file, safe="/"))
            user = _first_psk_user(tls.psk_file)
            if user:
                query.append("tls-username=" + quote(user, safe=""))
        elif tls.cert is not None and tls.ca is not None:
            directory = os.path.dirname(tls.ca)
            if os.path.basename(tls.ca) == "ca-cert.pem":
                query.append("tls-certificates=" + quote(directory, safe="/"))
    return base + ("?" + "&".join(query) if query else "")


def _socket_path(address: UNIXAddress) -> str:
    raw = address.name
    name = raw.decode("utf-8", "surrogateescape") if isinstance(raw, bytes) else raw
    return name or ""


def _first_psk_user(path: str) -> str | None:
    """The first user of a PSK file (C{username:hexkey} lines), if it can be read."""
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                user, sep, _ = line.strip().partition(":")
                if sep and user:
                    return user
    except OSError:
        return None
    return None


def run_environment(
    base: Mapping[str, str], uri: str, address: object, export_name: str, tls: TLSSettings
) -> dict[str, str]:
    """The environment of the captive command: C{base} with nbdkit's variables."""
    env = dict(base)
    env["uri"] = env["nbd"] = uri
    env["exportname"] = export_name
    env["tls"] = {"off": "0", "on": "1", "require": "2"}[tls.mode]
    if isinstance(address, UNIXAddress):
        env["unixsocket"] = _socket_path(address)
        env.pop("port", None)
    elif isinstance(address, (IPv4Address, IPv6Address)):
        env["port"] = str(address.port)
        env.pop("unixsocket", None)
    return env


def _first_listener(top: MultiService) -> StreamServerEndpointService:
    """The first listener of a service tree built by L{twisted_nbd.service.build}."""
    for child in top:
        if isinstance(child, StreamServerEndpointService):
            return child
    raise ValueError("the service tree has no listener")


def _when_listening(listener: StreamServerEndpointService, then: Callable[[Any], None]) -> None:
    """
    Call C{then} with the listener's port once it listens. Twisted keeps
    the port's Deferred in C{_waitingForPort} (set when the service
    starts); it is the only way to the port the endpoint made.
    """
    waiting = listener._waitingForPort
    assert waiting is not None, "the listener has not started"

    def got(port: Any) -> Any:
        then(port)
        return port

    waiting.addCallback(got)


class PrintURIService(Service):
    """
    Prints the URI of the default export on the first listener to standard
    output once it listens (C{--print-uri}).
    """

    def __init__(
        self,
        top: MultiService,
        export_name: str,
        tls: TLSSettings,
        write: Callable[[str], None] | None = None,
    ) -> None:
        self._top = top
        self._export_name = export_name
        self._tls = tls
        self._write = write if write is not None else _write_stdout

    def startService(self) -> None:
        Service.startService(self)

        def listening(port: Any) -> None:
            self._write(uri_for(port.getHost(), self._export_name, self._tls) + "\n")

        _when_listening(_first_listener(self._top), listening)


def _write_stdout(text: str) -> None:
    # twistd replaces sys.stdout with its log: write to the real one.
    os.write(1, text.encode("utf-8", "surrogateescape"))


class _Command(ProcessProtocol):
    def __init__(self, service: CaptiveService) -> None:
        self.service = service

    def processEnded(self, reason: Failure) -> None:  # noqa: N802 - Twisted's name
        self.service._ended(reason)


class CaptiveService(Service):
    """
    Runs the C{--run} command once the first listener listens, and stops
    the reactor when it ends; the process then exits with its status (see
    the module docstring).

    @ivar status: C{("exit", N)} or C{("signal", N)} once the command ended.
    """

    def __init__(
        self,
        top: MultiService,
        command: str,
        export_name: str,
        tls: TLSSettings,
        reactor: Any,
        shell: str = "/bin/sh",
        record: Callable[[tuple[str, int]], None] | None = None,
    ) -> None:
        self._top = top
        self.command = command
        self._export_name = export_name
        self._tls = tls
        self._reactor = reactor
        self._shell = shell
        self._record = record if record is not None else _exit.append
        self._process: Any = None
        self.status: tuple[str, int] | None = None

    def startService(self) -> None:
        Service.startService(self)
        _when_listening(_first_listener(self._top), self._spawn)

    def _spawn(self, port: Any) -> None:
        if not self.running:
            return
        address = port.getHost()
        uri = uri_for(address, self._export_name, self._tls)
        env = run_environment(os.environ, uri, address, self._export_name, self._tls)
        _log.info("Running {command!r} with uri={uri}", command=self.command, uri=uri)
        self._process = self._reactor.spawnProcess(
            _Command(self),
            self._shell,
            [self._shell, "-c", self.command],
            env=env,
            # The command talks to the user directly.
            childFDs={0: 0, 1: 1, 2: 2},
        )

    def _ended(self, reason: Failure) -> None:
        self._process = None
        value = reason.value
        signum = getattr(value, "signal", None)
        code = getattr(value, "exitCode", None)
        if signum is not None:
            self.status = ("signal", int(signum))
            _log.info("The command was killed by signal {signal}", signal=signum)
        else:
            self.status = ("exit", int(code or 0))
            _log.info("The command exited with status {status}", status=self.status[1])
        self._record(self.status)
        if self._reactor.running:
            self._reactor.stop()
        else:
            # A command that ends at once may be reaped while the reactor is
            # still starting up (before it counts as running).
            self._reactor.callWhenRunning(self._reactor.stop)

    def stopService(self) -> None:
        # The server is stopping first (a signal): the command goes too.
        Service.stopService(self)
        if self._process is not None:
            try:
                self._process.signalProcess("TERM")
            except Exception:
                pass  # it has just ended


def attach(
    top: MultiService,
    reactor: Any,
    export_name: str,
    tls: TLSSettings,
    run: str | None,
    print_uri: bool,
) -> None:
    """
    Add the services of C{--run} and C{--print-uri} to a tree built by
    L{twisted_nbd.service.build}, after its listeners.
    """
    # Typed as plain Services: mypy sees the inherited methods as Twisted's.
    if print_uri:
        printer: Service = PrintURIService(top, export_name, tls)
        printer.setServiceParent(top)
    if run is not None:
        captive: Service = CaptiveService(top, run, export_name, tls, reactor)
        captive.setServiceParent(top)
