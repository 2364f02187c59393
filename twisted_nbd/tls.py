# -*- test-case-name: tests.test_tls -*-
"""
TLS for NBD's STARTTLS: the server's and the client's settings, checked
before anything listens, and the objects Twisted's C{transport.startTLS}
takes.

The server's sans-I/O core (L{twisted_nbd._connection}) only decides: it
answers NBD_OPT_STARTTLS and emits L{twisted_nbd.events.StartTLS}. The
protocol then calls C{transport.startTLS} with the
L{IOpenSSLServerConnectionCreator} that L{TLSSettings.server_creator}
makes (pyOpenSSL, as Twisted's own TLS uses).

Certificates are the files nbdkit, qemu and libnbd share: a directory with
C{ca-cert.pem}, C{server-cert.pem} and C{server-key.pem} (and
C{client-cert.pem}/C{client-key.pem} on the client's side), or the three
files named one by one.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any, Literal

from twisted.internet.interfaces import (
    IOpenSSLClientConnectionCreator,
    IOpenSSLServerConnectionCreator,
)
from zope.interface import implementer

__all__ = [
    "TLS_MODES",
    "TLSClientSettings",
    "TLSError",
    "TLSMode",
    "TLSSettings",
    "describe_tls_error",
    "dn_allowed",
    "peer_subject",
]

#: How a server offers TLS: not at all (the spec's NOTLS), as a choice
#: (SELECTIVETLS: plaintext allowed except for exports that require TLS),
#: or for everything (FORCEDTLS).
TLSMode = Literal["off", "on", "require"]
TLS_MODES: tuple[TLSMode, ...] = ("off", "on", "require")


class TLSError(ValueError):
    """TLS settings that cannot work; C{str()} is one line for the user."""


def _readable(what: str, path: str) -> str:
    path = os.path.abspath(path)
    try:
        with open(path, "rb"):
            pass
    except OSError as e:
        raise TLSError(f"{what} {path}: {e.strerror or e}") from None
    return path


@dataclass(frozen=True)
class TLSSettings:
    """
    A server's TLS settings.

    @ivar mode: C{"off"}, C{"on"} (STARTTLS offered, plaintext allowed) or
        C{"require"} (every option but STARTTLS and ABORT gets
        ERR_TLS_REQD before TLS).
    @ivar cert: the server's certificate chain (PEM).
    @ivar key: its private key (PEM).
    @ivar ca: CA certificates that client certificates must be signed by.
    @ivar verify_peer: refuse clients without a certificate signed by C{ca}.
    @ivar allow_dns: if not empty, a client certificate's subject DN (RFC
        4514, e.g. C{CN=alice,O=Example}) must match one of these
        shell-style patterns, or the connection is dropped after the
        handshake.
    @ivar psk_file: a C{username:hexkey} file of pre-shared keys (psktool's
        format), used instead of certificates when given.
    """

    mode: TLSMode = "off"
    cert: str | None = None
    key: str | None = None
    ca: str | None = None
    verify_peer: bool = False
    allow_dns: tuple[str, ...] = ()
    psk_file: str | None = None

    @classmethod
    def from_directory(cls, directory: str, mode: TLSMode = "on", **kw: Any) -> TLSSettings:
        """
        The settings for a certificates directory in the layout nbdkit,
        qemu and libnbd share: C{server-cert.pem}, C{server-key.pem}, and
        C{ca-cert.pem} if it is there.
        """
        ca = os.path.join(directory, "ca-cert.pem")
        return cls(
            mode=mode,
            cert=os.path.join(directory, "server-cert.pem"),
            key=os.path.join(directory, "server-key.pem"),
            ca=ca if os.path.exists(ca) else None,
            **kw,
        )

    def check(self) -> None:
        """
        Check that the settings can work and the files can be loaded.

        @raise TLSError: with a one-line reason.
        """
        if self.mode not in TLS_MODES:
            raise TLSError(f"TLS mode {self.mode!r} is not one of {', '.join(TLS_MODES)}")
        if self.mode == "off":
            return
        if self.psk_file is None and (self.cert is None or self.key is None):
            raise TLSError(
                "TLS needs a certificate and its key (--tls-cert and --tls-key, or "
                "--tls-certificates DIR) or a PSK file (--tls-psk)"
            )
        if self.verify_peer and self.ca is None:
            raise TLSError("verifying client certificates needs the CA that signs them (--tls-ca)")
        if self.allow_dns and not self.verify_peer:
            raise TLSError("allowing clients by certificate DN needs --tls-verify-peer")
        self.server_creator()

    def server_creator(self) -> Any:
        """
        What C{transport.startTLS} takes on the server's side: one
        pyOpenSSL context, made now (so that bad files fail at start-up),
        shared by every connection. With a PSK file, pre-shared keys are
        used instead of certificates (as nbdkit does when given both).

        @raise TLSError: a file is missing or does not load.
        """
        if self.psk_file is not None:
            from twisted_nbd import tls_psk

            try:
                keys = tls_psk.load_psk_file(self.psk_file)
                return tls_psk.PSKServerCreator(tls_psk.psk_server_context(keys))
            except (OSError, ValueError) as e:
                raise TLSError(f"--tls-psk: {e}") from None
        return ServerTLS(self._context())

    def _context(self) -> Any:
        from OpenSSL import SSL

        context = _new_context(SSL.OP_CIPHER_SERVER_PREFERENCE)
        try:
            _load_pair(context, self.cert, self.key, "--tls-cert", "--tls-key")
            if self.ca is not None:
                context.load_verify_locations(_readable("--tls-ca", self.ca))
        except SSL.Error as e:
            raise TLSError(
                f"the TLS certificate or key does not load: {describe_tls_error(e)}"
            ) from None
        if self.verify_peer:
            context.set_verify(
                SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT | SSL.VERIFY_CLIENT_ONCE,
                _verified,
            )
        # A session id context, so that resumed sessions (which a verifying
        # server must be able to tell apart) work at all.
        context.set_session_id(b"twisted-nbd")
        whole_writes(context)
        return context


#: OpenSSL's SSL_MODE_ENABLE_PARTIAL_WRITE (ssl.h), which pyOpenSSL turns
#: on in every new context and does not name.
_MODE_ENABLE_PARTIAL_WRITE = 0x1


def whole_writes(context: Any) -> None:
    """
    Make C{SSL_write} on C{context}'s connections take all it is given in one
    call, looping over the 16 KiB records in C, instead of returning after
    each record (partial writes, which pyOpenSSL turns on): a 1 MiB READ
    reply is then one call from Python, not 64, which saves about a third
    of the server's CPU per byte read over TLS (C{bench/tls.py}).

    A write the socket cannot take whole fails with C{WantWriteError} after
    sending part of it; OpenSSL then requires the next write to start with
    the same bytes and be at least as long (L{twisted_nbd._tls_socket}
    does so). Twisted's own TLS (memory BIOs, which never refuse a write)
    is unaffected. Call it before the context makes its first connection.
    """
    context.clear_mode(_MODE_ENABLE_PARTIAL_WRITE)


def _new_context(options: int = 0) -> Any:
    """
    A pyOpenSSL context for TLS 1.2 and later, without renegotiation (a
    peer could otherwise make us redo handshakes at will) or compression
    (CRIME), with C{options} besides.
    """
    from OpenSSL import SSL

    context = SSL.Context(SSL.TLS_METHOD)
    context.set_min_proto_version(SSL.TLS1_2_VERSION)
    context.set_options(SSL.OP_NO_COMPRESSION | SSL.OP_NO_RENEGOTIATION | options)
    return context


def _load_pair(
    context: Any, cert: str | None, key: str | None, cert_name: str, key_name: str
) -> None:
    """
    Load a certificate chain and its private key into C{context}, if both
    are given; the names say which option or file is at fault in errors.

    @raise TLSError: a file cannot be read.
    @raise OpenSSL.SSL.Error: it does not load, or the key does not match.
    """
    if cert is None or key is None:
        return
    context.use_certificate_chain_file(_readable(cert_name, cert))
    context.use_privatekey_file(_readable(key_name, key))
    context.check_privatekey()


def _verified(connection: Any, x509: Any, errno: int, depth: int, ok: int) -> bool:
    # OpenSSL's own chain verification decides.
    return bool(ok)


def describe_tls_error(error: BaseException) -> str:
    """
    One line for an OpenSSL error: the reasons in a pyOpenSSL error's list
    of (library, function, reason), or a system call error's message.
    """
    args = getattr(error, "args", ())
    if args and isinstance(args[0], list):
        parts = [str(item[-1]) for item in args[0] if isinstance(item, tuple) and item]
        if parts:
            return "; ".join(parts)
    if args and isinstance(args[0], int) and len(args) > 1:
        return f"{args[1]}"
    return str(error) or type(error).__name__


def dn_allowed(dn: str | None, patterns: tuple[str, ...]) -> bool:
    """
    Whether a client whose certificate has subject C{dn} (RFC 4514; C{None}:
    no certificate) passes an allow-list of shell-style, case-sensitive
    C{patterns} (as qemu's C{authz-simple}): always when the list is empty.
    """
    if not patterns:
        return True
    return dn is not None and any(fnmatchcase(dn, pattern) for pattern in patterns)


def _ssl_connection(source: Any) -> Any:
    """The pyOpenSSL C{Connection} of a TLS transport, or C{source} if it is one."""
    from OpenSSL import SSL

    return source if isinstance(source, SSL.Connection) else source.getHandle()


def peer_psk_identity(source: Any) -> str | None:
    """
    The PSK identity the peer used, or C{None}; C{source} is a TLS
    transport or a pyOpenSSL C{Connection}.
    """
    from twisted_nbd import tls_psk

    try:
        return tls_psk.psk_identity(_ssl_connection(source))
    except Exception:
        return None


def peer_subject(source: Any) -> str | None:
    """
    The subject DN (RFC 4514) of the certificate the peer presented, or
    C{None}; C{source} is a TLS transport or a pyOpenSSL C{Connection}.
    """
    try:
        certificate = _ssl_connection(source).get_peer_certificate(as_cryptography=True)
    except Exception:
        return None
    if certificate is None:
        return None
    return str(certificate.subject.rfc4514_string())


def session_description(source: Any) -> str:
    """The TLS version and cipher of a session, for logs."""
    try:
        connection = _ssl_connection(source)
        return f"{connection.get_protocol_version_name()}, {connection.get_cipher_name()}"
    except Exception:
        return "?"


@implementer(IOpenSSLServerConnectionCreator)
class ServerTLS:
    """Makes the pyOpenSSL connection of each server-side TLS session."""

    def __init__(self, context: Any) -> None:
        self.context = context

    def serverConnectionForTLS(self, tlsProtocol: Any) -> Any:  # noqa: N802, N803 - Twisted's
        """A new server-side C{OpenSSL.SSL.Connection}."""
        from OpenSSL import SSL

        return SSL.Connection(self.context, None)


@dataclass(frozen=True)
class TLSClientSettings:
    """
    What the client (L{twisted_nbd.client}) uses for STARTTLS.

    @ivar ca: CA certificates the server's certificate must be signed by;
        the system's trust store if C{None}.
    @ivar hostname: the name the server's certificate must carry
        (C{None}: do not check the name, as libnbd does when told so).
    @ivar cert: a client certificate chain to present, if any.
    @ivar key: its private key.
    @ivar psk_identity: with C{psk_key}, use a pre-shared key instead of
        certificates.
    @ivar psk_key: the key's bytes.
    @ivar require: refuse to go on in plaintext if the server refuses
        STARTTLS (C{False}: try TLS, fall back, as libnbd's
        C{tls=allow}).
    """

    ca: str | None = None
    hostname: str | None = None
    cert: str | None = None
    key: str | None = None
    psk_identity: str | None = None
    psk_key: bytes | None = None
    require: bool = True

    @classmethod
    def from_directory(
        cls, directory: str, hostname: str | None = None, **kw: Any
    ) -> TLSClientSettings:
        """
        Settings from a certificates directory: C{ca-cert.pem}, and
        C{client-cert.pem}/C{client-key.pem} if they are there.
        """
        cert = os.path.join(directory, "client-cert.pem")
        key = os.path.join(directory, "client-key.pem")
        have_cert = os.path.exists(cert) and os.path.exists(key)
        return cls(
            ca=os.path.join(directory, "ca-cert.pem"),
            hostname=hostname,
            cert=cert if have_cert else None,
            key=key if have_cert else None,
            **kw,
        )

    @classmethod
    def from_psk_file(cls, path: str, identity: str, **kw: Any) -> TLSClientSettings:
        """
        Settings that use C{identity}'s key from a C{username:hexkey} file
        (as libnbd's C{tls-psk-file} and qemu's C{tls-creds-psk} read).

        @raise TLSError: the file cannot be read, or has no such user.
        """
        from twisted_nbd import tls_psk

        try:
            keys = tls_psk.load_psk_file(path)
        except (OSError, ValueError) as e:
            raise TLSError(str(e)) from None
        if identity not in keys:
            raise TLSError(f"{path} has no key for {identity!r}")
        return cls(psk_identity=identity, psk_key=keys[identity], **kw)

    def client_creator(self) -> Any:
        """
        What C{transport.startTLS} takes on the client's side: Twisted's
        own C{optionsForClientTLS} (which checks the server's name with
        C{service_identity}) when there is a C{hostname}, else a context
        that checks the chain only.

        @raise TLSError: a file is missing or does not load.
        """
        from OpenSSL import SSL

        if self.psk_identity is not None and self.psk_key is not None:
            from twisted_nbd import tls_psk

            try:
                context = tls_psk.psk_client_context(self.psk_identity, self.psk_key)
            except ValueError as e:
                raise TLSError(str(e)) from None
            return tls_psk.PSKClientCreator(context)
        try:
            if self.hostname is not None:
                from twisted.internet import ssl

                trust: Any = (
                    ssl.trustRootFromCertificates(  # type: ignore[no-untyped-call]
                        _load_certificates(self.ca)
                    )
                    if self.ca is not None
                    else ssl.platformTrust()  # type: ignore[no-untyped-call]
                )
                client = None
                if self.cert is not None and self.key is not None:
                    with open(_readable("the client certificate", self.cert), "rb") as f:
                        pem = f.read()
                    with open(_readable("the client key", self.key), "rb") as f:
                        pem += b"\n" + f.read()
                    client = ssl.PrivateCertificate.loadPEM(pem)  # type: ignore[no-untyped-call]
                return ssl.optionsForClientTLS(
                    self.hostname, trustRoot=trust, clientCertificate=client
                )
            context = _new_context()
            if self.ca is not None:
                context.load_verify_locations(_readable("the CA file", self.ca))
            else:
                context.set_default_verify_paths()
            _load_pair(context, self.cert, self.key, "the client certificate", "the client key")
            context.set_verify(SSL.VERIFY_PEER, _verified)
            return ClientTLS(context)
        except SSL.Error as e:
            raise TLSError(f"the TLS files do not load: {describe_tls_error(e)}") from None


def _load_certificates(path: str) -> list[Any]:
    """Every certificate in a PEM file, as Twisted C{Certificate}s."""
    from twisted.internet import ssl

    with open(_readable("the CA file", path), "rb") as f:
        data = f.read()
    marker = b"-----END CERTIFICATE-----"
    pems = [part + marker for part in data.split(marker) if b"-----BEGIN" in part]
    if not pems:
        raise TLSError(f"the CA file {path} holds no certificate")
    return [ssl.Certificate.loadPEM(pem) for pem in pems]


@implementer(IOpenSSLClientConnectionCreator)
class ClientTLS:
    """Makes the pyOpenSSL connection of each client-side TLS session."""

    def __init__(self, context: Any) -> None:
        self.context = context

    def clientConnectionForTLS(self, tlsProtocol: Any) -> Any:  # noqa: N802, N803 - Twisted's
        """A new client-side C{OpenSSL.SSL.Connection}."""
        from OpenSSL import SSL

        connection = SSL.Connection(self.context, None)
        connection.set_connect_state()
        return connection
