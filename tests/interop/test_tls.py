"""
TLS with real peers: libnbd (nbdinfo, nbdcopy; GnuTLS) and qemu-img against
C{twistd nbd --tls ...}, and the twisted-nbd client against nbdkit and
qemu-nbd with TLS. Certificates are made fresh by each test
(L{tests.tlsfiles}); S- ids refer to the protocol digest.
"""

from __future__ import annotations

import hashlib
import os
import socket
import struct
from pathlib import Path
from typing import Any, Callable

import pytest
from twisted.internet import reactor
from twisted.trial.unittest import SynchronousTestCase, TestCase

from tests.interop.helpers import (
    LOOPBACK,
    NBDServer,
    make_image,
    make_tempdir,
    require_tool,
    run_libnbd,
    run_tool,
    start_server,
)
from tests.tlsfiles import make_certificates, make_psk_file
from twisted_nbd.client import NBDHandshakeError, TLSClientSettings, connect, list_exports

pytestmark = pytest.mark.interop

MiB = 1024 * 1024
NBD_OPT_STARTTLS = 5
NBD_REP_ACK = 1
NBD_REP_ERR_TLS_REQD = 0x80000005


def nbds(server: NBDServer, certificates: Path, export: str = "") -> str:
    """libnbd's URI for a TLS connection with the certificates in C{certificates}."""
    return f"nbds://{LOOPBACK}:{server.port}/{export}?tls-certificates={certificates}"


