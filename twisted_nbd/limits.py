# -*- test-case-name: tests.test_limits -*-
"""
Connection limits and access control: who may connect, how many at once,
and how long a connection may take to negotiate or sit idle.

L{Limits} is the setting (part of L{twisted_nbd.config.Config});
L{ConnectionSlots} is a factory's bookkeeping, and L{ConnectionGuard} one
connection's share of it. The protocol calls the guard at four points
(made, data received, export chosen, lost); everything else is here, so the
sans-I/O core stays clock-free and the TLS handshake, which happens between
"made" and "export chosen", is covered by the handshake deadline without
any code of its own.

Every slot a connection takes is given back in L{ConnectionGuard.lost},
which L{twisted_nbd.protocol.NBDServerProtocol.connectionLost} always
calls, whatever closed the connection (a clean close, an error, a protocol
violation, a timeout, an abort): nbd-server leaked its negotiation slots
on some of those paths (its issue 126), until no client could connect.
"""

from __future__ import annotations

import ipaddress
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Union

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

__all__ = [
    "DEFAULT_HANDSHAKE_TIMEOUT",
    "DEFAULT_MAX_CONNECTIONS",
    "DEFAULT_MAX_NEGOTIATING",
    "ConnectionGuard",
    "ConnectionSlots",
    "Limits",
    "RateLimitedLog",
    "parse_network",
    "peer_ip",
]

#: Seconds a client has to reach transmission (qemu's default since its fix
#: for CVE-2024-7409).
DEFAULT_HANDSHAKE_TIMEOUT = 10.0
#: Connections at once. qemu's NBD server caps at 100 since CVE-2024-7409
#: (qemu-nbd at 1 unless --shared), nbdkit has no cap unless its limit
#: filter is used (then 1); this server is built for many connections per
#: client (multi-conn), so the cap is higher, but there is one.
DEFAULT_MAX_CONNECTIONS = 1000
#: Connections still negotiating at once: a well-behaved client negotiates
#: in milliseconds, so this only matters during a flood.
DEFAULT_MAX_NEGOTIATING = 100
#: Refusals and drops of one kind are logged at most once in this many seconds.
LOG_INTERVAL = 10.0
#: The idle timer looks this many times per idle timeout, so a connection is
#: closed between 1 and 1 + 1/IDLE_TICKS timeouts after it went idle.
IDLE_TICKS = 4

Network = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]
IPAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]


def parse_network(text: str) -> Network:
    """
    Parse an C{--allow} value: a CIDR (C{10.0.0.0/8}, C{fd00::/8}) or a
    single address (C{192.0.2.7}, C{::1}).

    @raise ValueError: it is neither, or has host bits set
        (C{10.1.2.3/8}); the message is one line for the user.
    """
    cleaned = text.strip()
    try:
        return ipaddress.ip_network(cleaned)
    except ValueError:
        pass
    try:
        loose = ipaddress.ip_network(cleaned, strict=False)
    except ValueError:
        raise ValueError(
            f"{text!r} is not an address or network: write e.g. 192.0.2.0/24, "
            "10.1.2.3, fd00::/8 or ::1"
        ) from None
    raise ValueError(f"{text!r} has host bits set: did you mean {loose}?")


