# -*- test-case-name: tests.interop.test_tls -*-
"""
TLS straight on the socket of a Twisted TCP transport.

Twisted's own TLS (C{transport.startTLS}, L{twisted.protocols.tls}) runs
OpenSSL over memory BIOs: every 16 KiB of a reply is sliced, encrypted into
one BIO, read back out as a new C{bytes}, queued in the TCP transport and
joined again before C{send}; received records go the same way in reverse.
For bulk NBD traffic that costs about three times the CPU per byte of
qemu-nbd's TLS (measured with C{bench/tls.py}: 5.9 against 2.0 CPU seconds
per GiB read).

Here OpenSSL reads and writes the socket itself (a socket BIO, as GnuTLS
does in qemu-nbd and nbdkit): C{SSL_write} encrypts a whole reply and
sends it, C{SSL_read} decrypts straight from the kernel. Twisted still owns
the socket, the reactor registration, buffering and back-pressure: only
three methods of the transport instance are replaced, as Twisted's original
TLS support (before memory BIOs) did:

  - C{doRead}: finish the handshake, then C{SSL_read} records until OpenSSL
    has nothing more, handing plaintext to the protocol;
  - C{writeSomeData}: C{SSL_write}. Server contexts have partial writes
    off (L{twisted_nbd.tls.whole_writes}), so one call encrypts and sends a
    whole reply; when the socket's buffer fills halfway through, the call
    fails, the rest stays queued in the transport as usual, and the retry
    passes at least as many bytes as the call that failed, starting with
    the same ones, as OpenSSL requires;
  - C{_closeSocket}: send TLS's close_notify before an orderly close.

Large WRITE payloads are decrypted straight into the buffer they are
written from (or into a RAM disk's memory): when a full record follows
smaller ones, the records so far (with the WRITE's header) go to the
protocol at once, whose L{twisted_nbd._transport.PayloadReceiver} then
reads the rest with L{SocketTLS.recv_into}, which has OpenSSL decrypt into
that buffer. Reading on into records instead would copy each record out of
a temporary C buffer, then join 64 of them per MiB: for 1 MiB WRITEs over
TLS a quarter of the server's CPU.

Only plain TCP and Unix transports of the posix reactors qualify (see
L{possible}); anything else uses Twisted's C{startTLS}.
"""

from __future__ import annotations

import errno
import socket
from typing import Any, Callable

from cryptography.hazmat.bindings.openssl.binding import Binding
from OpenSSL import SSL
from twisted.internet import main
from twisted.python.failure import Failure

from twisted_nbd.tls import describe_tls_error

__all__ = ["SocketTLS", "possible"]

#: At most this much plaintext is asked of OpenSSL at once (a record holds
#: at most 16 KiB, so one call returns one record's worth).
_READ_SIZE = 64 * 1024
#: At most this many records are read in one doRead before the reactor gets
#: its turn again (other connections wait meanwhile).
_MAX_RECORDS = 64

#: cryptography's OpenSSL binding, the one pyOpenSSL runs on (see
#: L{SocketTLS.recv_into}).
_ffi: Any = Binding.ffi
_lib: Any = Binding.lib
#: Whether OpenSSL can decrypt straight into a buffer of ours: pyOpenSSL's
#: C{recv_into} decrypts into a temporary C buffer and copies that.
_DIRECT_READ = (
    hasattr(_lib, "SSL_read")
    and hasattr(_ffi, "from_buffer")
    and callable(getattr(SSL.Connection, "_raise_ssl_error", None))
)


def possible(transport: Any) -> bool:
    """Whether C{transport} is one whose socket OpenSSL can drive directly."""
    sock = getattr(transport, "socket", None)
    return (
        isinstance(sock, socket.socket)
        and callable(getattr(type(transport), "doRead", None))
        and callable(getattr(type(transport), "writeSomeData", None))
        and callable(getattr(type(transport), "_closeSocket", None))
        and hasattr(transport, "startReading")
    )


