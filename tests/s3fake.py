"""
An in-memory stand-in for an S3 bucket, at the level of the C{s3}
backend's transport (method, key, query, body, headers in; an
L{S3Response} out), for testing the backend's own logic: locking,
read-modify-write, sparseness, the listing cache, error mapping. It checks
nothing about signatures or HTTP: the tests in C{tests/interop/test_s3.py}
run the backend against a real radosgw for that.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence
from xml.sax.saxutils import escape

from twisted.internet.defer import Deferred, succeed

from twisted_nbd.backends.s3 import S3Error, S3Response

__all__ = ["FakeS3", "Held"]


def _error(status: int, code: str) -> S3Response:
    return S3Response(status, f"<Error><Code>{code}</Code></Error>".encode())


@dataclass
class Held:
    """A request the fake holds until the test releases it."""

    method: str
    key: str | None
    query: Sequence[tuple[str, str]]
    body: bytes
    headers: Mapping[str, str]
    deferred: Deferred[S3Response]
    fake: FakeS3

    def release(self) -> None:
        """Answer it now, from the bucket's state now."""
        self.deferred.callback(
            self.fake.answer(self.method, self.key, self.query, self.body, self.headers)
        )


@dataclass
class FakeS3:
    """
    One bucket. C{objects} maps keys to bytes; C{hold} lists the methods
    (C{"GET"}, C{"PUT"}, C{"DELETE"}, C{"LIST"}) whose requests wait in
    C{held}; C{inject} answers (or exceptions) are used, in order, for the
    next requests instead of the bucket's.
    """

    bucket_exists: bool = True
    objects: dict[str, bytes] = field(default_factory=dict)
    page_size: int = 1000
    hold: set[str] = field(default_factory=set)
    held: list[Held] = field(default_factory=list)
    inject: list[S3Response | Exception] = field(default_factory=list)
    log: list[tuple[str, str | None]] = field(default_factory=list)
    in_flight: dict[str, int] = field(default_factory=dict)
    most_in_flight: dict[str, int] = field(default_factory=dict)

    def __call__(
        self,
        method: str,
        key: str | None,
        query: Sequence[tuple[str, str]] = (),
        body: bytes = b"",
        headers: Mapping[str, str] = {},
    ) -> Deferred[S3Response]:
        kind = "LIST" if method == "GET" and key is None else method
        self.log.append((kind, key))
        if self.inject:
            injected = self.inject.pop(0)
            if isinstance(injected, Exception):
                d: Deferred[S3Response] = Deferred()
                d.errback(injected)
                return d
            return succeed(injected)
        if kind in self.hold:
            d = Deferred()
            name = key or ""
            self.in_flight[name] = self.in_flight.get(name, 0) + 1
            self.most_in_flight[name] = max(self.most_in_flight.get(name, 0), self.in_flight[name])

            def done(result: S3Response) -> S3Response:
                self.in_flight[name] -= 1
                return result

            d.addCallback(done)
            self.held.append(Held(method, key, query, body, headers, d, self))
            return d
        return succeed(self.answer(method, key, query, body, headers))

    def release_all(self) -> int:
        """Release every held request (and those they lead to); how many."""
        count = 0
        while self.held:
            self.held.pop(0).release()
            count += 1
        return count

    def answer(
        self,
        method: str,
        key: str | None,
        query: Sequence[tuple[str, str]],
        body: bytes,
        headers: Mapping[str, str],
    ) -> S3Response:
        if key is None:
            if method == "PUT":
                self.bucket_exists = True
                return S3Response(200)
            if not self.bucket_exists:
                return _error(404, "NoSuchBucket")
            return self._list(dict(query))
        if not self.bucket_exists:
            return _error(404, "NoSuchBucket")
        if method == "PUT":
            self.objects[key] = bytes(body)
            return S3Response(200)
        if method == "DELETE":
            self.objects.pop(key, None)
            return S3Response(204)
        if method == "GET":
            data = self.objects.get(key)
            if data is None:
                return _error(404, "NoSuchKey")
            wanted = headers.get("Range")
            if wanted is None:
                return S3Response(200, data)
            first, _, last = wanted.removeprefix("bytes=").partition("-")
            if int(first) >= len(data):
                return _error(416, "InvalidRange")
            return S3Response(206, data[int(first) : int(last) + 1])
        raise S3Error(f"the fake does not know {method}")

    def _list(self, query: Mapping[str, str]) -> S3Response:
        assert query.get("list-type") == "2"
        prefix = query.get("prefix", "")
        keys = sorted(k for k in self.objects if k.startswith(prefix))
        after = query.get("continuation-token")
        if after is not None:
            keys = [k for k in keys if k > after]
        size = min(self.page_size, int(query.get("max-keys", "1000")))
        page, rest = keys[:size], keys[size:]
        parts = ['<ListBucketResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/">']
        parts += [f"<Contents><Key>{escape(k)}</Key></Contents>" for k in page]
        parts.append(f"<IsTruncated>{'true' if rest else 'false'}</IsTruncated>")
        if rest:
            parts.append(f"<NextContinuationToken>{escape(page[-1])}</NextContinuationToken>")
        parts.append("</ListBucketResult>")
        return S3Response(200, "".join(parts).encode())