def client_only(certificates: Path, into: Path) -> Path:
    """A directory with only the CA (a client that has no certificate of its own)."""
    into.mkdir()
    (into / "ca-cert.pem").write_bytes((certificates / "ca-cert.pem").read_bytes())
    return into


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class X509Tests(SynchronousTestCase):
    """STARTTLS with certificates, as libnbd and qemu do it."""

    def setUp(self) -> None:
        self.tmp = make_tempdir(self)
        self.certs = make_certificates(self.tmp / "pki")

    def test_nbdinfo_require(self) -> None:
        """
        S-03: with --tls require, nbdinfo over TLS sees the export; plain
        nbdinfo is refused with TLS-required.
        """
        server = start_server(
            self, "--memory", "16M", "--tls", "require", "--tls-certificates", str(self.certs)
        )
        done = run_tool([require_tool("nbdinfo"), "--size", nbds(server, self.certs)])
        self.assertEqual(done.stdout.strip(), str(16 * MiB))
        plain = run_tool([require_tool("nbdinfo"), server.uri], check=False)
        self.assertNotEqual(plain.returncode, 0)
        # libnbd 1.14 reports NBD_REP_ERR_TLS_REQD as "Operation not supported";
        # the server's log says why.
        self.assertIn("opt_go", plain.stderr)
        server.wait_for_log("Refused option", "TLS is required")
        server.wait_for_log("switched to TLS")

    def test_tls_on_serves_both(self) -> None:
        """--tls on: plaintext and TLS clients are both served."""
        server = start_server(
            self, "--memory", "16M", "--tls", "on", "--tls-certificates", str(self.certs)
        )
        nbdinfo = require_tool("nbdinfo")
        self.assertEqual(run_tool([nbdinfo, "--size", server.uri]).stdout.strip(), str(16 * MiB))
        self.assertEqual(
            run_tool([nbdinfo, "--size", nbds(server, self.certs)]).stdout.strip(), str(16 * MiB)
        )

    def test_nbdcopy_round_trip(self) -> None:
        """Data survives a copy to and from the server over TLS, byte for byte."""
        source = make_image(self.tmp / "source.img", 32 * MiB, os.urandom(32 * MiB))
        image = make_image(self.tmp / "disk.img", 32 * MiB)
        server = start_server(
            self, "--image", str(image), "--tls", "require", "--tls-certificates", str(self.certs)
        )
        nbdcopy = require_tool("nbdcopy")
        uri = nbds(server, self.certs)
        run_tool([nbdcopy, str(source), uri], timeout=120)
        back = self.tmp / "back.img"
        run_tool([nbdcopy, uri, str(back)], timeout=120)
        self.assertEqual(digest(back), digest(source))
        self.assertEqual(digest(image), digest(source))

    def test_pipelined_small_requests(self) -> None:
        """
        C-01: 256 pipelined 4 KiB WRITEs then READs over TLS, each request in
        a record of its own (as GnuTLS sends them), parsed together and
        answered in shared records: every reply reaches its own request,
        with the right data.
        """
        image = make_image(self.tmp / "disk.img", 4 * MiB)
        server = start_server(
            self, "--image", str(image), "--tls", "require", "--tls-certificates", str(self.certs)
        )
        result = run_libnbd(PIPELINE_SCRIPT, nbds(server, self.certs))
        self.assertEqual(result, {"written": 256, "read_back": 256, "wrong": 0})

    def test_qemu_img_convert(self) -> None:
        """qemu-img with a tls-creds-x509 object reads and writes over TLS."""
        source = make_image(self.tmp / "source.img", 8 * MiB, os.urandom(8 * MiB))
        image = make_image(self.tmp / "disk.img", 8 * MiB)
        server = start_server(
            self, "--image", str(image), "--tls", "require", "--tls-certificates", str(self.certs)
        )
        qemu_img = require_tool("qemu-img")
        creds = f"tls-creds-x509,id=tls0,endpoint=client,dir={self.certs}"
        target = f"driver=nbd,host={LOOPBACK},port={server.port},tls-creds=tls0"
        run_tool(
            [qemu_img, "convert", "-n", "--object", creds, "-f", "raw", str(source),
             "--target-image-opts", target],
            timeout=120,
        )  # fmt: skip
        self.assertEqual(digest(image), digest(source))
        back = self.tmp / "back.img"
        run_tool(
            [qemu_img, "convert", "--object", creds, "--image-opts", target, "-O", "raw",
             str(back)],
            timeout=120,
        )  # fmt: skip
        self.assertEqual(digest(back), digest(source))

    def test_verify_peer(self) -> None:
        """
        --tls-verify-peer: a client with a certificate signed by the CA is
        served; one without a certificate is refused.
        """
        server = start_server(
            self,
            "--memory", "16M", "--tls", "require", "--tls-certificates", str(self.certs),
            "--tls-verify-peer",
        )  # fmt: skip
        nbdinfo = require_tool("nbdinfo")
        self.assertEqual(
            run_tool([nbdinfo, "--size", nbds(server, self.certs)]).stdout.strip(), str(16 * MiB)
        )
        server.wait_for_log("certificate CN=alice,O=twisted-nbd tests")
        anonymous = client_only(self.certs, self.tmp / "anonymous")
        refused = run_tool([nbdinfo, "--size", nbds(server, anonymous)], check=False)
        self.assertNotEqual(refused.returncode, 0)
        server.wait_for_log("TLS handshake with", "failed")

    def test_certificate_from_another_ca(self) -> None:
        """A client certificate signed by some other CA is refused."""
        server = start_server(
            self,
            "--memory", "16M", "--tls", "require", "--tls-certificates", str(self.certs),
            "--tls-verify-peer",
        )  # fmt: skip
        other = make_certificates(self.tmp / "other", ca_cn="another CA")
        # The other directory's client certificate, but our CA to check the server.
        (other / "ca-cert.pem").write_bytes((self.certs / "ca-cert.pem").read_bytes())
        refused = run_tool([require_tool("nbdinfo"), nbds(server, other)], check=False)
        self.assertNotEqual(refused.returncode, 0)

    def test_dn_allow_list(self) -> None:
        """--tls-allow-dn: a certificate whose subject matches no pattern is dropped."""
        nbdinfo = require_tool("nbdinfo")
        common = ["--memory", "16M", "--tls-certificates", str(self.certs), "--tls-verify-peer"]
        server = start_server(self, *common, "--tls-allow-dn", "CN=bob,*")
        refused = run_tool([nbdinfo, nbds(server, self.certs)], check=False)
        self.assertNotEqual(refused.returncode, 0)
        server.wait_for_log("certificate CN=alice,O=twisted-nbd tests is not allowed")
        server = start_server(self, *common, "--tls-allow-dn", "CN=alice,O=twisted-nbd tests")
        self.assertEqual(
            run_tool([nbdinfo, "--size", nbds(server, self.certs)]).stdout.strip(), str(16 * MiB)
        )

    def test_selective_tls_exports(self) -> None:
        """
        S-04: an export with tls = "require" in the config file is not listed
        to plaintext clients and is refused to them; over TLS it is both.
        """
        config = self.tmp / "exports.toml"
        config.write_text(
            'default = "open"\n'
            '[[export]]\nname = "open"\nmemory = "1M"\n'
            '[[export]]\nname = "secret"\nmemory = "2M"\ntls = "require"\n'
        )
        server = start_server(
            self, "--config", str(config), "--tls", "on", "--tls-certificates", str(self.certs)
        )
        nbdinfo = require_tool("nbdinfo")
        plain = run_tool([nbdinfo, "--list", server.uri]).stdout
        self.assertIn("open", plain)
        self.assertNotIn("secret", plain)
        refused = run_tool([nbdinfo, f"{server.uri}/secret"], check=False)
        self.assertNotEqual(refused.returncode, 0)
        encrypted = run_tool([nbdinfo, "--list", nbds(server, self.certs)]).stdout
        self.assertIn("secret", encrypted)
        self.assertEqual(
            run_tool([nbdinfo, "--size", nbds(server, self.certs, "secret")]).stdout.strip(),
            str(2 * MiB),
        )

    def test_workers(self) -> None:
        """TLS works the same with --workers 2 (each worker does its own TLS)."""
        server = start_server(
            self,
            "--memory", "16M", "--workers", "2", "--tls", "require",
            "--tls-certificates", str(self.certs),
        )  # fmt: skip
        nbdinfo = require_tool("nbdinfo")
        for _ in range(4):
            done = run_tool([nbdinfo, "--size", nbds(server, self.certs)])
            self.assertEqual(done.stdout.strip(), str(16 * MiB))


