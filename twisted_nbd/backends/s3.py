# -*- test-case-name: tests.test_s3 -*-
"""
The C{s3} backend: an image stored as fixed-size objects in an S3 bucket.

Serve it with::

    twistd -n nbd --backend s3:endpoint=http://127.0.0.1:7480,bucket=disks,prefix=vm1/,size=10G

Layout (see C{docs/backend-s3.md}):

  - object C{i} holds the bytes C{[i * object_size, (i + 1) * object_size)}
    of the image (the last one is shorter when the size is not a multiple)
    under the key C{PREFIX} followed by C{i} as 16 hexadecimal digits;
  - a missing object reads as zeroes, so a new image costs nothing and
    trimming or zeroing whole objects deletes them;
  - the image's size and object size are kept in a small JSON object,
    C{PREFIX + "twisted-nbd.json"}, written when the image is created
    (C{size=} given and no such object yet) and checked when it is opened
    again.

Requests are signed with botocore's L{S3SigV4Auth} on an L{AWSRequest}
(signing is pure computation: no botocore session does I/O in the reactor)
and sent with treq over a persistent connection pool; at most
C{max-requests} are in flight at once (a L{DeferredSemaphore}). 5xx
answers, C{429} and connection failures are retried with exponential
backoff a bounded number of times; what still fails becomes C{EIO} for the
client, with the reason logged.

Durability: a write is acknowledged only after every PUT it needed
succeeded, and S3 (and radosgw) read-after-write consistency makes a later
GET see it. So every acknowledged write is already stored: FLUSH and FUA
have nothing left to do and fire at once. There is no write-back cache.

Partial writes of an object read it, change it and write it back while
holding that object's L{DeferredLock}, as do whole-object writes and
deletes, so concurrent writes to one object are applied one at a time and
never lose each other's bytes. The locks are in this process: two servers
writing the same image are not coherent (see the docs page).

Opening the image (the metadata object, creating the bucket) is done with
a blocking HTTP client when the server is built, before the reactor runs
(L{open_blocking}), or asynchronously with L{S3Device.open}; both run the
same steps (L{_open_steps}).
"""

from __future__ import annotations

import http.client
import json
import re
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Generator, Mapping, Sequence
from urllib.parse import quote, urlsplit
from xml.etree import ElementTree

from twisted.internet.defer import (
    CancelledError,
    Deferred,
    DeferredList,
    DeferredLock,
    DeferredSemaphore,
    succeed,
)
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IBodyProducer
from zope.interface import implementer

from twisted_nbd._wire import Errno
from twisted_nbd.errors import NBDError
from twisted_nbd.interfaces import STATE_HOLE, STATE_ZERO, Capabilities, Extent, IBlockDevice
from twisted_nbd.registry import BOOL, DURATION, INT, SIZE, STRING, BackendPlugin, Key

if TYPE_CHECKING:
    from botocore.credentials import Credentials  # type: ignore[import-untyped]

    from twisted_nbd.backends import OpenContext

__all__ = [
    "DEFAULT_OBJECT_SIZE",
    "ImageInfo",
    "S3Config",
    "S3Device",
    "S3Error",
    "S3Response",
    "Signer",
    "TreqTransport",
    "open_blocking",
    "plugin",
]

_log = Logger()

#: The object size of a new image unless C{object-size=} says otherwise.
DEFAULT_OBJECT_SIZE = 4 * 1024 * 1024
#: The smallest and largest object sizes accepted (powers of two between).
MIN_OBJECT_SIZE = 4096
MAX_OBJECT_SIZE = 256 * 1024 * 1024
#: The name, after the prefix, of the object that describes the image.
META_NAME = "twisted-nbd.json"
#: The format number written into that object.
META_FORMAT = 1
#: The largest payload of one NBD request (the default of L{Capabilities}).
MAX_BLOCK = 32 * 1024 * 1024

_DATA_NAME = re.compile(r"[0-9a-f]{16}")
#: Statuses retried: server errors and "slow down".
_RETRIED = frozenset({429, 500, 502, 503, 504})


class S3Error(Exception):
    """
    A request to S3 failed for good (after any retries); C{str()} says
    which request and why.
    """


