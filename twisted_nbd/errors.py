# -*- test-case-name: tests.test_protocol -*-
"""
Exceptions that cross twisted-nbd's layers.

Backends fail their Deferreds with L{NBDError} to choose the errno the client
sees; any other exception is logged and reported to the client as C{EIO}.
"""

from __future__ import annotations

import errno as _errno

from twisted_nbd._wire import Errno

__all__ = ["Errno", "NBDError", "ProtocolViolation", "errno_from_os_error"]


class NBDError(Exception):
    """
    A request failed with an NBD error number.

    @ivar errno: the L{Errno} that goes on the wire.
    @ivar message: a human-readable reason, logged and (with structured
        replies) sent to the client.
    """

    def __init__(self, errno: int, message: str = "") -> None:
        super().__init__(errno, message)
        self.errno = Errno(errno)
        self.message = message

    def __str__(self) -> str:
        text = self.errno.name
        return f"{text}: {self.message}" if self.message else text


class ProtocolViolation(Exception):  # noqa: N818 - a violation, named as the spec does
    """
    The peer broke a MUST of the protocol in a way that leaves no safe way to
    go on (bad magic, impossible lengths): the connection must be dropped.
    """


# Host errno values map onto the few the protocol allows (spec section 2.8).
_OS_TO_NBD = {
    _errno.EPERM: Errno.EPERM,
    _errno.EACCES: Errno.EPERM,
    _errno.EROFS: Errno.EPERM,
    _errno.EIO: Errno.EIO,
    _errno.ENOMEM: Errno.ENOMEM,
    _errno.EINVAL: Errno.EINVAL,
    _errno.ENOSPC: Errno.ENOSPC,
    _errno.EDQUOT: Errno.ENOSPC,
    _errno.EFBIG: Errno.ENOSPC,
    _errno.EOVERFLOW: Errno.EOVERFLOW,
    _errno.ENOTSUP: Errno.ENOTSUP,
    _errno.ESHUTDOWN: Errno.ESHUTDOWN,
}


def errno_from_os_error(error: OSError) -> Errno:
    """
    Map an L{OSError} from the host to the NBD error number that best
    describes it; anything unknown becomes C{EIO}.
    """
    return _OS_TO_NBD.get(error.errno or 0, Errno.EIO)
