# -*- test-case-name: tests.test_backend_http -*-
"""
The C{http} backend: a read-only image on an HTTP(S) server, read with
Range requests through treq.

    twistd -n nbd --backend http:url=https://example.com/disk.img

Opening it asks the server (a HEAD, then a GET of C{Range: bytes=0-0})
for the image's size and whether it serves byte ranges; a server that
answers the range request with the whole file (200 instead of 206) is
refused at once with a clear message, since every NBD READ would then
download the image. Every READ is one GET with a C{Range} header, over
persistent connections (a treq C{HTTPClient} on a Twisted
C{HTTPConnectionPool}), at most C{connections} at a time. A request that
fails on the way (a connection dropped or reset, a timeout, a short body,
HTTP 408, 429, 500, 502, 503 or 504) is tried again up to C{retries} times,
waiting C{backoff}, then twice as long each time (at most
L{MAX_BACKOFF}); other HTTP errors (404, 403, ...) and a server that stops
honouring ranges fail the READ at once. Either way the client gets C{EIO}
and the reason is logged.

Block status reports everything as data: HTTP says nothing about holes.

Two ways in:
  - L{open_http} (a Deferred), for code that runs on a running reactor;
  - the registry's opener (C{--backend http:...}), which runs while the
    server is built, before the reactor runs, so it probes with a blocking
    C{http.client} request (L{probe_blocking}); both read the answers with
    the same functions (L{size_from_head}, L{size_from_range_probe}).
"""

from __future__ import annotations

import http.client
import re
import ssl
import time
from dataclasses import dataclass
from typing import Any, Mapping, Sequence
from urllib.parse import urljoin, urlsplit

from twisted.internet.defer import Deferred, DeferredSemaphore, fail, succeed
from twisted.internet.protocol import Protocol
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from twisted_nbd._wire import Errno
from twisted_nbd.backends import OpenContext
from twisted_nbd.errors import NBDError
from twisted_nbd.interfaces import Capabilities, Extent, IBlockDevice
from twisted_nbd.registry import DURATION, INT, PATH, SIZE, STRING, BackendPlugin, Key

__all__ = [
    "HTTPBlockDevice",
    "HTTPOptions",
    "MAX_BACKOFF",
    "open_http",
    "plugin",
    "probe_blocking",
    "size_from_head",
    "size_from_range_probe",
]

_log = Logger()

#: The longest wait between two attempts of one request, in seconds.
MAX_BACKOFF = 10.0
#: HTTP statuses worth another try: the server or a proxy is busy or broken
#: for a moment.
RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
#: How many redirects the blocking probe follows (treq follows them itself).
MAX_REDIRECTS = 5
#: How much of an error response's body goes into the logged reason.
_SNIPPET = 200

_CONTENT_RANGE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+|\*)\s*$", re.IGNORECASE)
_UNSATISFIED_RANGE = re.compile(r"bytes\s+\*/(\d+)\s*$", re.IGNORECASE)


@dataclass(frozen=True)
class HTTPOptions:
    """
    How the backend talks to the server.

    @ivar retries: further attempts after a request fails in a way that may
        pass (0: no retries).
    @ivar timeout: seconds one attempt (connecting, the headers and the
        whole body) may take.
    @ivar backoff: seconds before the first retry; doubled for each next
        one, up to L{MAX_BACKOFF}.
    @ivar connections: the most requests (and so connections) at once; as
        many persistent connections are kept for reuse.
    @ivar ca: a PEM file of CA certificates for HTTPS, instead of the
        system's.
    """

    retries: int = 3
    timeout: float = 30.0
    backoff: float = 0.1
    connections: int = 8
    ca: str | None = None

    def delay(self, attempt: int) -> float:
        """The wait before retry number C{attempt} (from 0)."""
        return float(min(self.backoff * (2**attempt), MAX_BACKOFF))


class _PermanentError(Exception):
    """A failure that another attempt would not mend (HTTP 404, no ranges)."""


class _TransientError(Exception):
    """A failure that may pass (HTTP 503, a short body)."""