@dataclass(frozen=True)
class S3Response:
    """
    An HTTP answer from S3.

    @ivar status: the HTTP status.
    @ivar body: the whole body.
    @ivar headers: the headers, names in lower case (the last of repeats).
    """

    status: int
    body: bytes = b""
    headers: Mapping[str, str] = field(default_factory=dict)

    @property
    def code(self) -> str:
        """The S3 error code (C{NoSuchKey}, ...) of an error body, or C{""}."""
        if self.status < 300 or not self.body:
            return ""
        try:
            root = ElementTree.fromstring(self.body)
        except ElementTree.ParseError:
            return ""
        for element in root.iter():
            if _local(element.tag) == "Code":
                return element.text or ""
        return ""

    def describe(self) -> str:
        """C{HTTP 403 AccessDenied}: the status and the S3 error code."""
        code = self.code
        return f"HTTP {self.status}" + (f" {code}" if code else "")


def _local(tag: str) -> str:
    """An XML tag without its C{{namespace}}."""
    return tag.rpartition("}")[2]


# ---------------------------------------------------------------- signing


class Signer:
    """
    Signs S3 requests with AWS Signature Version 4 (botocore's
    L{S3SigV4Auth}); path-style URLs (C{ENDPOINT/BUCKET/KEY}), which every
    S3 implementation accepts.
    """

    def __init__(self, endpoint: str, bucket: str, credentials: Credentials, region: str) -> None:
        from botocore.auth import S3SigV4Auth  # type: ignore[import-untyped]

        self.endpoint = endpoint.rstrip("/")
        self.bucket = bucket
        self._auth = S3SigV4Auth(credentials, "s3", region)

    def url(self, key: str | None, query: Sequence[tuple[str, str]] = ()) -> str:
        """The URL of C{key} in the bucket (of the bucket if C{None})."""
        path = f"{self.endpoint}/{quote(self.bucket, safe='')}"
        if key is not None:
            path += "/" + quote(key, safe="/")
        if query:
            # Encoded and sorted as SigV4's canonical query string wants.
            path += "?" + "&".join(
                f"{quote(k, safe='-_.~')}={quote(v, safe='-_.~')}" for k, v in sorted(query)
            )
        return path

    def sign(
        self, method: str, url: str, body: bytes, headers: Mapping[str, str] = {}
    ) -> dict[str, str]:
        """The headers to send C{method url} with, the signature's among them."""
        from botocore.awsrequest import AWSRequest  # type: ignore[import-untyped]

        request = AWSRequest(method=method, url=url, data=body, headers=dict(headers))
        self._auth.add_auth(request)
        return {name: str(value) for name, value in request.headers.items()}


def find_credentials(access_key: str | None, secret_key: str | None) -> Credentials:
    """
    The credentials given, or else botocore's usual chain (the
    C{AWS_ACCESS_KEY_ID}/C{AWS_SECRET_ACCESS_KEY} environment variables,
    C{~/.aws/credentials}, C{~/.aws/config}, ...). Blocking: call it while
    the server is built, not in the reactor.

    @raise ValueError: only one key is given, or none is found.
    """
    from botocore.credentials import Credentials

    if (access_key is None) != (secret_key is None):
        raise ValueError("give both access-key and secret-key, or neither")
    if access_key is not None and secret_key is not None:
        return Credentials(access_key, secret_key)
    import botocore.session  # type: ignore[import-untyped]

    found = botocore.session.get_session().get_credentials()
    if found is None:
        raise ValueError(
            "no S3 credentials: give access-key= and secret-key=, or set "
            "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or write ~/.aws/credentials"
        )
    frozen = found.get_frozen_credentials()
    return Credentials(frozen.access_key, frozen.secret_key, frozen.token)


# ---------------------------------------------------------------- transports

#: What L{S3Device} sends requests through: C{(method, key, query, body,
#: headers)} to a Deferred that fires with the L{S3Response} (whatever its
#: status, after any retries) or fails with L{S3Error} when no answer came.
Transport = Callable[
    [str, "str | None", Sequence[tuple[str, str]], bytes, Mapping[str, str]],
    "Deferred[S3Response]",
]


@implementer(IBodyProducer)
class _Body:
    """A request body already in memory, written in one go."""

    def __init__(self, data: bytes) -> None:
        self._data = data
        self.length = len(data)

    def startProducing(self, consumer: Any) -> Deferred[None]:  # noqa: N802 - IBodyProducer's
        consumer.write(self._data)
        return succeed(None)

    def pauseProducing(self) -> None:  # noqa: N802
        pass

    def resumeProducing(self) -> None:  # noqa: N802
        pass

    def stopProducing(self) -> None:  # noqa: N802
        pass


