# -*- test-case-name: tests.test_tls_psk -*-
"""
TLS with pre-shared keys (TLS-PSK) for Twisted's TLS, as nbdkit, qemu and
libnbd do it.

The key file is the one GnuTLS's C{psktool -u alice -p keys.psk} writes and
C{nbdkit --tls-psk}, qemu's C{tls-creds-psk} (C{DIR/keys.psk}) and libnbd's
C{tls-psk-file} read: one C{username:hexkey} line per user.

    keys = load_psk_file("/etc/nbd/keys.psk")
    transport.startTLS(PSKServerCreator(psk_server_context(keys)))   # server
    transport.startTLS(PSKClientCreator(psk_client_context("alice", key)))

How, and why this way
=====================
pyOpenSSL, which Twisted's TLS is built on, has no PSK API: not in 26.4.0
(August 2026, the newest release), and its maintainers declined one
(pyca/pyopenssl#704; the pull request #732 was never merged). What they
accepted instead, in cryptography 2.2 (pyca/cryptography#4084, "this will
allow for C{SSL.Context} patching"), are the OpenSSL PSK functions in
cryptography's CFFI binding, C{cryptography.hazmat.bindings.openssl.binding.
Binding}, which is the very C{ffi}/C{lib} pair pyOpenSSL itself calls
(C{OpenSSL._util}) and which Twisted imports too. They are still there in
cryptography 48 and 50 (C{SSL_CTX_set_psk_server_callback},
C{SSL_CTX_set_psk_client_callback}, C{SSL_CTX_use_psk_identity_hint}).

So this module is a small binding of its own on that C{lib}: it installs a
C{ffi.callback} on the C{SSL_CTX} of an ordinary L{OpenSSL.SSL.Context}.
It is the I{same} OpenSSL as pyOpenSSL's: cryptography's wheels link
OpenSSL statically, so a C{ctypes} binding to the system's C{libssl} would
hold a different library whose functions must never see this C{SSL_CTX}.
The alternatives were worse: C{pyopenssl-psk} (last released 2020) does
the same calls but monkeypatches L{OpenSSL.SSL.Context} for the whole
process and leans on more of pyOpenSSL's private helpers; Python 3.13's
C{ssl} module has PSK callbacks, but Twisted's TLS does not use C{ssl}.

Two private pyOpenSSL names are used, both as old as pyOpenSSL's own
callbacks, which use them the same way: C{Context._context} (the
C{SSL_CTX *}) and C{Connection._reverse_mapping} (from an C{SSL *} back to
its L{OpenSSL.SSL.Connection}, only to remember which identity a connection
used). L{check_psk_support} says, with a clear message, when a future
release has moved any of this; C{tests/test_tls_psk.py} checks it too.

TLS versions and ciphers
========================
TLS 1.3 is preferred and TLS 1.2 is allowed, as GnuTLS does with the
priority string nbdkit, qemu and libnbd use (C{NORMAL:+ECDHE-PSK:+DHE-PSK:
+PSK}). OpenSSL's PSK callbacks serve TLS 1.3 too, for an external PSK with
SHA-256, so the TLS 1.3 suites are the two SHA-256 ones
(L{PSK_TLS13_CIPHERSUITES}); the key exchange is then C{psk_dhe_ke}
(ephemeral ECDH with the PSK). For TLS 1.2, L{PSK_TLS12_CIPHERS} puts the
forward-secret ECDHE-PSK suites first and plain-PSK AEAD suites after them.
Tried with Debian 12's GnuTLS 3.7.9 clients: nbdinfo (libnbd 1.14) and
qemu-img 7.2 (C{tls-creds-psk}) negotiate TLS 1.3 with
TLS_CHACHA20_POLY1305_SHA256 and a secp256r1 key share (C{psk_dhe_ke});
with TLS 1.3 disabled in GnuTLS, ECDHE-PSK-CHACHA20-POLY1305 over
secp256r1, as nbdkit and nbdinfo do between themselves.
No certificate is involved: a PSK server has none, and a PSK client refuses
any certificate a server offers (a TLS 1.3 server that does not take the
PSK may fall back to certificates, which must not authenticate it).

Unknown identities
==================
As GnuTLS does, an unknown identity gets a random key, so the handshake
fails exactly as with a wrong key (a bad binder in TLS 1.3, a bad Finished
in TLS 1.2) and a client cannot tell which user names exist. The refusal
is logged with the identity.

The key file
============
Lines are C{username:hexkey}; blank lines are skipped; the user name is
everything before the first colon, as GnuTLS reads it. Anything else is a
L{ValueError} naming the file and line. Like nbdkit, which passes the path
to GnuTLS and only documents that the file "contains the hex-encoded random
keys in plaintext" (keep it in a C{0700} directory), the file's permissions
are not checked. Unlike GnuTLS, which reads the file on every handshake,
the keys are read once, when the server starts.
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Mapping
from functools import cache
from pathlib import Path
from typing import Any, Union

from cryptography.hazmat.bindings.openssl.binding import Binding
from OpenSSL import SSL
from twisted.internet.interfaces import (
    IOpenSSLClientConnectionCreator,
    IOpenSSLServerConnectionCreator,
)
from twisted.logger import Logger
from zope.interface import implementer

__all__ = [
    "MAX_IDENTITY_LENGTH",
    "MAX_KEY_LENGTH",
    "PSKClientCreator",
    "PSKServerCreator",
    "PSK_TLS12_CIPHERS",
    "PSK_TLS13_CIPHERSUITES",
    "add_psk_server",
    "check_psk_support",
    "load_psk_file",
    "psk_client_context",
    "psk_identity",
    "psk_server_context",
]

_log = Logger()

#: The TLS 1.3 suites whose hash (SHA-256) OpenSSL's PSK callbacks use.
PSK_TLS13_CIPHERSUITES = b"TLS_AES_128_GCM_SHA256:TLS_CHACHA20_POLY1305_SHA256"
#: TLS 1.2 PSK suites: forward-secret ECDHE-PSK first, then plain-PSK AEAD.
#: (DHE-PSK would need Diffie-Hellman parameters; GnuTLS clients offer
#: ECDHE-PSK and PSK as well, so it is left out.)
PSK_TLS12_CIPHERS = (
    b"ECDHE-PSK-CHACHA20-POLY1305:ECDHE-PSK-AES256-CBC-SHA384:ECDHE-PSK-AES128-CBC-SHA256:"
    b"PSK-AES256-GCM-SHA384:PSK-CHACHA20-POLY1305:PSK-AES128-GCM-SHA256"
)
#: The longest user name accepted: GnuTLS's limit (OpenSSL's is larger).
MAX_IDENTITY_LENGTH = 128
#: The longest key accepted: OpenSSL's C{PSK_MAX_PSK_LEN} (GnuTLS takes more).
MAX_KEY_LENGTH = 512
#: Bytes of the random key an unknown identity gets.
_DECOY_KEY_LENGTH = 32

_SERVER_CALLBACK = "unsigned int (*)(SSL *, const char *, unsigned char *, unsigned int)"
_CLIENT_CALLBACK = (
    "unsigned int (*)(SSL *, const char *, char *, unsigned int, unsigned char *, unsigned int)"
)
_BINDING_NAMES = (
    "SSL_CTX_set_psk_server_callback",
    "SSL_CTX_set_psk_client_callback",
)

_ffi: Any = Binding.ffi
_lib: Any = Binding.lib

#: Each context's C callback, kept alive for as long as the context lives.
_callbacks: weakref.WeakKeyDictionary[SSL.Context, object] = weakref.WeakKeyDictionary()
#: The identity each server connection presented (see L{psk_identity}).
_identities: weakref.WeakKeyDictionary[SSL.Connection, str] = weakref.WeakKeyDictionary()

StrPath = Union[str, os.PathLike[str]]


# ------------------------------------------------------------------ the key file


def load_psk_file(path: StrPath) -> dict[str, bytes]:
    """
    Read a C{username:hexkey} file (C{psktool}'s format).

    @return: each user name with its key.
    @raise ValueError: a line is malformed (no colon, an empty or too long
        user name, a key that is not hex, empty or too long), a user name
        comes twice, or the file has no keys. The message names the file
        and the line.
    @raise OSError: the file cannot be read.
    """
    name = os.fspath(path)
    keys: dict[str, bytes] = {}
    data = Path(name).read_bytes()
    for number, raw in enumerate(data.split(b"\n"), start=1):
        line = raw.rstrip(b"\r\t ")
        if not line.strip():
            continue

        def bad(why: str, number: int = number) -> ValueError:
            return ValueError(f"{name}, line {number}: {why}")

        user_bytes, colon, hex_key = line.partition(b":")
        if not colon:
            raise bad("expected username:hexkey, found no colon")
        try:
            user = user_bytes.decode("utf-8")
        except UnicodeDecodeError:
            raise bad("the user name is not UTF-8") from None
        if not user:
            raise bad("the user name is empty")
        if "\0" in user:
            raise bad("the user name contains a NUL byte")
        if len(user_bytes) > MAX_IDENTITY_LENGTH:
            raise bad(f"the user name is longer than {MAX_IDENTITY_LENGTH} bytes")
        if user in keys:
            raise bad(f"user {user!r} appears a second time")
        try:
            key = bytes.fromhex(hex_key.decode("ascii"))
        except (UnicodeDecodeError, ValueError):
            raise bad(f"the key of user {user!r} is not hexadecimal") from None
        if not key:
            raise bad(f"the key of user {user!r} is empty")
        if len(key) > MAX_KEY_LENGTH:
            raise bad(f"the key of user {user!r} is longer than {MAX_KEY_LENGTH} bytes")
        keys[user] = key
    if not keys:
        raise ValueError(f"{name}: no username:hexkey lines")
    return keys


# ------------------------------------------------------------------ the binding


@cache
def check_psk_support() -> None:
    """
    Check that the installed pyOpenSSL and cryptography give what this
    module needs (see the module's docstring).

    @raise RuntimeError: they do not, saying what is missing.
    """
    missing = [n for n in _BINDING_NAMES if not hasattr(_lib, n)]
    if missing or not getattr(_lib, "Cryptography_HAS_PSK", False):
        raise RuntimeError(
            "TLS-PSK needs OpenSSL's PSK functions from cryptography's OpenSSL binding, and "
            f"this cryptography's binding lacks {', '.join(missing) or 'PSK support'}"
        )
    if not hasattr(SSL.Context(SSL.TLS_METHOD), "_context"):
        raise RuntimeError("TLS-PSK: this pyOpenSSL's Context has no _context (SSL_CTX *)")
    if not isinstance(getattr(SSL.Connection, "_reverse_mapping", None), Mapping):
        raise RuntimeError("TLS-PSK: this pyOpenSSL's Connection has no _reverse_mapping")


def _ssl_ctx(context: SSL.Context) -> Any:
    """The C{SSL_CTX *} of C{context}, which must not have made connections yet."""
    check_psk_support()
    if getattr(context, "_used", False):
        raise ValueError("the Context has already made a Connection; add PSK before that")
    return context._context


def _connection_of(ssl: Any) -> SSL.Connection | None:
    """The pyOpenSSL Connection of an C{SSL *}, if it can be found."""
    mapping: Mapping[Any, SSL.Connection] = SSL.Connection._reverse_mapping
    return mapping.get(ssl)


def _peer_of(connection: SSL.Connection | None) -> str:
    """The peer's address for a log line, or C{"?"}."""
    try:
        protocol = connection.get_app_data() if connection is not None else None
        return str(protocol.transport.getPeer())  # type: ignore[union-attr]
    except Exception:
        return "?"


def add_psk_server(context: SSL.Context, keys: Mapping[str, bytes]) -> None:
    """
    Make C{context} accept the pre-shared keys C{keys} (user name to key).

    C{context} must not have made a connection yet. This only installs the
    callback; L{psk_server_context} also sets the versions and ciphers. A
    context that also has a certificate would serve both kinds of client,
    but nbdkit's C{--tls-psk} overrides certificates, and the server should
    do the same (an unknown identity is refused, not passed to certificate
    authentication).
    """
    keys = dict(keys)
    ssl_ctx = _ssl_ctx(context)

    def callback(ssl: Any, identity: Any, psk: Any, max_psk_len: int) -> int:
        # Called by OpenSSL in the middle of a handshake: it must not raise.
        try:
            raw = _ffi.string(identity) if identity != _ffi.NULL else b""
            connection = _connection_of(ssl)
            try:
                key = keys.get(raw.decode("utf-8"))
            except UnicodeDecodeError:
                key = None
            shown = raw.decode("utf-8", "backslashreplace")
            if key is None:
                _log.warn(
                    "TLS-PSK: refusing unknown identity {identity!r} from {peer}",
                    identity=shown,
                    peer=_peer_of(connection),
                )
                key = os.urandom(_DECOY_KEY_LENGTH)
            elif connection is not None:
                _identities[connection] = shown
            if len(key) > max_psk_len:
                _log.error(
                    "TLS-PSK: the key of {identity!r} is longer than OpenSSL's limit {limit}",
                    identity=shown,
                    limit=max_psk_len,
                )
                return 0
            _ffi.memmove(psk, key, len(key))
            return len(key)
        except BaseException:
            _log.failure("TLS-PSK server callback failed")
            return 0

    c_callback = _ffi.callback(_SERVER_CALLBACK, callback)
    _callbacks[context] = c_callback
    _lib.SSL_CTX_set_psk_server_callback(ssl_ctx, c_callback)


def _set_psk_client(context: SSL.Context, identity: str, key: bytes) -> None:
    """Make C{context} present C{identity} with C{key}."""
    identity_bytes = identity.encode("utf-8")
    ssl_ctx = _ssl_ctx(context)

    def callback(
        ssl: Any, hint: Any, identity_out: Any, max_identity_len: int, psk: Any, max_psk_len: int
    ) -> int:
        try:
            # max_identity_len leaves no room for the NUL terminator
            # (OpenSSL's buffer is one byte longer); stay one byte inside
            # it anyway.
            if len(identity_bytes) >= max_identity_len or len(key) > max_psk_len:
                _log.error("TLS-PSK: the identity or key is too long for OpenSSL")
                return 0
            _ffi.memmove(identity_out, identity_bytes + b"\0", len(identity_bytes) + 1)
            _ffi.memmove(psk, key, len(key))
            return len(key)
        except BaseException:
            _log.failure("TLS-PSK client callback failed")
            return 0

    c_callback = _ffi.callback(_CLIENT_CALLBACK, callback)
    _callbacks[context] = c_callback
    _lib.SSL_CTX_set_psk_client_callback(ssl_ctx, c_callback)


# ------------------------------------------------------------------ contexts


def _configure(
    context: SSL.Context,
    minimum_version: int,
    maximum_version: int,
    tls12_ciphers: bytes,
    tls13_ciphersuites: bytes,
) -> None:
    context.set_min_proto_version(minimum_version)
    context.set_max_proto_version(maximum_version)
    context.set_options(SSL.OP_NO_COMPRESSION | SSL.OP_NO_RENEGOTIATION)
    context.set_cipher_list(tls12_ciphers)
    context.set_tls13_ciphersuites(tls13_ciphersuites)


def psk_server_context(
    keys: Mapping[str, bytes],
    *,
    minimum_version: int = SSL.TLS1_2_VERSION,
    maximum_version: int = 0,
    tls12_ciphers: bytes = PSK_TLS12_CIPHERS,
    tls13_ciphersuites: bytes = PSK_TLS13_CIPHERSUITES,
) -> SSL.Context:
    """
    A server context that authenticates clients by pre-shared key only.

    @param keys: user name to key, as L{load_psk_file} gives.
    @param minimum_version: the oldest TLS version (an C{SSL.TLS1_*_VERSION}).
    @param maximum_version: the newest, or 0 for the newest OpenSSL knows.
    @param tls12_ciphers: the TLS 1.2 cipher list (OpenSSL's syntax).
    @param tls13_ciphersuites: the TLS 1.3 suites; keep a SHA-256 one.
    """
    if not keys:
        raise ValueError("a PSK server needs at least one key")
    from twisted_nbd.tls import whole_writes

    context = SSL.Context(SSL.TLS_SERVER_METHOD)
    _configure(context, minimum_version, maximum_version, tls12_ciphers, tls13_ciphersuites)
    add_psk_server(context, keys)
    whole_writes(context)
    return context


def psk_client_context(
    identity: str,
    key: bytes,
    *,
    minimum_version: int = SSL.TLS1_2_VERSION,
    maximum_version: int = 0,
    tls12_ciphers: bytes = PSK_TLS12_CIPHERS,
    tls13_ciphersuites: bytes = PSK_TLS13_CIPHERSUITES,
) -> SSL.Context:
    """
    A client context that presents C{identity} with C{key}, and accepts no
    server that authenticates with a certificate instead of the key.

    The other parameters are as for L{psk_server_context}.
    """
    if not identity or "\0" in identity or len(identity.encode("utf-8")) > MAX_IDENTITY_LENGTH:
        raise ValueError(f"bad PSK identity {identity!r}")
    if not key or len(key) > MAX_KEY_LENGTH:
        raise ValueError(f"a PSK must have 1 to {MAX_KEY_LENGTH} bytes")
    context = SSL.Context(SSL.TLS_CLIENT_METHOD)
    _configure(context, minimum_version, maximum_version, tls12_ciphers, tls13_ciphersuites)
    # A PSK handshake has no certificate, so this callback runs only when a
    # server offers one: refuse it (no CA is configured, so OpenSSL's own
    # check would fail as well; this makes the intent explicit).
    context.set_verify(SSL.VERIFY_PEER, _refuse_certificate)
    _set_psk_client(context, identity, key)
    return context


def _refuse_certificate(connection: SSL.Connection, *args: object) -> bool:
    _log.warn("TLS-PSK: the server offered a certificate instead of using the PSK")
    return False


def psk_identity(connection: SSL.Connection) -> str | None:
    """
    The identity a server-side connection presented, once its handshake has
    completed (before that, only claimed). C{None} for a connection that did
    not use a known PSK. Twisted gives the connection as
    C{transport.getHandle()}.
    """
    return _identities.get(connection)


# ------------------------------------------------------------------ creators for startTLS


@implementer(IOpenSSLServerConnectionCreator)
class PSKServerCreator:
    """
    What the server hands to C{transport.startTLS}: makes each connection's
    L{SSL.Connection} from one context (see L{psk_server_context}).
    """

    def __init__(self, context: SSL.Context) -> None:
        self.context = context

    def serverConnectionForTLS(self, tlsProtocol: object) -> SSL.Connection:
        """A server connection; Twisted sets its accept state and app data."""
        return SSL.Connection(self.context, None)


@implementer(IOpenSSLClientConnectionCreator)
class PSKClientCreator:
    """
    What a client hands to C{transport.startTLS}: makes its
    L{SSL.Connection} from one context (see L{psk_client_context}).
    """

    def __init__(self, context: SSL.Context) -> None:
        self.context = context

    def clientConnectionForTLS(self, tlsProtocol: object) -> SSL.Connection:
        """A client connection; Twisted sets its connect state and app data."""
        return SSL.Connection(self.context, None)