class PSKTests(SynchronousTestCase):
    """TLS-PSK with a psktool-style key file, as libnbd and qemu use it."""

    def setUp(self) -> None:
        self.tmp = make_tempdir(self)
        self.keys = self.tmp / "keys.psk"
        make_psk_file(self.keys)
        self.server = start_server(
            self, "--memory", "16M", "--tls", "require", "--tls-psk", str(self.keys)
        )

    def uri(self, keys: Path, user: str = "alice") -> str:
        return f"nbds://{user}@{LOOPBACK}:{self.server.port}/?tls-psk-file={keys}"

    def test_nbdinfo(self) -> None:
        """nbdinfo (GnuTLS) connects with the key; the log names the identity."""
        done = run_tool([require_tool("nbdinfo"), "--size", self.uri(self.keys)])
        self.assertEqual(done.stdout.strip(), str(16 * MiB))
        self.server.wait_for_log("switched to TLS", "PSK identity alice")

    def test_wrong_key(self) -> None:
        """A wrong key fails the handshake, with a logged reason."""
        wrong = self.tmp / "wrong.psk"
        make_psk_file(wrong)
        refused = run_tool([require_tool("nbdinfo"), self.uri(wrong)], check=False)
        self.assertNotEqual(refused.returncode, 0)
        self.server.wait_for_log("TLS handshake with", "failed")

    def test_unknown_user(self) -> None:
        """An identity the file does not know is refused like a wrong key."""
        other = self.tmp / "bob.psk"
        make_psk_file(other, {"bob": os.urandom(32)})
        refused = run_tool([require_tool("nbdinfo"), self.uri(other, "bob")], check=False)
        self.assertNotEqual(refused.returncode, 0)
        self.server.wait_for_log("TLS handshake with", "failed")

    def test_qemu_img(self) -> None:
        """qemu-img with tls-creds-psk (which reads DIR/keys.psk) reads and writes."""
        qemu_img = require_tool("qemu-img")
        creds = f"tls-creds-psk,id=tls0,endpoint=client,dir={self.tmp},username=alice"
        target = f"driver=nbd,host={LOOPBACK},port={self.server.port},tls-creds=tls0"
        source = make_image(self.tmp / "source.img", 4 * MiB, os.urandom(4 * MiB))
        run_tool(
            [qemu_img, "convert", "-n", "--object", creds, "-f", "raw", str(source),
             "--target-image-opts", target],
            timeout=120,
        )  # fmt: skip
        back = self.tmp / "back.img"
        run_tool(
            [qemu_img, "convert", "--object", creds, "--image-opts", target, "-O", "raw",
             str(back)],
            timeout=120,
        )  # fmt: skip
        self.assertEqual(back.read_bytes()[: 4 * MiB], source.read_bytes())