# ---------------------------------------------------------------- probing


def _header(headers: Mapping[str, str], name: str) -> str | None:
    return headers.get(name.lower())


def size_from_head(url: str, status: int, headers: Mapping[str, str]) -> int | None:
    """
    Read the answer to a HEAD: the size from C{Content-Length}, if given.

    @param headers: the response's headers, names in lower case.
    @return: the size, or C{None} if the HEAD does not tell it: an error
        status (some servers refuse HEAD with 405 or 501, and a presigned
        object store URL signs GET only, so HEAD gets 403; the range probe
        that follows has the last word), or no length.
    @raise ValueError: the server says it serves no ranges
        (C{Accept-Ranges: none}).
    """
    if not 200 <= status < 300:
        return None
    ranges = (_header(headers, "accept-ranges") or "").strip().lower()
    if ranges == "none":
        raise ValueError(
            f"the server of {url} does not support Range requests (Accept-Ranges: none); "
            f"twisted-nbd reads the image in byte ranges"
        )
    length = _header(headers, "content-length")
    if length is None or not length.strip().isdigit():
        return None
    return int(length)


def size_from_range_probe(url: str, status: int, headers: Mapping[str, str]) -> int | None:
    """
    Read the answer to C{GET} with C{Range: bytes=0-0}: it must be 206
    Partial Content.

    @return: the image's size from C{Content-Range} (C{bytes 0-0/SIZE}), or
        C{None} if the server leaves it out (C{bytes 0-0/*}).
    @raise ValueError: the server ignored the range (200 with the whole
        file: it does not support ranges) or failed.
    """
    if status == 206:
        match = _CONTENT_RANGE.match(_header(headers, "content-range") or "")
        if match is None or match.group(1) != "0":
            raise ValueError(
                f"GET {url} with Range: bytes=0-0 answered 206 with Content-Range "
                f"{_header(headers, 'content-range')!r}, not bytes 0-0/SIZE"
            )
        total = match.group(3)
        return None if total == "*" else int(total)
    if status == 416:
        # Unsatisfiable: only an empty image has no byte 0.
        match = _UNSATISFIED_RANGE.match(_header(headers, "content-range") or "")
        if match is not None and match.group(1) == "0":
            return 0
    if 200 <= status < 300:
        advertised = _header(headers, "accept-ranges")
        said = f"Accept-Ranges: {advertised}" if advertised else "no Accept-Ranges header"
        raise ValueError(
            f"the server of {url} does not support Range requests: it answered HTTP {status} "
            f"instead of 206 Partial Content to Range: bytes=0-0 ({said}); twisted-nbd reads "
            f"the image in byte ranges"
        )
    raise ValueError(f"GET {url} with Range: bytes=0-0 answered HTTP {status}")


def choose_size(url: str, given: int | None, head: int | None, probed: int | None) -> int:
    """
    The size to serve: the C{size} key if given (it may be less than the
    server's file, never more), else what the server said.

    @raise ValueError: the server does not say, or the key asks for more
        than there is.
    """
    remote = probed if probed is not None else head
    if given is None:
        if remote is None:
            raise ValueError(f"the server of {url} does not say the image's size: give size=")
        return remote
    if remote is not None and given > remote:
        raise ValueError(f"size={given} is more than the {remote} bytes the server has at {url}")
    return given


def _check_url(url: str) -> None:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"url: {url!r} is not an http:// or https:// URL")


def _lower(headers: Any) -> dict[str, str]:
    return {name.lower(): value for name, value in headers}


def probe_blocking(url: str, options: HTTPOptions, given: int | None = None) -> int:
    """
    Probe the server with blocking requests (for the registry's opener,
    which runs before the reactor): HEAD, then C{GET} of byte 0, each
    attempted up to C{1 + options.retries} times as the data path is.

    @return: the size to serve.
    @raise ValueError: the server refuses, cannot be reached, or does not
        serve ranges; the message says which.
    """
    _check_url(url)
    head = _blocking(url, "HEAD", {}, options)
    head_size = size_from_head(url, head[0], head[1])
    probe = _blocking(url, "GET", {"Range": "bytes=0-0"}, options)
    return choose_size(url, given, head_size, size_from_range_probe(url, probe[0], probe[1]))