class SocketTLS:
    """
    Runs the server side of TLS on C{transport}'s socket with C{context}
    (a pyOpenSSL C{Context}).

    @param on_handshake: called once the handshake has completed.
    @param on_failure: called with a one-line reason when the handshake or
        the session fails (the connection is then lost as usual).
    @param reading: whether the protocol wants to read now (it has not
        paused the transport).
    @ivar connection: the pyOpenSSL C{Connection}.
    """

    def __init__(
        self,
        transport: Any,
        context: Any,
        on_handshake: Callable[[], None],
        on_failure: Callable[[str], None],
        reading: Callable[[], bool],
    ) -> None:
        self.transport = transport
        self.connection = SSL.Connection(context, transport.socket)
        self.connection.set_accept_state()
        self._ssl: Any = getattr(self.connection, "_ssl", None) if _DIRECT_READ else None
        # What stopped the last recv_into after it had decrypted something.
        self._stopped: SSL.Error | None = None
        self.handshake_done = False
        self._on_handshake = on_handshake
        self._on_failure = on_failure
        self._reading = reading
        self._reactor = transport.reactor
        self._retry: Any = None
        self._closing = False
        # The length of the SSL_write that last failed for a full socket
        # (OpenSSL may have sent part of it): the next must be as long.
        self._retry_length = 0
        transport.doRead = self._do_read
        transport.writeSomeData = self._write_some_data
        self._close_socket: Callable[[bool], None] = transport._closeSocket
        transport._closeSocket = self._close

    # ------------------------------------------------------------ reading

    def _do_read(self) -> Any:
        conn = self.connection
        if not self.handshake_done:
            try:
                conn.do_handshake()
            except SSL.WantReadError:
                return None
            except SSL.WantWriteError:
                # The kernel took only part of our handshake flight (its
                # buffer is full, which a new connection's hardly is): OpenSSL
                # keeps the rest and the client waits for it, so try again
                # shortly (the handshake deadline bounds this).
                self._retry_soon(0.001)
                return None
            except (SSL.Error, OSError) as e:
                return self._failed(e)
            self.handshake_done = True
            self._on_handshake()
            if self.transport.disconnecting or not self.transport.connected:
                return None
        # The records read now are handed over together: a client sends each
        # request in a record of its own, and parsing them together lets
        # their replies share records and system calls.
        records: list[bytes] = []
        why: Any = None
        bulk = False
        for _ in range(_MAX_RECORDS):
            try:
                data = conn.recv(_READ_SIZE)
            except SSL.WantReadError:
                break
            except SSL.WantWriteError:
                # A post-handshake message (a key update) must be sent first
                # and the socket is full: try again shortly.
                self._retry_soon(0.001)
                break
            except SSL.ZeroReturnError:
                # The client's close_notify: a clean end.
                why = main.CONNECTION_DONE
                break
            except SSL.SysCallError as e:
                if e.args and e.args[0] == -1:
                    # End of stream without close_notify: many clients just close.
                    why = main.CONNECTION_DONE
                else:
                    why = self._failed(e)
                break
            except SSL.Error as e:
                why = self._failed(e)
                break
            if not data:
                why = main.CONNECTION_DONE
                break
            records.append(data)
            full = len(data) >= _RECORD
            if full and not bulk:
                # A full record after smaller ones: a large payload has begun.
                # Its header goes to the protocol now, so that the protocol can
                # have the rest decrypted straight into its buffer (see
                # recv_into), where reading on would decrypt it into records
                # to be copied and joined.
                self.transport.protocol.records_received(records)
                records = []
                transport = self.transport
                if not transport.connected or transport.disconnecting:
                    return None
                read = transport.doRead
                if read != self._do_read:
                    # It did (twisted_nbd._transport.PayloadReceiver).
                    return read()
            bulk = full
        else:
            # Records may remain in OpenSSL's buffer, which epoll cannot see:
            # come back on the reactor's next turn.
            self.resume_reading()
        if records:
            self.transport.protocol.records_received(records)
        return why

    def resume_reading(self) -> None:
        """
        Reading resumes (or a read loop stopped early): read what OpenSSL
        already holds, since the socket may never become readable for it.
        """
        if self.connection.pending():
            self._retry_soon(0)

    def _retry_soon(self, delay: float) -> None:
        if self._retry is None or not self._retry.active():
            self._retry = self._reactor.callLater(delay, self._read_pending)

    def _read_pending(self) -> None:
        transport = self.transport
        if not transport.connected or transport.disconnecting or not self._reading():
            # Gone, or paused again: resume_reading brings us back.
            return
        # Whoever reads now: this, or a payload receiver that took over.
        why = transport.doRead()
        if why is not None:
            # As the reactor does when doRead returns a reason.
            disconnect = getattr(self._reactor, "_disconnectSelectable", None)
            if disconnect is not None:
                disconnect(transport, why, True)
            else:
                transport.connectionLost(Failure(why))  # type: ignore[no-untyped-call]

    def recv_into(self, view: memoryview) -> int:
        """
        Decrypt what has arrived into C{view}, as C{socket.recv_into} does
        for plain sockets, so that L{twisted_nbd._transport.PayloadReceiver}
        can receive a payload straight into its buffer: as many records as
        have arrived, until C{view} is full.

        OpenSSL decrypts into C{view} itself where cryptography's binding
        allows (no copy; pyOpenSSL's own C{recv_into} decrypts into a
        temporary buffer and copies it), else pyOpenSSL's C{recv_into}.

        @return: how many bytes; 0 at the end of the stream.
        @raise BlockingIOError: nothing to decrypt yet.
        @raise OSError: the session failed (reported to C{on_failure}).
        """
        conn = self.connection
        try:
            if self._stopped is not None:
                stopped, self._stopped = self._stopped, None
                raise stopped
            ssl = self._ssl
            if ssl is None:
                return self._recv_into_copying(view)
            size = len(view)
            start = _ffi.from_buffer("char[]", view, require_writable=True)
            read = _lib.SSL_read
            got = 0
            try:
                # One record a call (at most 16 KiB): the loop is here, on a
                # pointer, rather than in the caller on slices of the view.
                while got < size:
                    result = read(ssl, start + got, size - got)
                    if result <= 0:
                        if got:
                            # Return what came; what stopped it (no more yet,
                            # the end, an error) is the next call's to report.
                            try:
                                conn._raise_ssl_error(ssl, result)
                            except SSL.WantReadError:
                                pass
                            except SSL.Error as e:
                                self._stopped = e.with_traceback(None)
                            break
                        conn._raise_ssl_error(ssl, result)
                        return 0
                    got += result
                return got
            finally:
                # The view is the caller's again at once (a traceback that
                # kept this frame would otherwise keep it exported).
                _ffi.release(start)
        except SSL.WantReadError:
            raise BlockingIOError(errno.EAGAIN, "no TLS record yet") from None
        except SSL.WantWriteError:
            # A post-handshake message must be sent first and the socket is
            # full: try again shortly (the socket may not become readable).
            self._retry_soon(0.001)
            raise BlockingIOError(errno.EAGAIN, "TLS must write first") from None
        except SSL.ZeroReturnError:
            return 0
        except SSL.SysCallError as e:
            if e.args and e.args[0] == -1:
                return 0
            self._failed(e)
            raise ConnectionResetError(errno.ECONNRESET, str(e)) from None
        except SSL.Error as e:
            self._failed(e)
            raise ConnectionResetError(errno.ECONNRESET, str(e)) from None

    def _recv_into_copying(self, view: memoryview) -> int:
        """L{recv_into} through pyOpenSSL's C{recv_into} (a record a call)."""
        got = 0
        size = len(view)
        while got < size:
            try:
                got += self.connection.recv_into(view[got:] if got else view)
            except SSL.WantReadError:
                if not got:
                    raise
                break
            except SSL.Error as e:
                if not got:
                    raise
                self._stopped = e.with_traceback(None)
                break
        return got

    # ------------------------------------------------------------ writing

    def _write_some_data(self, data: Any) -> Any:
        if not self.handshake_done:
            # Handshake in progress (a flight was cut short): finish it first.
            why = self._do_read()
            if why is not None:
                return why
            if not self.handshake_done:
                return 0
        if not data:
            return 0
        piece = memoryview(data)[: max(self.transport.SEND_LIMIT, self._retry_length)]
        try:
            count = self.connection.send(piece)
        except (SSL.WantWriteError, SSL.WantReadError):
            self._retry_length = len(piece)
            return 0
        except (SSL.Error, OSError) as e:
            self._failed(e)
            return main.CONNECTION_LOST
        self._retry_length = 0
        return count

    def send_now(self, pieces: Any) -> int:
        """
        Encrypt and send C{pieces} at once, as far as the socket takes them
        (the transport must have nothing queued).

        Small pieces (headers, 4 KiB blocks) are gathered into records of up
        to 16 KiB first: each C{SSL_write} makes at least one record and one
        system call, so a 16-byte header sent alone would cost as much as the
        data behind it.

        @return: how many bytes of the pieces were sent; the caller queues
            the rest in the transport, which retries them with
            L{_write_some_data} as OpenSSL requires after a partial write.
        """
        sent = 0
        for chunk in _records(pieces):
            size = len(chunk)
            done = 0
            while done < size:
                try:
                    count = self.connection.send(chunk[done:] if done else chunk)
                except (SSL.WantWriteError, SSL.WantReadError, SSL.Error, OSError):
                    # Full (the transport queues the rest, this chunk first,
                    # and retries with at least all of it), or broken (the
                    # transport's own write finds the error).
                    self._retry_length = size - done
                    return sent + done
                done += count
            sent += size
        return sent

    # ------------------------------------------------------------ closing

    def _close(self, orderly: bool) -> None:
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        if orderly and self.handshake_done and not self._closing:
            self._closing = True
            try:
                # One close_notify, without waiting for the client's.
                self.connection.shutdown()
            except Exception:
                pass
        self._close_socket(orderly)

    def _failed(self, error: BaseException) -> Any:
        self._on_failure(describe_tls_error(error))
        return main.CONNECTION_LOST


#: The most plaintext one TLS record carries.
_RECORD = 16 * 1024


def _records(pieces: Any) -> list[Any]:
    """
    C{pieces} regrouped so that small ones share records: consecutive small
    pieces are joined (up to L{_RECORD} bytes, topped up from the start of a
    large piece that follows), and large pieces are passed on as views.
    """
    out: list[Any] = []
    gather = bytearray()
    for piece in pieces:
        view = memoryview(piece)
        if len(view) + len(gather) <= _RECORD:
            gather += view
            continue
        if gather:
            room = _RECORD - len(gather)
            gather += view[:room]
            view = view[room:]
            out.append(gather)
            gather = bytearray()
        if len(view) >= _RECORD:
            out.append(view)
        else:
            gather += view
    if gather:
        out.append(gather)
    return out