class BadTLSClientTests(SynchronousTestCase):
    """Clients that misbehave around STARTTLS (S-06, S-07)."""

    def setUp(self) -> None:
        self.tmp = make_tempdir(self)
        self.certs = make_certificates(self.tmp / "pki")
        self.server = start_server(
            self, "--memory", "1M", "--tls", "require", "--tls-certificates", str(self.certs)
        )

    def starttls(self) -> socket.socket:
        sock = socket.create_connection((LOOPBACK, self.server.port), timeout=15)
        self.addCleanup(sock.close)
        greeting = _recv(sock, 18)
        self.assertEqual(greeting[:8], b"NBDMAGIC")
        sock.sendall(struct.pack(">I", 3))
        sock.sendall(struct.pack(">QII", 0x49484156454F5054, NBD_OPT_STARTTLS, 0))
        magic, option, reply, length = struct.unpack(">QIII", _recv(sock, 20))
        self.assertEqual((option, reply, length), (NBD_OPT_STARTTLS, NBD_REP_ACK, 0))
        return sock

    def test_garbage_instead_of_client_hello(self) -> None:
        """Bytes that are not a TLS ClientHello end the connection, with a logged reason."""
        sock = self.starttls()
        sock.sendall(b"GET / HTTP/1.0\r\n\r\n" + os.urandom(200))
        # The server closes (a TLS alert may come first); the socket's timeout
        # fails the test if it does not.
        _read_to_end(sock)
        self.server.wait_for_log("TLS handshake with", "failed")

    def test_vanishing_mid_handshake(self) -> None:
        """A client that sends half a ClientHello and goes away costs nothing."""
        sock = self.starttls()
        # The first bytes of a TLS 1.2 ClientHello record, then nothing.
        sock.sendall(bytes.fromhex("16030100c8010000c40303"))
        sock.close()
        self.server.wait_for_log("TLS handshake with", "failed")
        # The server still serves.
        done = run_tool([require_tool("nbdinfo"), "--size", nbds(self.server, self.certs)])
        self.assertEqual(done.stdout.strip(), str(MiB))

    def test_vanishing_mid_transfer(self) -> None:
        """
        A TLS client that pipelines 1 MiB READs and vanishes without reading
        the replies costs nothing afterwards: the server does not spin
        (nbd-server did, its issue 173) and goes on serving.
        """
        script = VANISH_SCRIPT
        out = run_libnbd(script, nbds(self.server, self.certs))
        self.assertEqual(out, "sent")
        # Its CPU time must come to rest: a server spinning on the dead
        # connection would use a whole core in every window.
        self.assertTrue(_comes_to_rest(self.server.pid), "the server kept using CPU")
        done = run_tool([require_tool("nbdinfo"), "--size", nbds(self.server, self.certs)])
        self.assertEqual(done.stdout.strip(), str(MiB))

    def test_tls_failures_free_their_slots(self) -> None:
        """
        Every failed TLS handshake gives its connection slot back (nbd-server
        leaked them, its issue 126): behind --max-connections 2, five failed
        handshakes in a row still leave room for a good client.
        """
        self.server = start_server(
            self, "--memory", "1M", "--tls", "require", "--tls-certificates", str(self.certs),
            "--max-connections", "2", "--max-negotiating", "2",
        )  # fmt: skip
        for _ in range(5):
            sock = self.starttls()
            sock.sendall(os.urandom(64))
            _read_to_end(sock)
            sock.close()
        done = run_tool([require_tool("nbdinfo"), "--size", nbds(self.server, self.certs)])
        self.assertEqual(done.stdout.strip(), str(MiB))

    def test_options_before_starttls(self) -> None:
        """S-03 from a raw client: LIST before STARTTLS gets ERR_TLS_REQD."""
        sock = socket.create_connection((LOOPBACK, self.server.port), timeout=15)
        self.addCleanup(sock.close)
        _recv(sock, 18)
        sock.sendall(struct.pack(">I", 3))
        sock.sendall(struct.pack(">QII", 0x49484156454F5054, 3, 0))
        _, option, reply, length = struct.unpack(">QIII", _recv(sock, 20))
        self.assertEqual((option, reply), (3, NBD_REP_ERR_TLS_REQD))