def _blocking(
    url: str, method: str, headers: dict[str, str], options: HTTPOptions
) -> tuple[int, dict[str, str]]:
    """One request with retries and redirects; its status and headers."""
    attempt = 0
    while True:
        try:
            return _blocking_once(url, method, headers, options)
        except (OSError, http.client.HTTPException, _TransientError) as e:
            if attempt >= options.retries:
                raise ValueError(
                    f"{method} {url} failed after {attempt + 1} attempts: {e or type(e).__name__}"
                ) from None
            time.sleep(options.delay(attempt))
            attempt += 1


def _blocking_once(
    url: str, method: str, headers: dict[str, str], options: HTTPOptions
) -> tuple[int, dict[str, str]]:
    for _ in range(MAX_REDIRECTS + 1):
        parts = urlsplit(url)
        connection: http.client.HTTPConnection
        if parts.scheme == "https":
            context = ssl.create_default_context(cafile=options.ca)
            connection = http.client.HTTPSConnection(
                parts.netloc, timeout=options.timeout, context=context
            )
        else:
            connection = http.client.HTTPConnection(parts.netloc, timeout=options.timeout)
        try:
            path = parts.path or "/"
            if parts.query:
                path += "?" + parts.query
            connection.request(method, path, headers=headers)
            response = connection.getresponse()
            response.read(64 * 1024)  # the byte asked for, or an error page: small
            status, found = response.status, _lower(response.getheaders())
        finally:
            connection.close()
        location = found.get("location")
        if status in (301, 302, 303, 307, 308) and location:
            url = urljoin(url, location)
            continue
        if status in RETRY_STATUSES:
            raise _TransientError(f"HTTP {status}")
        return status, found
    raise ValueError(f"{method} {url}: more than {MAX_REDIRECTS} redirects")


# ---------------------------------------------------------------- the device


class _Discard(Protocol):
    """Receives a response body nobody wants, and drops the connection at once."""

    def __init__(self) -> None:
        self.done: Deferred[None] = Deferred()

    def connectionMade(self) -> None:
        transport: Any = self.transport
        transport.stopProducing()

    def connectionLost(self, reason: Failure | None = None) -> None:
        if not self.done.called:
            self.done.callback(None)


def _quiet_factory() -> Any:
    from twisted.web.client import _HTTP11ClientFactory

    class QuietFactory(_HTTP11ClientFactory):
        noisy = False

    return QuietFactory


_QuietFactory: Any = None


def _make_client(reactor: Any, options: HTTPOptions) -> tuple[Any, Any]:
    """A treq C{HTTPClient} on a persistent connection pool, and the pool."""
    from treq.client import HTTPClient
    from twisted.web.client import Agent, BrowserLikePolicyForHTTPS, HTTPConnectionPool

    pool = HTTPConnectionPool(reactor, persistent=True)  # type: ignore[no-untyped-call]
    pool.maxPersistentPerHost = options.connections
    # Each new connection's factory would log "Starting factory" and
    # "Stopping factory" at info level: noise in the server's log.
    global _QuietFactory
    if _QuietFactory is None:
        _QuietFactory = _quiet_factory()
    pool._factory = _QuietFactory
    policy: Any
    if options.ca is not None:
        from twisted.internet import ssl as twisted_ssl

        with open(options.ca, "rb") as f:
            pem = f.read()
        marker = b"-----END CERTIFICATE-----"
        certificates = [
            twisted_ssl.Certificate.loadPEM(part + marker)
            for part in pem.split(marker)
            if b"-----BEGIN" in part
        ]
        if not certificates:
            raise ValueError(f"ca: {options.ca} holds no certificate")
        policy = BrowserLikePolicyForHTTPS(  # type: ignore[no-untyped-call]
            trustRoot=twisted_ssl.trustRootFromCertificates(certificates)  # type: ignore[no-untyped-call]
        )
    else:
        policy = BrowserLikePolicyForHTTPS()  # type: ignore[no-untyped-call]
    agent = Agent(  # type: ignore[no-untyped-call]
        reactor, contextFactory=policy, pool=pool, connectTimeout=options.timeout
    )
    return HTTPClient(agent), pool