class TreqTransport:
    """
    Sends signed requests with treq over a persistent connection pool, at
    most C{max_requests} at once, retrying 5xx, 429 and connection
    failures up to C{retries} times with exponential backoff.
    """

    def __init__(
        self,
        reactor: Any,
        signer: Signer,
        max_requests: int = 16,
        retries: int = 4,
        backoff: float = 0.1,
        timeout: float = 30.0,
    ) -> None:
        from treq.client import HTTPClient
        from twisted.web.client import Agent, HTTPConnectionPool

        self._reactor = reactor
        self._signer = signer
        self._pool = HTTPConnectionPool(reactor, persistent=True)  # type: ignore[no-untyped-call]
        # Keep one connection per request slot, so none is reopened.
        self._pool.maxPersistentPerHost = max_requests
        agent = Agent(reactor, pool=self._pool, connectTimeout=timeout)  # type: ignore[no-untyped-call]
        self._client = HTTPClient(agent)
        self._semaphore = DeferredSemaphore(max_requests)
        self._retries = retries
        self._backoff = backoff
        self._timeout = timeout

    def __call__(
        self,
        method: str,
        key: str | None,
        query: Sequence[tuple[str, str]] = (),
        body: bytes = b"",
        headers: Mapping[str, str] = {},
    ) -> Deferred[S3Response]:
        """
        Send a request, retrying what may succeed later.

        @return: a Deferred that fires with the L{S3Response} (a 5xx one
            when retries ran out), or fails with L{S3Error} when the
            connection failed every time.
        """
        return Deferred.fromCoroutine(self._request(method, key, query, body, headers))

    async def _request(
        self,
        method: str,
        key: str | None,
        query: Sequence[tuple[str, str]],
        body: bytes,
        headers: Mapping[str, str],
    ) -> S3Response:
        url = self._signer.url(key, query)
        attempt = 0
        while True:
            response: S3Response | None = None
            try:
                await self._semaphore.acquire()
                try:
                    response = await self._once(method, url, body, headers)
                finally:
                    self._semaphore.release()
            except Exception as e:
                reason = self._describe(e)
            else:
                if response.status not in _RETRIED:
                    return response
                reason = response.describe()
            if attempt >= self._retries:
                if response is not None:
                    return response
                raise S3Error(f"{method} {url}: {reason} (after {attempt + 1} attempts)")
            delay = self._backoff * 2**attempt
            attempt += 1
            _log.warn(
                "S3 {method} {url}: {reason}; retry {attempt} of {retries} in {delay:.2f} s",
                method=method,
                url=url,
                reason=reason,
                attempt=attempt,
                retries=self._retries,
                delay=delay,
            )
            await deferLater(self._reactor, delay)

    def _describe(self, error: Exception) -> str:
        """Why a request got no answer, in a few words."""
        # Twisted's client wraps what went wrong (ResponseNeverReceived,
        # ResponseFailed) in a list of failures; a timeout is a cancellation.
        inner = [r.value for r in getattr(error, "reasons", [])]
        if any(isinstance(reason, CancelledError) for reason in [error, *inner]):
            return f"no answer within {self._timeout} s"
        if not inner:
            return f"{type(error).__name__}: {error}"
        return f"{type(error).__name__}: " + "; ".join(f"{type(r).__name__}: {r}" for r in inner)

    def _once(
        self, method: str, url: str, body: bytes, headers: Mapping[str, str]
    ) -> Deferred[S3Response]:
        """One attempt, whose answer is read whole within the timeout."""
        d = Deferred.fromCoroutine(self._send(method, url, body, headers))
        return d.addTimeout(self._timeout, self._reactor)

    async def _send(
        self, method: str, url: str, body: bytes, headers: Mapping[str, str]
    ) -> S3Response:
        import treq

        signed: dict[str | bytes, str | bytes] = {
            k: v for k, v in self._signer.sign(method, url, body, headers).items()
        }
        response = await self._client.request(
            method,
            url,
            headers=signed,
            data=_Body(body) if body or method in ("PUT", "POST") else None,
            allow_redirects=False,
            reactor=self._reactor,
        )
        content = await treq.content(response)
        names = {
            name.decode("latin-1").lower(): values[-1].decode("latin-1")
            for name, values in response.headers.getAllRawHeaders()
        }
        return S3Response(response.code, content, names)

    def close(self) -> Deferred[None]:
        """Close the pooled connections."""
        closed: Deferred[None] = self._pool.closeCachedConnections()  # type: ignore[no-untyped-call]
        return closed