#: Queues 256 4 KiB WRITEs of distinct blocks, waits for them, then 256
#: READs of the same blocks in another order, and checks every block.
PIPELINE_SCRIPT = """
import json, sys
import nbd
h = nbd.NBD()
h.set_uri_allow_local_file(True)
h.connect_uri(sys.argv[1])
blocks = [bytes([i % 251]) * 4096 for i in range(256)]
def wait(cookies):
    for cookie in cookies:
        while not h.aio_command_completed(cookie):
            h.poll(-1)
writes = [h.aio_pwrite(blocks[i], i * 4096) for i in range(256)]
wait(writes)
order = [(i * 97) % 256 for i in range(256)]
buffers = {i: nbd.Buffer(4096) for i in order}
reads = [h.aio_pread(buffers[i], i * 4096) for i in order]
wait(reads)
wrong = sum(buffers[i].to_bytearray() != bytearray(blocks[i]) for i in order)
h.shutdown()
print(json.dumps({"written": len(writes), "read_back": len(reads), "wrong": wrong}))
"""

#: Connects over TLS, queues 64 one-MiB READs (the export wraps around), and
#: exits at once without reading a reply or closing TLS.
VANISH_SCRIPT = """
import json, os, sys
import nbd
h = nbd.NBD()
h.set_uri_allow_local_file(True)
h.connect_uri(sys.argv[1])
size = h.get_size()
for i in range(64):
    h.aio_pread(nbd.Buffer(1 << 20), (i << 20) % size)
print(json.dumps("sent"), flush=True)
os._exit(0)
"""


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _comes_to_rest(pid: int, window: float = 0.5, attempts: int = 20) -> bool:
    """Whether process C{pid} has a window of C{window} s using under a fifth of a core."""
    import time

    for _ in range(attempts):
        before = _cpu_seconds(pid)
        time.sleep(window)
        if _cpu_seconds(pid) - before < window / 5:
            return True
    return False


def _recv(sock: socket.socket, count: int) -> bytes:
    data = b""
    while len(data) < count:
        chunk = sock.recv(count - len(data))
        if not chunk:
            raise ConnectionError("closed")
        data += chunk
    return data