def _response_headers(response: Any) -> dict[str, str]:
    found: dict[str, str] = {}
    for name, values in response.headers.getAllRawHeaders():
        found[name.decode("latin-1").lower()] = values[0].decode("latin-1")
    return found


@implementer(IBlockDevice)
class HTTPBlockDevice:
    """
    A read-only device whose bytes are an HTTP resource, read in ranges.
    Make one with L{open_http} (or the registry's C{http} backend), which
    checks the server first.

    @ivar url: the resource.
    @ivar size: the bytes served (the resource's size, or less).
    @ivar options: retries, timeouts, connections.
    @ivar requests: GETs sent, retries included (for tests and stats).
    @ivar retried: attempts that failed and were tried again.
    """

    def __init__(
        self, reactor: Any, url: str, size: int, options: HTTPOptions | None = None
    ) -> None:
        _check_url(url)
        self.reactor = reactor
        self.url = url
        self.size = size
        self.options = options or HTTPOptions()
        self.capabilities = Capabilities(
            can_write=False,
            can_flush=False,
            can_fua=False,
            can_trim=False,
            can_zero=False,
            can_fast_zero=False,
            can_cache=False,
            # Offered so that BLOCK_STATUS works: everything is data.
            can_extents=True,
            can_multi_conn=True,
            preferred_block=64 * 1024,
        )
        self._client, self._pool = _make_client(reactor, self.options)
        self._slots = DeferredSemaphore(self.options.connections)
        self._closed = False
        self.requests = 0
        self.retried = 0

    def __repr__(self) -> str:
        return f"<HTTPBlockDevice {self.url} size={self.size}>"

    # ------------------------------------------------------------ reading

    def read(self, offset: int, length: int) -> Deferred[bytes]:
        """
        Read C{length} bytes at C{offset} with one ranged GET (retried as
        the options say).

        @return: a Deferred that fires with exactly C{length} bytes, or
            fails with L{NBDError}: C{EINVAL} for a range past the end,
            C{EIO} (reason logged) when the server fails.
        """
        if offset < 0 or length < 0 or offset + length > self.size:
            return fail(
                NBDError(Errno.EINVAL, f"{length} bytes at {offset} run past the end ({self.size})")
            )
        if length == 0:
            return succeed(b"")
        if self._closed:
            return fail(NBDError(Errno.EIO, "the http device is closed"))
        return Deferred.fromCoroutine(self._read(offset, length))

    async def _read(self, offset: int, length: int) -> bytes:
        attempt = 0
        while True:
            try:
                data: bytes = await self._slots.run(self._timed, offset, length)
                return data
            except _PermanentError as e:
                reason = str(e)
            except Exception as e:
                reason = _describe(e)
                if attempt < self.options.retries and not self._closed:
                    delay = self.options.delay(attempt)
                    self.retried += 1
                    _log.info(
                        "http: GET {url} bytes {offset}+{length} failed ({reason}); "
                        "retrying in {delay:.2f} s",
                        url=self.url,
                        offset=offset,
                        length=length,
                        reason=reason,
                        delay=delay,
                    )
                    await deferLater(self.reactor, delay, lambda: None)
                    attempt += 1
                    continue
                reason = f"{reason} (after {attempt + 1} attempts)"
            message = f"GET {self.url} bytes {offset}-{offset + length - 1}: {reason}"
            _log.warn("http: {reason}", reason=message)
            raise NBDError(Errno.EIO, message)

    def _timed(self, offset: int, length: int) -> Deferred[bytes]:
        return _within(self.reactor, self.options.timeout, self._attempt(offset, length))

    async def _attempt(self, offset: int, length: int) -> bytes:
        import treq

        self.requests += 1
        last = offset + length - 1
        response = await self._client.get(
            self.url, headers={"Range": f"bytes={offset}-{last}"}, unbuffered=True
        )
        status = response.code
        if status == 206:
            headers = _response_headers(response)
            match = _CONTENT_RANGE.match(headers.get("content-range", ""))
            if match is None or (int(match.group(1)), int(match.group(2))) != (offset, last):
                await self._discard(response)
                raise _PermanentError(
                    f"the server answered Content-Range {headers.get('content-range')!r} "
                    f"to Range: bytes={offset}-{last}"
                )
            data: bytes = await treq.content(response)
            if len(data) != length:
                raise _TransientError(f"a short body: {len(data)} of {length} bytes")
            return data
        if 200 <= status < 300:
            await self._discard(response)
            raise _PermanentError(
                f"HTTP {status} instead of 206 Partial Content: the server no longer "
                f"honours Range requests"
            )
        body = await self._snippet(response)
        reason = f"HTTP {status} {_phrase(response)}{body}"
        if status in RETRY_STATUSES:
            raise _TransientError(reason)
        raise _PermanentError(reason)

    async def _discard(self, response: Any) -> None:
        protocol = _Discard()
        response.deliverBody(protocol)
        await protocol.done

    async def _snippet(self, response: Any) -> str:
        """The start of an error page, for the log (without waiting for a huge one)."""
        import treq

        if int(response.length or 0) > 64 * 1024:
            await self._discard(response)
            return ""
        text = (await treq.content(response)).decode("utf-8", "replace").strip()
        text = " ".join(text.split())[:_SNIPPET]
        return f": {text}" if text else ""

    # ------------------------------------------------------------ the rest

    def write(self, offset: int, data: bytes, fua: bool = False) -> Deferred[None]:
        return fail(NBDError(Errno.EPERM, "the http backend is read-only"))

    def flush(self) -> Deferred[None]:
        return succeed(None)

    def trim(self, offset: int, length: int, fua: bool = False) -> Deferred[None]:
        return fail(NBDError(Errno.EPERM, "the http backend is read-only"))

    def write_zeroes(
        self,
        offset: int,
        length: int,
        fua: bool = False,
        may_trim: bool = True,
        fast: bool = False,
    ) -> Deferred[None]:
        return fail(NBDError(Errno.EPERM, "the http backend is read-only"))

    def cache(self, offset: int, length: int) -> Deferred[None]:
        return succeed(None)

    def block_status(self, offset: int, length: int) -> Deferred[Sequence[Extent]]:
        """Everything is data: HTTP does not say where the holes are."""
        return succeed([Extent(max(1, min(length, self.size - offset)), 0)])

    def close(self) -> Deferred[None]:
        """
        Stop and drop the kept connections.

        @return: a Deferred that fires with C{None} once they are closed.
        """
        self._closed = True
        d: Deferred[None] = self._pool.closeCachedConnections()
        return d