def peer_ip(address: object) -> IPAddress | None:
    """
    The IP address of a peer (an IPv4-mapped IPv6 address, as a dual-stack
    socket reports IPv4 clients, becomes the IPv4 address), or C{None} for a
    peer without one (a Unix socket client).
    """
    if not isinstance(address, (IPv4Address, IPv6Address)):
        return None
    # An IPv6 link-local address may carry a zone (fe80::1%eth0).
    ip = ipaddress.ip_address(address.host.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


@dataclass(frozen=True)
class Limits:
    """
    How many connections a server takes, from where, and for how long.

    @ivar handshake_timeout: drop a client that has not chosen an export
        (reached transmission) this many seconds after connecting, TLS
        handshake included; 0 never.
    @ivar idle_timeout: close a connection in transmission that has had
        no request in flight and sent nothing for this many seconds; 0
        never (the default: the protocol itself never times clients out,
        C-08).
    @ivar max_connections: refuse new connections while this many are
        open; 0 no cap.
    @ivar max_negotiating: refuse new connections while this many are
        still negotiating; 0 no cap.
    @ivar allow: the networks (CIDR text) clients may connect from; empty:
        all. Clients of a Unix socket are always allowed.
    @raise ValueError: a setting is out of range or a network does not
        parse; the message is one line for the user.
    """

    handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT
    idle_timeout: float = 0.0
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    max_negotiating: int = DEFAULT_MAX_NEGOTIATING
    allow: tuple[str, ...] = ()
    _networks: tuple[Network, ...] = field(
        default=(), init=False, repr=False, compare=False, hash=False
    )

    def __post_init__(self) -> None:
        for name in ("handshake_timeout", "idle_timeout"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"the {_words(name)} must be a number of seconds")
            if not 0 <= value < float("inf"):
                raise ValueError(f"the {_words(name)} must be zero (none) or more seconds")
        for name in ("max_connections", "max_negotiating"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{_words(name)} must be a whole number, 0 for no cap")
        networks = tuple(parse_network(text) for text in self.allow)
        # Kept as text (for the config and the workers' JSON), parsed once.
        object.__setattr__(self, "allow", tuple(str(n) for n in networks))
        object.__setattr__(self, "_networks", networks)

    def allows(self, address: object) -> bool:
        """Whether a client at C{address} may connect (see C{allow})."""
        if not self._networks:
            return True
        ip = peer_ip(address)
        if ip is None:
            return True  # a Unix socket: its file permissions decide
        return any(ip in network for network in self._networks)

    def refusal(self, address: object, connections: int, negotiating: int) -> str | None:
        """
        Why a new connection from C{address} must be refused when
        C{connections} are open and C{negotiating} of them negotiate, or
        C{None} if it may come in.

        @return: C{"allow"}, C{"max-connections"} or C{"max-negotiating"}
            (the option that refuses it), or C{None}.
        """
        if not self.allows(address):
            return "allow"
        if self.max_connections and connections >= self.max_connections:
            return "max-connections"
        if self.max_negotiating and negotiating >= self.max_negotiating:
            return "max-negotiating"
        return None

    def to_json(self) -> dict[str, Any]:
        """The settings as JSON-compatible values (see L{from_json})."""
        data = asdict(self)
        del data["_networks"]
        data["allow"] = list(self.allow)
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Limits:
        """The L{Limits} that L{to_json} gave C{data} for."""
        return cls(**{**data, "allow": tuple(data.get("allow", ()))})


def _words(name: str) -> str:
    return name.replace("_", " ")


#: What each refusal is logged as.
_REFUSALS = {
    "allow": "Refused {peer}: not in --allow",
    "max-connections": "Refused {peer}: {limit} connections are open (--max-connections)",
    "max-negotiating": "Refused {peer}: {limit} connections are negotiating (--max-negotiating)",
}


class RateLimitedLog:
    """
    Logs a warning of each kind at most once per C{interval} seconds, so a
    flood of refusals does not flood the log: the first is logged at once,
    the others in the interval are counted, and at its end one line says how
    many there were. (Without a reactor to end intervals, the count is given
    on the next line of that kind instead.)

    @ivar counts: how many of each kind there were, logged or not.
    """

    def __init__(
        self,
        log: Logger,
        clock: Callable[[], float],
        interval: float = LOG_INTERVAL,
        reactor: IReactorTime | None = None,
        level: str = "warn",
    ) -> None:
        """
        @param level: the L{Logger} method that logs the lines
            (C{"warn"}, C{"info"}).
        """
        self._log = log
        self._emit: Callable[..., None] = getattr(log, level)
        self._clock = clock
        self._reactor = reactor
        self.interval = interval
        self.counts: Counter[str] = Counter()
        self._last: dict[str, float] = {}
        self._unlogged: Counter[str] = Counter()
        self._what: dict[str, str] = {}

    def warn(
        self, kind: str, what: str, format: str, *, level: str | None = None, **fields: object
    ) -> None:
        """
        Count one C{kind}; log it with C{format} unless one was logged
        lately. C{what} names many of them in the summary line
        (C{"connections refused by --allow"}). C{level} overrides the
        level this log was made with, for this line.
        """
        self.counts[kind] += 1
        now = self._clock()
        last = self._last.get(kind)
        if last is not None and now - last < self.interval:
            if not self._unlogged[kind] and self._reactor is not None:
                self._reactor.callLater(last + self.interval - now, self._summary, kind)
            self._unlogged[kind] += 1
            self._what[kind] = what
            return
        self._last[kind] = now
        unlogged = self._unlogged.pop(kind, 0)
        if unlogged:
            format += " ({unlogged} more {what} not logged in the last {interval:.0f}s)"
        emit = self._emit if level is None else getattr(self._log, level)
        emit(format, unlogged=unlogged, what=what, interval=self.interval, **fields)

    def _summary(self, kind: str) -> None:
        unlogged = self._unlogged.pop(kind, 0)
        if unlogged:
            self._emit(
                "{unlogged} more {what} in the last {interval:.0f}s, not logged one by one",
                unlogged=unlogged,
                what=self._what[kind],
                interval=self.interval,
            )


#: What many of each kind of refusal or drop are called in a summary line.
_WHAT = {
    "allow": "connections refused by --allow",
    "max-connections": "connections refused by --max-connections",
    "max-negotiating": "connections refused by --max-negotiating",
    "handshake-timeout": "clients dropped by --handshake-timeout",
    "idle-timeout": "clients closed by --idle-timeout",
}


class ConnectionSlots:
    """
    A server's connection bookkeeping: admits or refuses new connections
    (L{admit}, before the greeting) and counts those open and those still
    negotiating.

    @ivar limits: the L{Limits}.
    @ivar connections: connections open.
    @ivar negotiating: connections open that have not chosen an export.
    @ivar refused: how many connections were refused, by the option that
        refused them (C{"allow"}, C{"max-connections"},
        C{"max-negotiating"}).
    @ivar dropped: how many were dropped by a timeout
        (C{"handshake-timeout"}, C{"idle-timeout"}).
    """

    log = Logger()

    def __init__(
        self,
        limits: Limits | None = None,
        reactor: IReactorTime | None = None,
        clock: Callable[[], float] | None = None,
    ) -> None:
        """
        @param reactor: schedules the timeouts; without one, there are none.
        @param clock: what rate-limits the log (C{reactor.seconds} if
            C{None}, else C{time.monotonic}).
        """
        self.limits = limits if limits is not None else Limits()
        self.reactor = reactor
        if clock is None:
            clock = reactor.seconds if reactor is not None else time.monotonic
        self.connections = 0
        self.negotiating = 0
        self._refusals = RateLimitedLog(self.log, clock, reactor=reactor)
        self._drops = RateLimitedLog(self.log, clock, reactor=reactor)

    @property
    def refused(self) -> Counter[str]:
        return self._refusals.counts

    @property
    def dropped(self) -> Counter[str]:
        return self._drops.counts

    def admit(self, address: object, peer: str) -> bool:
        """
        Whether a new connection from C{address} (C{peer} as text) may come
        in; a refusal is counted and logged (rate-limited).
        """
        reason = self.limits.refusal(address, self.connections, self.negotiating)
        if reason is None:
            return True
        self.refuse(reason, peer)
        return False

    def refuse(self, reason: str, peer: str) -> None:
        """Count and log a refusal for C{reason} (see L{Limits.refusal})."""
        limit = {
            "max-connections": self.limits.max_connections,
            "max-negotiating": self.limits.max_negotiating,
        }.get(reason)
        self._refusals.warn(reason, _WHAT[reason], _REFUSALS[reason], peer=peer, limit=limit)

    def drop(self, kind: str, format: str, **fields: Any) -> None:
        """Count and log (rate-limited) a connection dropped by a timeout."""
        self._drops.warn(kind, _WHAT[kind], format, **fields)

    def guard(self, expired: Callable[[str], None], busy: Callable[[], bool]) -> ConnectionGuard:
        """
        Take the slots of a connection just made, and start its handshake
        deadline.

        @param expired: called with C{"handshake-timeout"} or
            C{"idle-timeout"} when one expires; it closes the connection.
        @param busy: whether the connection has work in flight (never idle
            then).
        """
        return ConnectionGuard(self, expired, busy)


class ConnectionGuard:
    """
    One connection's slots and timers (see L{ConnectionSlots.guard}).

    @ivar active: set by the protocol whenever data arrives; the idle timer
        clears it.
    """

    def __init__(
        self,
        slots: ConnectionSlots,
        expired: Callable[[str], None],
        busy: Callable[[], bool],
    ) -> None:
        self._slots = slots
        self._expired = expired
        self._busy = busy
        self.active = False
        self._negotiating = True
        self._open = True
        self._quiet = 0
        self._timer: IDelayedCall | None = None
        slots.connections += 1
        slots.negotiating += 1
        timeout = slots.limits.handshake_timeout
        if timeout and slots.reactor is not None:
            self._timer = slots.reactor.callLater(timeout, self._expire, "handshake-timeout")

    def export_chosen(self) -> None:
        """The handshake is over: give back the negotiating slot, start idling."""
        if not self._negotiating:
            return
        self._negotiating = False
        self._slots.negotiating -= 1
        self._cancel()
        if self._open and self._slots.limits.idle_timeout and self._slots.reactor is not None:
            self._schedule_idle()

    def lost(self) -> None:
        """The connection closed, however: give back every slot, stop every timer."""
        self._cancel()
        if not self._open:
            return
        self._open = False
        self._slots.connections -= 1
        if self._negotiating:
            self._negotiating = False
            self._slots.negotiating -= 1

    def _cancel(self) -> None:
        timer, self._timer = self._timer, None
        if timer is not None and timer.active():
            timer.cancel()

    def _expire(self, kind: str) -> None:
        self._timer = None
        if self._open:
            self._expired(kind)

    def _schedule_idle(self) -> None:
        reactor = self._slots.reactor
        assert reactor is not None
        interval = self._slots.limits.idle_timeout / IDLE_TICKS
        self._timer = reactor.callLater(interval, self._tick)

    def _tick(self) -> None:
        """
        One look at the connection: closed once IDLE_TICKS looks in a row
        saw no data arrive and nothing in flight, at this look or the one
        before (so idleness counts from when the last request finished, not
        from when it arrived).
        """
        self._timer = None
        if not self._open:
            return
        busy = self._busy()
        if self.active or busy:
            self._quiet = 0
        else:
            self._quiet += 1
            if self._quiet >= IDLE_TICKS:
                self._expired("idle-timeout")
                return
        self.active = busy
        self._schedule_idle()