def _read_to_end(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes (it must close: the socket times out)."""
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except ConnectionResetError:
        pass
    return data


class _PeerMixin:
    """The twisted-nbd client against another server with TLS."""

    server: NBDServer

    def command(self, workdir: Path, certs: Path) -> Callable[[int], list[str]]:
        raise NotImplementedError

    def setUp(self) -> None:
        case: Any = self
        workdir = make_tempdir(case)
        self.certs = make_certificates(workdir / "pki")
        self.server = NBDServer([], workdir, command=self.command(workdir, self.certs))
        case.addCleanup(self.server.stop)
        self.server.start()

    def settings(self) -> TLSClientSettings:
        return TLSClientSettings.from_directory(str(self.certs), hostname=LOOPBACK)

    async def test_read_write(self) -> None:
        """The handshake goes through STARTTLS; I/O works over TLS."""
        case: Any = self
        client = await connect(reactor, self.server.endpoint, tls=self.settings())
        data = os.urandom(256 * 1024)
        await client.write(MiB, data)
        case.assertEqual(await client.read(MiB, len(data)), data)
        await client.disconnect()

    async def test_plaintext_refused(self) -> None:
        """Without TLS, the server's TLS requirement stops the handshake."""
        case: Any = self
        try:
            await connect(reactor, self.server.endpoint)
        except NBDHandshakeError as e:
            case.assertEqual(e.reply, NBD_REP_ERR_TLS_REQD)
        else:
            case.fail("the handshake succeeded without TLS")

    async def test_list_over_tls(self) -> None:
        """NBD_OPT_LIST works after STARTTLS."""
        case: Any = self
        exports = await list_exports(reactor, self.server.endpoint, tls=self.settings())
        case.assertTrue(exports)


def nbdkit_tls(tls_option: str) -> Callable[[int], list[str]]:
    """nbdkit's memory plugin requiring TLS with C{tls_option} (certificates or PSK)."""
    nbdkit = require_tool("nbdkit")
    return lambda port: [
        nbdkit, "-f", "--exit-with-parent", "-p", str(port), "-i", LOOPBACK,
        "--tls=require", tls_option, "memory", "16M",
    ]  # fmt: skip


def qemu_nbd_tls(workdir: Path, creds: str) -> Callable[[int], list[str]]:
    """qemu-nbd serving a 16 MiB image with the tls-creds object C{creds} (id tls0)."""
    qemu_nbd = require_tool("qemu-nbd")
    image = make_image(workdir / "disk.img", 16 * MiB)
    return lambda port: [
        qemu_nbd, "--persistent", "--shared=4", "-f", "raw", "-b", LOOPBACK, "-p", str(port),
        "--object", creds, "--tls-creds", "tls0", "-x", "", str(image),
    ]  # fmt: skip


class NbdkitTLSTests(_PeerMixin, TestCase):
    """nbdkit --tls=require with the same certificates directory."""

    timeout = 120

    def command(self, workdir: Path, certs: Path) -> Callable[[int], list[str]]:
        return nbdkit_tls(f"--tls-certificates={certs}")


class QemuNbdTLSTests(_PeerMixin, TestCase):
    """qemu-nbd with a tls-creds-x509 object."""

    timeout = 120

    def command(self, workdir: Path, certs: Path) -> Callable[[int], list[str]]:
        return qemu_nbd_tls(
            workdir, f"tls-creds-x509,id=tls0,endpoint=server,dir={certs},verify-peer=no"
        )


class OwnServerTLSTests(_PeerMixin, TestCase):
    """Our own server, so client and server agree with each other too."""

    timeout = 120

    def command(self, workdir: Path, certs: Path) -> Callable[[int], list[str]]:
        server = NBDServer(
            ["--memory", "16M", "--tls", "require", "--tls-certificates", str(certs)], workdir
        )
        return server.command


class _PSKPeerMixin(_PeerMixin):
    """The twisted-nbd client with a pre-shared key against another server."""

    def setUp(self) -> None:
        case: Any = self
        workdir = make_tempdir(case)
        self.keys = workdir / "keys.psk"
        make_psk_file(self.keys)
        self.certs = workdir
        self.server = NBDServer([], workdir, command=self.command(workdir, self.keys))
        case.addCleanup(self.server.stop)
        self.server.start()

    def settings(self) -> TLSClientSettings:
        return TLSClientSettings.from_psk_file(str(self.keys), "alice")


class NbdkitPSKTests(_PSKPeerMixin, TestCase):
    """nbdkit --tls=require --tls-psk=FILE."""

    timeout = 120

    def command(self, workdir: Path, keys: Path) -> Callable[[int], list[str]]:
        return nbdkit_tls(f"--tls-psk={keys}")


class QemuNbdPSKTests(_PSKPeerMixin, TestCase):
    """qemu-nbd with a tls-creds-psk object (it reads DIR/keys.psk)."""

    timeout = 120

    def command(self, workdir: Path, keys: Path) -> Callable[[int], list[str]]:
        return qemu_nbd_tls(workdir, f"tls-creds-psk,id=tls0,endpoint=server,dir={workdir}")


class OwnServerPSKTests(_PSKPeerMixin, TestCase):
    """Our own server with --tls-psk."""

    timeout = 120

    def command(self, workdir: Path, keys: Path) -> Callable[[int], list[str]]:
        return NBDServer(
            ["--memory", "16M", "--tls", "require", "--tls-psk", str(keys)], workdir
        ).command