def _within(reactor: Any, timeout: float, coroutine: Any) -> Deferred[Any]:
    """
    Run C{coroutine}, cancelling it after C{timeout} seconds. Cancelling it
    cancels what it waits on (the request, whose connection is aborted, or
    the body), which fails with whatever Twisted makes of that
    (C{ResponseNeverReceived}, ...): the failure is replaced by one that
    says it was the timeout.
    """
    d = Deferred.fromCoroutine(coroutine)
    expired: list[bool] = []

    def expire() -> None:
        expired.append(True)
        d.cancel()

    call = reactor.callLater(timeout, expire)

    def done(result: Any) -> Any:
        if call.active():
            call.cancel()
        if expired and isinstance(result, Failure):
            error = _TransientError(f"TimeoutError: no answer within {timeout:g} s")
            return Failure(error)  # type: ignore[no-untyped-call]
        return result

    return d.addBoth(done)


def _phrase(response: Any) -> str:
    phrase = response.phrase
    return phrase.decode("latin-1") if isinstance(phrase, bytes) else str(phrase or "")


def _describe(error: BaseException) -> str:
    """A one-line reason for a network failure (Twisted wraps them in lists)."""
    reasons = getattr(error, "reasons", None)
    if reasons:
        inner = "; ".join(
            r.getErrorMessage() if isinstance(r, Failure) else str(r) for r in reasons
        )
        return f"{type(error).__name__}: {inner}"
    text = str(error)
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