def blocking_transport(
    signer: Signer, retries: int = 4, backoff: float = 0.1, timeout: float = 30.0
) -> Callable[..., S3Response]:
    """
    A blocking version of L{TreqTransport}'s calls (C{http.client}), for
    opening the image while the server is built, before the reactor runs.
    Fails with L{S3Error} when no answer came.
    """

    def request(
        method: str,
        key: str | None,
        query: Sequence[tuple[str, str]] = (),
        body: bytes = b"",
        headers: Mapping[str, str] = {},
    ) -> S3Response:
        url = signer.url(key, query)
        parts = urlsplit(url)
        target = parts.path + (f"?{parts.query}" if parts.query else "")
        connection_type = (
            http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
        )
        attempt = 0
        while True:
            response: S3Response | None = None
            connection = connection_type(parts.netloc, timeout=timeout)
            try:
                signed = signer.sign(method, url, body, headers)
                connection.request(method, target, body=body or None, headers=signed)
                answer = connection.getresponse()
                names = {name.lower(): value for name, value in answer.getheaders()}
                response = S3Response(answer.status, answer.read(), names)
            except (OSError, http.client.HTTPException) as e:
                reason = f"{type(e).__name__}: {e}"
            else:
                if response.status not in _RETRIED:
                    return response
                reason = response.describe()
            finally:
                connection.close()
            if attempt >= retries:
                if response is not None:
                    return response
                raise S3Error(f"{method} {url}: {reason} (after {attempt + 1} attempts)")
            time.sleep(backoff * 2**attempt)
            attempt += 1

    return request


# ---------------------------------------------------------------- opening


@dataclass(frozen=True)
class S3Config:
    """
    Where an image is and how to open it (the plugin's keys, converted).

    @ivar bucket: the bucket.
    @ivar prefix: prepended to every key (end it with C{/} for a folder).
    @ivar size: the size of a new image; if given for an existing one, it
        must match.
    @ivar object_size: the object size of a new image; if given for an
        existing one, it must match.
    @ivar create: create the bucket if it does not exist.
    @ivar read_only: never write (not even the metadata object).
    """

    bucket: str
    prefix: str = ""
    size: int | None = None
    object_size: int | None = None
    create: bool = False
    read_only: bool = False

    @property
    def meta_key(self) -> str:
        """The key of the object that describes the image."""
        return self.prefix + META_NAME

    @property
    def where(self) -> str:
        """C{s3://bucket/prefix}, for messages."""
        return f"s3://{self.bucket}/{self.prefix}"


@dataclass(frozen=True)
class ImageInfo:
    """The image's size and object size, from its metadata object."""

    size: int
    object_size: int


#: A request L{_open_steps} wants made: C{(method, key, query, body)}.
_Step = tuple[str, "str | None", tuple[tuple[str, str], ...], bytes]


def _open_steps(config: S3Config) -> Generator[_Step, S3Response, ImageInfo]:
    """
    The requests that open (or create) an image, as a generator: it yields
    each request and is sent the answer, so that L{open_blocking} and
    L{S3Device.open} share the logic.

    @return: (as the generator's value) the image's L{ImageInfo}.
    @raise ValueError: the image does not exist and cannot be created, or
        it does not match C{size=}/C{object-size=}.
    @raise S3Error: S3 refused a request.
    """
    answer = yield ("GET", config.meta_key, (), b"")
    if answer.status == 404 and answer.code == "NoSuchBucket":
        if not config.create or config.read_only:
            raise ValueError(
                f"the bucket {config.bucket!r} does not exist (create=true creates it)"
            )
        made = yield ("PUT", None, (), b"")
        if made.status not in (200, 409):  # 409: someone else just made it
            raise S3Error(f"creating the bucket {config.bucket!r}: {made.describe()}")
        answer = yield ("GET", config.meta_key, (), b"")
    if answer.status == 200:
        try:
            meta = json.loads(answer.body)
            info = ImageInfo(int(meta["size"]), int(meta["object_size"]))
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{config.where}{META_NAME} is not valid: {e}") from None
        if config.size is not None and config.size != info.size:
            raise ValueError(
                f"the image at {config.where} is {info.size} bytes, not size={config.size}"
            )
        if config.object_size is not None and config.object_size != info.object_size:
            raise ValueError(
                f"the image at {config.where} has {info.object_size}-byte objects, "
                f"not object-size={config.object_size}"
            )
        _check_object_size(info.object_size)
        return info
    if answer.status != 404:
        raise S3Error(f"reading {config.where}{META_NAME}: {answer.describe()}")
    if config.size is None:
        raise ValueError(f"there is no image at {config.where}: give size= to create one")
    if config.read_only:
        raise ValueError(f"there is no image at {config.where} to serve read-only")
    info = ImageInfo(config.size, config.object_size or DEFAULT_OBJECT_SIZE)
    body = json.dumps(
        {"format": META_FORMAT, "size": info.size, "object_size": info.object_size}
    ).encode()
    written = yield ("PUT", config.meta_key, (), body)
    if written.status != 200:
        raise S3Error(f"writing {config.where}{META_NAME}: {written.describe()}")
    return info