async def _probe(reactor: Any, url: str, options: HTTPOptions, given: int | None) -> int:
    """The asynchronous twin of L{probe_blocking}, with treq."""
    import treq

    client, pool = _make_client(reactor, options)
    try:

        async def ask(method: str, headers: dict[str, str]) -> tuple[int, dict[str, str]]:
            attempt = 0
            while True:
                try:

                    async def once() -> Any:
                        response = await client.request(
                            method, url, headers=headers, unbuffered=True
                        )
                        await treq.content(response)
                        return response

                    response = await _within(reactor, options.timeout, once())
                    if response.code not in RETRY_STATUSES:
                        return int(response.code), _response_headers(response)
                    error: str = f"HTTP {response.code}"
                except Exception as e:
                    error = _describe(e)
                if attempt >= options.retries:
                    raise ValueError(f"{method} {url} failed after {attempt + 1} attempts: {error}")
                await deferLater(reactor, options.delay(attempt), lambda: None)
                attempt += 1

        status, headers = await ask("HEAD", {})
        head = size_from_head(url, status, headers)
        status, headers = await ask("GET", {"Range": "bytes=0-0"})
        return choose_size(url, given, head, size_from_range_probe(url, status, headers))
    finally:
        await pool.closeCachedConnections()


def open_http(
    reactor: Any, url: str, options: HTTPOptions | None = None, size: int | None = None
) -> Deferred[HTTPBlockDevice]:
    """
    Check the server (size, range support) and open the device.

    @param size: serve this many bytes instead of the server's size (no
        more than it has).
    @return: a Deferred that fires with an L{HTTPBlockDevice}, or fails with
        C{ValueError} saying why the server cannot be used.
    """
    options = options or HTTPOptions()
    try:
        _check_url(url)
    except ValueError as e:
        return fail(e)

    async def opened() -> HTTPBlockDevice:
        found = await _probe(reactor, url, options, size)
        return HTTPBlockDevice(reactor, url, found, options)

    return Deferred.fromCoroutine(opened())


def _check(values: Mapping[str, Any]) -> None:
    _check_url(values["url"])
    if values["retries"] < 0:
        raise ValueError("retries: must be 0 or more")
    if values["connections"] < 1:
        raise ValueError("connections: must be 1 or more")
    if values["timeout"] <= 0:
        raise ValueError("timeout: must be more than 0")


def _options(values: Mapping[str, Any]) -> HTTPOptions:
    return HTTPOptions(
        retries=values["retries"],
        timeout=values["timeout"],
        backoff=values["backoff"],
        connections=values["connections"],
        ca=values["ca"],
    )


def _open(values: Mapping[str, Any], context: OpenContext) -> HTTPBlockDevice:
    options = _options(values)
    size = probe_blocking(values["url"], options, values["size"])
    return HTTPBlockDevice(context.reactor, values["url"], size, options)


plugin = BackendPlugin(
    name="http",
    help="a read-only image on an HTTP(S) server, read with Range requests",
    keys=(
        Key("url", STRING, help="the image's http:// or https:// URL"),
        Key("size", SIZE, None, "serve this many bytes (default: the size the server gives)"),
        Key("retries", INT, 3, "further attempts of a request that failed on the way"),
        Key("timeout", DURATION, 30.0, "seconds one attempt may take", shown="30s"),
        Key("backoff", DURATION, 0.1, "wait before the first retry; doubles", shown="100ms"),
        Key("connections", INT, 8, "requests (and kept connections) at once"),
        Key("ca", PATH, None, "PEM file of CA certificates for https (default: the system's)"),
    ),
    open=_open,
    check=_check,
)