def _check_object_size(object_size: int) -> None:
    if object_size & (object_size - 1) or not MIN_OBJECT_SIZE <= object_size <= MAX_OBJECT_SIZE:
        raise ValueError(
            f"object-size: {object_size} is not a power of two from "
            f"{MIN_OBJECT_SIZE} to {MAX_OBJECT_SIZE}"
        )


def open_blocking(config: S3Config, request: Callable[..., S3Response]) -> ImageInfo:
    """Run L{_open_steps} with a blocking C{request} (L{blocking_transport})."""
    steps = _open_steps(config)
    try:
        step = next(steps)
        while True:
            step = steps.send(request(*step))
    except StopIteration as done:
        info: ImageInfo = done.value
        return info


# ---------------------------------------------------------------- the device


@dataclass(frozen=True)
class _Piece:
    """The part of one request that falls in object C{index}."""

    index: int
    start: int  # offset within the object
    length: int
    at: int  # offset within the request

    def whole(self, object_length: int) -> bool:
        return self.start == 0 and self.length == object_length


async def _all(ds: Sequence[Deferred[Any]]) -> list[Any]:
    """Wait for every Deferred; their results, or the first failure raised."""
    results = await DeferredList(list(ds), consumeErrors=True)
    for ok, value in results:
        if not ok:
            value.raiseException()
    return [value for _, value in results]


@implementer(IBlockDevice)
class S3Device:
    """
    An image of fixed-size objects in an S3 bucket (see the module's
    docstring). Every method returns a Deferred that fails with
    L{NBDError} (C{EIO}, or C{ENOSPC} for a quota) when S3 fails.

    @cvar list_page: the most keys asked for per page of the listing
        (S3 never sends more than 1000).
    """

    list_page = 1000

    def __init__(
        self,
        transport: Transport,
        config: S3Config,
        info: ImageInfo,
        closer: Callable[[], Deferred[None]] | None = None,
    ) -> None:
        """
        @param transport: sends the requests (L{TreqTransport}, or a fake).
        @param info: the opened image's size and object size.
        @param closer: called by L{close}, e.g. L{TreqTransport.close}.
        """
        self._request = transport
        self._config = config
        self.size = info.size
        self.object_size = info.object_size
        self._closer = closer
        self._closed = False
        self.capabilities = Capabilities(
            can_write=not config.read_only,
            can_flush=not config.read_only,
            can_fua=not config.read_only,
            can_trim=not config.read_only,
            can_zero=not config.read_only,
            can_fast_zero=False,
            can_cache=False,
            can_extents=True,
            can_multi_conn=True,
            # Whole objects are written without reading them first.
            preferred_block=min(self.object_size, MAX_BLOCK),
            max_block=MAX_BLOCK,
        )
        self._locks: dict[int, DeferredLock] = {}
        # Objects that exist or may exist (a failed PUT may have landed),
        # once listed; until then _changes records what we did meanwhile.
        self._present: set[int] = set()
        self._listed = False
        self._listing = False
        self._changes: dict[int, bool] = {}
        self._list_waiters: list[Deferred[None]] = []
        self._prefix_length = len(config.prefix)
        #: How many pages the listing took (0 until it is done).
        self.listed_pages = 0

    @classmethod
    def open(cls, transport: Transport, config: S3Config, **kwargs: Any) -> Deferred[S3Device]:
        """
        Open (or create) the image asynchronously.

        @return: a Deferred that fires with the device, or fails with
            C{ValueError} or L{S3Error} as L{_open_steps} says.
        """

        async def run() -> S3Device:
            steps = _open_steps(config)
            try:
                step = next(steps)
                while True:
                    answer = await transport(step[0], step[1], step[2], step[3], {})
                    step = steps.send(answer)
            except StopIteration as done:
                return cls(transport, config, done.value, **kwargs)

        return Deferred.fromCoroutine(run())

    # Helpers.

    def key(self, index: int) -> str:
        """The key of object C{index}."""
        return f"{self._config.prefix}{index:016x}"

    def _object_length(self, index: int) -> int:
        return min(self.object_size, self.size - index * self.object_size)

    def _pieces(self, offset: int, length: int) -> list[_Piece]:
        pieces = []
        position, end = offset, offset + length
        while position < end:
            index, start = divmod(position, self.object_size)
            piece = min(self.object_size - start, end - position)
            pieces.append(_Piece(index, start, piece, position - offset))
            position += piece
        return pieces

    def _failed(self, what: str, response: S3Response | None, error: Exception | None) -> NBDError:
        """Log why a request failed; the L{NBDError} for the client."""
        reason = response.describe() if response is not None else str(error)
        errno = Errno.EIO
        if response is not None and response.code == "QuotaExceeded":
            errno = Errno.ENOSPC
        _log.error(
            "S3 {what} in {where}: {reason}", what=what, where=self._config.where, reason=reason
        )
        return NBDError(errno, f"S3 {what}: {reason}")

    async def _call(
        self,
        what: str,
        method: str,
        key: str | None,
        ok: tuple[int, ...],
        query: Sequence[tuple[str, str]] = (),
        body: bytes = b"",
        headers: Mapping[str, str] = {},
    ) -> S3Response:
        """Send a request; its answer if its status is in C{ok}, else NBDError."""
        try:
            response = await self._request(method, key, query, body, headers)
        except S3Error as e:
            raise self._failed(what, None, e) from None
        if response.status not in ok:
            raise self._failed(what, response, None)
        return response

    def _mark(self, index: int, present: bool) -> None:
        """Record that object C{index} (may) exist, or surely does not."""
        if present:
            self._present.add(index)
        else:
            self._present.discard(index)
        if self._listing:
            self._changes[index] = present

    async def _locked(self, index: int, work: Callable[[], Any]) -> Any:
        """Run C{work()} (a coroutine function) holding object C{index}'s lock."""
        lock = self._locks.get(index)
        if lock is None:
            lock = self._locks[index] = DeferredLock()
        await lock.acquire()
        try:
            return await work()
        finally:
            lock.release()
            # release() hands the lock straight to the next waiter, if any
            # (whose work may even finish, and forget the lock, meanwhile).
            if not lock.locked and self._locks.get(index) is lock:
                del self._locks[index]

    async def _get(self, index: int, start: int, length: int) -> bytes:
        """Bytes of an object; zeroes where it or its end is missing."""
        whole = start == 0 and length == self._object_length(index)
        headers = {} if whole else {"Range": f"bytes={start}-{start + length - 1}"}
        response = await self._call(
            f"GET {self.key(index)}", "GET", self.key(index), (200, 206, 404, 416), (), b"", headers
        )
        if response.status == 404 and response.code != "NoSuchKey":
            raise self._failed(f"GET {self.key(index)}", response, None)
        if response.status in (404, 416):
            return bytes(length)
        data = response.body
        if response.status == 200 and not whole:
            data = data[start : start + length]  # a server that ignored Range
        if len(data) < length:
            data += bytes(length - len(data))
        return data[:length]

    async def _put(self, index: int, data: bytes) -> None:
        # Marked first: a PUT that fails may still have landed.
        self._mark(index, True)
        await self._call(f"PUT {self.key(index)}", "PUT", self.key(index), (200,), (), data)

    async def _delete(self, index: int) -> None:
        await self._call(f"DELETE {self.key(index)}", "DELETE", self.key(index), (200, 204, 404))
        self._mark(index, False)

    async def _patch(self, piece: _Piece, data: bytes | None) -> None:
        """
        Read-modify-write: put C{data} (zeroes if C{None}) into part of an
        object, holding its lock. A missing object being zeroed stays
        missing.
        """

        async def work() -> None:
            old = await self._get(piece.index, 0, self._object_length(piece.index))
            new = bytes(piece.length) if data is None else data
            if old[piece.start : piece.start + piece.length] == new:
                return  # nothing changes (zeroing zeroes, rewriting the same bytes)
            buffer = bytearray(old)
            buffer[piece.start : piece.start + piece.length] = new
            await self._put(piece.index, bytes(buffer))

        await self._locked(piece.index, work)

    # IBlockDevice.

    def read(self, offset: int, length: int) -> Deferred[bytes]:
        """
        Read C{length} bytes: one GET per object touched (ranged unless
        whole), in parallel; missing objects read as zeroes.

        @return: a Deferred that fires with the bytes, or fails with
            L{NBDError}.
        """

        async def run() -> bytes:
            pieces = self._pieces(offset, length)
            if len(pieces) == 1:
                piece = pieces[0]
                return await self._get(piece.index, piece.start, piece.length)
            parts = await _all(
                [Deferred.fromCoroutine(self._get(p.index, p.start, p.length)) for p in pieces]
            )
            return b"".join(parts)

        return Deferred.fromCoroutine(run())

    def write(self, offset: int, data: bytes, fua: bool = False) -> Deferred[None]:
        """
        Write: whole objects are PUT, parts of objects read, changed and
        PUT back, each under its object's lock. FUA changes nothing: the
        Deferred fires only once every PUT succeeded.

        @return: a Deferred that fires with C{None} once the data is stored
            in S3, or fails with L{NBDError}.
        """
        view = memoryview(data).cast("B")

        async def one(piece: _Piece) -> None:
            chunk = bytes(view[piece.at : piece.at + piece.length])
            if piece.whole(self._object_length(piece.index)):
                await self._locked(piece.index, lambda: self._put(piece.index, chunk))
            else:
                await self._patch(piece, chunk)

        return self._each(self._pieces(offset, len(view)), one)

    def _each(self, pieces: list[_Piece], one: Callable[[_Piece], Any]) -> Deferred[None]:
        async def run() -> None:
            await _all([Deferred.fromCoroutine(one(piece)) for piece in pieces])

        return Deferred.fromCoroutine(run())

    def flush(self) -> Deferred[None]:
        """
        Nothing to do: a write is acknowledged only after S3 stored it.

        @return: a Deferred that has fired with C{None}.
        """
        return succeed(None)

    def trim(self, offset: int, length: int, fua: bool = False) -> Deferred[None]:
        """
        Delete the objects the range covers whole; parts of objects are
        left as they are (a trim is a hint).

        @return: a Deferred that fires with C{None}, or fails with
            L{NBDError}.
        """

        async def one(piece: _Piece) -> None:
            if piece.whole(self._object_length(piece.index)):
                await self._locked(piece.index, lambda: self._delete(piece.index))

        return self._each(self._pieces(offset, length), one)

    def write_zeroes(
        self,
        offset: int,
        length: int,
        fua: bool = False,
        may_trim: bool = True,
        fast: bool = False,
    ) -> Deferred[None]:
        """
        Zero a range: whole objects are deleted (or, with C{may_trim}
        false, PUT full of zeroes), parts of objects read, zeroed and PUT
        back. Fast zeroing is refused.

        @return: a Deferred that fires with C{None}, or fails with
            L{NBDError} (C{ENOTSUP} if C{fast}).
        """
        if fast:
            return Deferred.fromCoroutine(self._refuse_fast())

        async def one(piece: _Piece) -> None:
            object_length = self._object_length(piece.index)
            if not piece.whole(object_length):
                await self._patch(piece, None)
            elif may_trim:
                await self._locked(piece.index, lambda: self._delete(piece.index))
            else:
                zeroes = bytes(object_length)
                await self._locked(piece.index, lambda: self._put(piece.index, zeroes))

        return self._each(self._pieces(offset, length), one)

    async def _refuse_fast(self) -> None:
        raise NBDError(Errno.ENOTSUP, "zeroing S3 objects is not fast")

    def cache(self, offset: int, length: int) -> Deferred[None]:
        """Nothing to prefetch into. @return: a fired Deferred."""
        return succeed(None)

    def block_status(self, offset: int, length: int) -> Deferred[Sequence[Extent]]:
        """
        Which objects exist, from one listing of the prefix (made on the
        first call) kept up to date by this device's own writes and
        deletes: an existing object is data, a missing one a hole that
        reads as zeroes.

        @return: a Deferred that fires with the extents covering exactly
            C{[offset, offset + length)}, or fails with L{NBDError} if the
            listing failed (a later call lists again).
        """

        async def run() -> Sequence[Extent]:
            if not self._listed:
                await self._ensure_listed()
            extents: list[Extent] = []
            for piece in self._pieces(offset, length):
                flags = 0 if piece.index in self._present else STATE_HOLE | STATE_ZERO
                if extents and extents[-1].flags == flags:
                    extents[-1] = Extent(extents[-1].length + piece.length, flags)
                else:
                    extents.append(Extent(piece.length, flags))
            return extents

        return Deferred.fromCoroutine(run())

    def _ensure_listed(self) -> Deferred[None]:
        """A Deferred that fires once the listing is done (starting it if need be)."""
        waiter: Deferred[None] = Deferred()
        self._list_waiters.append(waiter)
        if not self._listing:
            self._listing = True
            self._changes = {}
            Deferred.fromCoroutine(self._list()).addBoth(self._listed_all)
        return waiter

    def _listed_all(self, result: None | Failure) -> None:
        """Tell everyone waiting for the listing how it went."""
        self._listing = False
        waiters, self._list_waiters = self._list_waiters, []
        for waiter in waiters:
            if isinstance(result, Failure):
                waiter.errback(result)
            else:
                waiter.callback(None)

    async def _list(self) -> None:
        """ListObjectsV2 of the prefix, every page; then the changes made meanwhile."""
        found: set[int] = set()
        token: str | None = None
        pages = 0
        while True:
            query = [
                ("list-type", "2"),
                ("max-keys", str(self.list_page)),
                ("prefix", self._config.prefix),
            ]
            if token is not None:
                query.append(("continuation-token", token))
            response = await self._call(
                f"list of {self._config.prefix!r}", "GET", None, (200,), query
            )
            pages += 1
            root = ElementTree.fromstring(response.body)
            truncated = False
            token = None
            for element in root:
                name = _local(element.tag)
                if name == "Contents":
                    for child in element:
                        if _local(child.tag) == "Key" and child.text is not None:
                            rest = child.text[self._prefix_length :]
                            if _DATA_NAME.fullmatch(rest):
                                found.add(int(rest, 16))
                elif name == "IsTruncated":
                    truncated = (element.text or "").strip() == "true"
                elif name == "NextContinuationToken":
                    token = element.text
            if not truncated:
                break
            if token is None:
                raise self._failed("list", None, S3Error("a truncated listing without a token"))
        for index, present in self._changes.items():
            if present:
                found.add(index)
            else:
                found.discard(index)
        self._present = found
        self._listed = True
        self.listed_pages = pages
        _log.info(
            "Listed {where}: {count} objects in {pages} pages",
            where=self._config.where,
            count=len(found),
            pages=pages,
        )

    def close(self) -> Deferred[None]:
        """
        Close the connection pool (once).

        @return: a Deferred that fires with C{None}.
        """
        if self._closed or self._closer is None:
            self._closed = True
            return succeed(None)
        self._closed = True
        return self._closer()


# ---------------------------------------------------------------- the plugin


def _open(values: Mapping[str, Any], context: OpenContext) -> S3Device:
    if values["object-size"] is not None:
        _check_object_size(values["object-size"])
    if values["max-requests"] < 1:
        raise ValueError("max-requests: must be at least 1")
    if values["retries"] < 0:
        raise ValueError("retries: must not be negative")
    region = values["region"]
    endpoint = values["endpoint"] or f"https://s3.{region}.amazonaws.com"
    if urlsplit(endpoint).scheme not in ("http", "https"):
        raise ValueError(f"endpoint: {endpoint!r} is not an http:// or https:// URL")
    credentials = find_credentials(values["access-key"], values["secret-key"])
    signer = Signer(endpoint, values["bucket"], credentials, region)
    config = S3Config(
        bucket=values["bucket"],
        prefix=values["prefix"],
        size=values["size"],
        object_size=values["object-size"],
        create=values["create"],
        read_only=context.read_only,
    )
    request = blocking_transport(signer, values["retries"], timeout=values["timeout"])
    try:
        info = open_blocking(config, request)
    except S3Error as e:
        raise OSError(f"cannot open {config.where}: {e}") from None
    transport = TreqTransport(
        context.reactor,
        signer,
        max_requests=values["max-requests"],
        retries=values["retries"],
        timeout=values["timeout"],
    )
    return S3Device(transport, config, info, closer=transport.close)


plugin = BackendPlugin(
    name="s3",
    help="an image stored as fixed-size objects in an S3 bucket (sparse; docs/backend-s3.md)",
    keys=(
        Key("bucket", STRING, help="the bucket"),
        Key("endpoint", STRING, None, "the S3 URL, e.g. http://127.0.0.1:7480", "AWS"),
        Key("prefix", STRING, "", "prepended to every object's key (end it with /)", "none"),
        Key("size", SIZE, None, "create the image with this size (or check it)"),
        Key("object-size", SIZE, None, "the object size of a new image (or check it)", "4M"),
        Key("access-key", STRING, None, "the access key (else from the environment)"),
        Key("secret-key", STRING, None, "the secret key (else from the environment)"),
        Key("region", STRING, "us-east-1", "the region requests are signed for"),
        Key("max-requests", INT, 16, "requests in flight to S3 at most"),
        Key("retries", INT, 4, "retries of a request after a 5xx or a connection failure"),
        Key("timeout", DURATION, 30.0, "how long one request may take"),
        Key("create", BOOL, False, "create the bucket if it does not exist"),
    ),
    open=_open,
)
