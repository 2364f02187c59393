# -*- test-case-name: tests.test_tap -*-
"""
The C{twistd nbd} application: command-line options, and the glue that
hands them to L{twisted_nbd.service.build}.

C{twistd -n nbd --memory 1G} or C{twistd -n nbd --image disk.img} parse
L{Options} into a L{Config}; L{makeService} builds the service tree from
it. C{--backend NAME:key=value,...} names any backend and C{--filter
NAME:key=value,...} (repeatable, the first outermost) stacks filters, both
looked up in L{twisted_nbd.registry}. Every mistake on the command line,
including an image that cannot be opened, is found while parsing (by
L{ExportSpec}, the one validator of exports) and raised as
L{usage.UsageError}, which twistd prints as one line
instead of a traceback.

The reactor is never imported at module level: twistd installs the reactor
the user chose after importing plugins, and L{makeService} takes a reactor
for tests and for embedding.
"""

from __future__ import annotations

import os
import sys
from dataclasses import replace
from typing import Any, cast

from twisted.application.service import MultiService
from twisted.internet import endpoints
from twisted.python import usage

from twisted_nbd import service
from twisted_nbd._process import tune_allocator
from twisted_nbd.config import (
    DEFAULT_LISTEN,
    MAX_SIZE,
    Config,
    ConfigError,
    ExportSpec,
    SpecError,
    absolute_paths,
    load_config,
    parse_size,
    with_backend,
)
from twisted_nbd.limits import (
    DEFAULT_HANDSHAKE_TIMEOUT,
    DEFAULT_MAX_CONNECTIONS,
    DEFAULT_MAX_NEGOTIATING,
    Limits,
    parse_network,
)
from twisted_nbd.registry import PluginError, PluginRef, describe, parse_ref, registry
from twisted_nbd.tls import TLS_MODES, TLSError, TLSSettings

__all__ = [
    "DEFAULT_LISTEN",
    "MAX_SIZE",
    "Options",
    "makeService",
    "parse_size",
]

_EXAMPLES = """
Endpoints for --listen (quote them in a shell):
  tcp:10809                          every IPv4 interface, port 10809
  tcp:10809:interface=127.0.0.1      loopback only
  tcp6:10809:interface=\\:\\:          every IPv6 (and usually IPv4) interface
  unix:/run/nbd.sock                 a Unix socket (nbd+unix:///?socket=/run/nbd.sock)
  systemd:domain=INET6:index=0       a socket passed by systemd socket activation

Examples:
  twistd -n nbd --memory 1G
  twistd -n nbd --backend pattern:size=1G --filter delay:delay=5ms,ops=read
  twistd -n nbd --image base.img --filter cow --filter stats
  twistd -n nbd --memory 1G --filter error:rate=0.01,ops=read+write,errno=EIO
  twistd nbd --filter cow:help
  twistd -n nbd --image disk.img --size 10G --name disk
  twistd -n nbd --image /dev/vg0/vm1 --read-only --listen tcp:10809:interface=127.0.0.1
  twistd -n nbd --image disk.img --allow 192.0.2.0/24 --allow 2001:db8::/32 --idle-timeout 600
  nbdinfo nbd://127.0.0.1
  qemu-img info nbd://127.0.0.1:10809
"""


def _check_endpoint(description: str) -> None:
    """
    Parse C{description} as a server endpoint without listening on it.

    Parsers keep the reactor they are given and only use it in C{listen},
    so none is needed here; the service built by L{makeService} parses the
    string again with the real reactor.

    @raise usage.UsageError: the description cannot be parsed.
    """
    try:
        endpoints.serverFromString(cast(Any, None), description)
    except Exception as e:
        reason = " ".join(str(e).split()) or type(e).__name__
        raise usage.UsageError(
            f"--listen {description!r} is not a server endpoint ({reason}); "
            "try tcp:10809, tcp6:10809:interface=\\:\\:1 or unix:/run/nbd.sock"
        ) from None


#: Options that describe a single export, which --config replaces.
_SINGLE_EXPORT_OPTIONS = (
    "image",
    "memory",
    "size",
    "name",
    "description",
    "read-only",
    "min-block",
    "preferred-block",
    "max-block",
    "backend",
    "filter",
)


#: The option to name in a message about each setting of an export.
_SPEC_OPTIONS = {
    "name": "--name:",
    "description": "--description:",
    "block sizes": "--min-block/--preferred-block/--max-block:",
    "image": "--image",
    "backend": "--backend:",
    "filters": "--filter:",
}


class Options(usage.Options):
    """
    The options of C{twistd nbd}.

    After parsing, C{self.config} is the L{Config} to serve (from
    C{--config}, or one export built from the other options),
    C{self["max-queue-depth"]} and C{self["max-bytes-in-flight"]} are
    C{int}s, and C{self["listen"]} is a non-empty list of endpoint
    descriptions. For a single export, C{self["size"]} and
    C{self["memory"]} are C{int}s or C{None} and C{self["image"]} is an
    absolute path or C{None}.
    """

    config: Config

    longdesc = (
        "Serve block devices over the Network Block Device protocol (NBD): an image "
        "file or block device (--image) or a RAM disk (--memory), or several exports "
        "described in a TOML file (--config). Clients asking for the "
        "empty export name get the default export. SIZE is a number of "
        "bytes with an optional K, M, G, T or P suffix (or KiB, MiB, ...), all powers of "
        "1024: 512, 64K, 512M, 1G, 2T. --listen takes a Twisted server endpoint string "
        "and may be repeated. --allow, --max-connections, --max-negotiating, "
        "--handshake-timeout and --idle-timeout limit who may connect, how many at once and "
        "for how long (Unix-socket clients are always allowed)."
    )

    optFlags = [
        ["read-only", "r", "Serve the device read-only: every write is refused with EPERM."],
        [
            "verbose",
            "v",
            "Log every request (command, offset, length, errno, time): for debugging, it slows"
            " the server down.",
        ],
        [
            "tls-verify-peer",
            None,
            "With TLS, require a client certificate signed by --tls-ca.",
        ],
        [
            "print-uri",
            None,
            "Print the NBD URI of the default export on the first listener to standard "
            "output once it listens.",
        ],
    ]

    optParameters = [
        [
            "run",
            None,
            None,
            "Captive mode: serve on a private Unix socket, run COMMAND through the shell "
            "with $uri, $nbd, $unixsocket and $exportname set, and exit with its status "
            "when it ends.",
        ],
        [
            "takeover",
            None,
            None,
            "Live restart through the Unix socket at PATH: take the listeners and the "
            "connections over from the server listening there, if any, then listen there "
            "for the next one (see docs/restart.md).",
        ],
        [
            "image",
            "i",
            None,
            "Serve the file or block device at PATH. It must exist unless --size is given.",
        ],
        [
            "size",
            "s",
            None,
            "With --image, create PATH as a sparse file of SIZE bytes if it does not exist "
            "(an existing PATH must already have this size).",
        ],
        ["memory", "m", None, "Serve a sparse RAM disk of SIZE bytes instead of an image."],
        ["name", None, None, "The export's name [default: empty]."],
        ["description", None, None, "A description of the export, shown by nbdinfo."],
        [
            "config",
            "c",
            None,
            "Serve the exports described in this TOML file instead (see docs/usage.md); "
            "it cannot be combined with the single-export options.",
        ],
        [
            "min-block",
            None,
            None,
            "Minimum block SIZE clients must align to: a power of two up to 64K [default: 1].",
        ],
        [
            "preferred-block",
            None,
            None,
            "Preferred block SIZE advertised to clients, a power of two [default: 4K].",
        ],
        [
            "max-block",
            None,
            None,
            "Largest payload of one READ or WRITE [default: 32M].",
        ],
        [
            "max-queue-depth",
            None,
            "64",
            "Stop reading a connection's requests while this many are in flight (at least 1).",
        ],
        [
            "shutdown-timeout",
            None,
            "10",
            "On stop, give requests in flight this many SECONDS to finish before "
            "dropping their connections.",
        ],
        [
            "max-bytes-in-flight",
            None,
            "8M",
            "Stop reading a connection's requests while their payloads in flight reach SIZE.",
        ],
        [
            "poll-max",
            None,
            "100",
            "Busy-poll a connection for its client's next request for up to this many "
            "MICROSECONDS when the client answers that fast (0: never).",
        ],
        [
            "tls",
            None,
            None,
            "TLS (STARTTLS): off; on (offered, plaintext allowed); require (nothing "
            "but STARTTLS before TLS) [default: on when certificates or a PSK file "
            "are given, else off].",
        ],
        [
            "tls-certificates",
            None,
            None,
            "DIR holding server-cert.pem, server-key.pem and ca-cert.pem (the layout "
            "nbdkit, qemu and libnbd share).",
        ],
        ["tls-cert", None, None, "The server's certificate chain (PEM FILE)."],
        ["tls-key", None, None, "The server's private key (PEM FILE)."],
        ["tls-ca", None, None, "CA certificates (PEM FILE) that sign client certificates."],
        [
            "tls-psk",
            None,
            None,
            "Use pre-shared keys from FILE (username:hexkey lines, as psktool writes) "
            "instead of certificates.",
        ],
        [
            "workers",
            "w",
            "1",
            "Serve connections from N processes, each on its own core; this one then only "
            "accepts and hands them out.",
        ],
        # The limits default to None here so that a [limits] table in --config
        # applies unless the command line says otherwise.
        [
            "handshake-timeout",
            None,
            None,
            "Drop a client that has not chosen an export (TLS included) this many SECONDS "
            f"after connecting; 0: never [default: {DEFAULT_HANDSHAKE_TIMEOUT:g}].",
        ],
        [
            "idle-timeout",
            None,
            None,
            "Close a connection that has had no request in flight and sent nothing for "
            "this many SECONDS; 0: never [default: 0].",
        ],
        [
            "max-connections",
            None,
            None,
            "Refuse new connections (closed before the greeting) while N are open; 0: no cap "
            f"[default: {DEFAULT_MAX_CONNECTIONS}].",
        ],
        [
            "max-negotiating",
            None,
            None,
            "Refuse new connections while N are still negotiating; 0: no cap "
            f"[default: {DEFAULT_MAX_NEGOTIATING}].",
        ],
        # Operations (twisted_nbd.ops): see docs/metrics.md and docs/admin-api.md.
        [
            "metrics",
            None,
            None,
            "Serve Prometheus metrics (/metrics), /health and /ready over HTTP on this "
            "ENDPOINT, e.g. tcp:9100:interface=127.0.0.1.",
        ],
        [
            "admin",
            None,
            None,
            "Serve the JSON admin API (exports, connections, reload) over HTTP on this "
            "loopback or unix ENDPOINT, e.g. unix:/run/nbd-admin.sock [default: off].",
        ],
        [
            "admin-token",
            None,
            None,
            "Require 'Authorization: Bearer TOKEN' on the admin API, TOKEN being the first "
            "line of FILE [default: $TWISTED_NBD_ADMIN_TOKEN if set, else no token].",
        ],
    ]

    compData = usage.Completions(optActions={"image": usage.CompleteFiles()})

    def __init__(self) -> None:
        usage.Options.__init__(self)
        self["listen"] = []
        self["tls-allow-dn"] = []
        self["allow"] = []
        self["backend"] = None
        self["filter"] = []

    def opt_tls_allow_dn(self, pattern: str) -> None:
        """
        With --tls-verify-peer, allow only clients whose certificate's subject
        DN (RFC 4514, e.g. CN=alice,O=Example) matches this shell-style
        PATTERN; repeat for more.
        """
        self["tls-allow-dn"].append(pattern)

    def _ref(self, text: str, kind: str) -> PluginRef:
        """
        Parse C{NAME:key=value,...}; C{NAME:help} prints the keys and exits.

        @raise usage.UsageError: it is not written that way, or names nothing.
        """
        try:
            ref = parse_ref(text, kind)
            plugin = registry.get(kind, ref.name)
        except PluginError as e:
            raise usage.UsageError(f"--{kind}: {e}") from None
        if ("help", "") in ref.args:
            print(describe(plugin, kind))
            sys.exit(0)
        return ref

    def opt_backend(self, text: str) -> None:
        """Serve a backend by name: NAME:key=value,... (NAME:help lists its keys)."""
        ref = self._ref(text, "backend")
        if self["backend"] is not None:
            raise usage.UsageError("--backend is given twice: an export has one backend")
        self["backend"] = ref

    opt_b = opt_backend

    def opt_filter(self, text: str) -> None:
        """Stack a filter: NAME:key=value,...; repeatable, the first outermost."""
        self["filter"].append(self._ref(text, "filter"))

    def opt_listen(self, description: str) -> None:
        """Listen on this Twisted server endpoint; repeat for more. [default: tcp:10809]"""
        self["listen"].append(description)

    opt_l = opt_listen

    def opt_allow(self, network: str) -> None:
        """Accept TCP clients only from this IPv4/IPv6 network (CIDR); repeatable. [default: all]"""
        try:
            parse_network(network)
        except ValueError as e:
            raise usage.UsageError(f"--allow: {e}") from None
        self["allow"].append(network)

    def getUsage(self, width: int | None = None) -> str:
        """
        The usage text, followed by examples kept as they are written
        (Twisted rewraps C{longdesc} into one paragraph).
        """
        return usage.Options.getUsage(self, width) + _plugins_help() + _EXAMPLES

    def postOptions(self) -> None:
        """
        Check the options together, convert sizes and numbers, and make sure
        every image can be opened (or created).

        @raise usage.UsageError: with a one-line explanation.
        """
        self["max-bytes-in-flight"] = self._size("max-bytes-in-flight")
        self["max-queue-depth"] = self._count("max-queue-depth")
        self["workers"] = self._count("workers")
        try:
            self["poll-max"] = float(self["poll-max"]) / 1e6
        except ValueError:
            raise usage.UsageError(
                f"--poll-max: {self['poll-max']!r} is not a number of microseconds"
            ) from None
        if not 0 <= self["poll-max"] <= 0.01:
            raise usage.UsageError("--poll-max must be from 0 to 10000 microseconds")
        try:
            self["shutdown-timeout"] = float(self["shutdown-timeout"])
        except ValueError:
            raise usage.UsageError(
                f"--shutdown-timeout: {self['shutdown-timeout']!r} is not a number of seconds"
            ) from None
        if not 0 <= self["shutdown-timeout"] < float("inf"):
            raise usage.UsageError("--shutdown-timeout must be zero or more seconds")
        if self["config"] is not None:
            self.config = self._from_file(self["config"])
        else:
            self.config = self._from_options()

        if self["run"] is not None:
            # Captive mode: the private socket first ($uri names the first listener).
            from twisted_nbd.captive import private_socket

            self["listen"] = [f"unix:{private_socket()}", *self["listen"]]
        if not self["listen"]:
            self["listen"] = [DEFAULT_LISTEN]
        seen: set[str] = set()
        for description in self["listen"]:
            if description in seen:
                raise usage.UsageError(f"--listen {description!r} is given twice")
            seen.add(description)
            _check_endpoint(description)
        self.config = replace(
            self.config,
            tls=self._tls(),
            listen=tuple(self["listen"]),
            max_queue_depth=self["max-queue-depth"],
            max_bytes_in_flight=self["max-bytes-in-flight"],
            shutdown_timeout=self["shutdown-timeout"],
            workers=self["workers"],
            poll_max=self["poll-max"],
            limits=self._limits(self.config.limits),
            verbose=bool(self["verbose"]),
        )
        self._ops()
        if self.config.workers > 1:
            from twisted_nbd.workers import check_workers

            try:
                check_workers(self.config)
            except ConfigError as e:
                raise usage.UsageError(f"--workers: {e}") from None

    def _ops(self) -> None:
        """Check --metrics, --admin and --admin-token; read the token."""
        from twisted_nbd.admin import check_admin_endpoint, read_token

        for option in ("metrics", "admin"):
            if self[option] is not None:
                try:
                    endpoints.serverFromString(cast(Any, None), self[option])
                except Exception as e:
                    raise usage.UsageError(
                        f"--{option} {self[option]!r} is not a server endpoint ({e})"
                    ) from None
        if self["admin"] is None:
            if self["admin-token"] is not None:
                raise usage.UsageError("--admin-token needs --admin")
            return
        try:
            check_admin_endpoint(self["admin"])
            self["admin-token-value"] = read_token(self["admin-token"])
        except ValueError as e:
            raise usage.UsageError(f"--admin: {e}") from None

    def _tls(self) -> TLSSettings:
        """The TLS settings the --tls options describe, checked."""
        given = [
            o
            for o in ("tls-cert", "tls-key", "tls-ca", "tls-certificates", "tls-psk")
            if self[o] is not None
        ]
        mode = self["tls"]
        if mode is None:
            mode = "on" if given else "off"
        if mode not in TLS_MODES:
            raise usage.UsageError(f"--tls must be one of {', '.join(TLS_MODES)}, not {mode!r}")
        if mode == "off":
            stray = given + (["tls-verify-peer"] if self["tls-verify-peer"] else [])
            stray += ["tls-allow-dn"] if self["tls-allow-dn"] else []
            if stray:
                raise usage.UsageError(f"--{stray[0]} needs --tls on or --tls require")
            return TLSSettings()
        directory = self["tls-certificates"]
        if directory is not None:
            if not os.path.isdir(directory):
                raise usage.UsageError(f"--tls-certificates {directory!r} is not a directory")
            settings = TLSSettings.from_directory(os.path.abspath(directory), mode)
        else:
            settings = TLSSettings(mode=mode)
        settings = replace(
            settings,
            cert=self["tls-cert"] or settings.cert,
            key=self["tls-key"] or settings.key,
            ca=self["tls-ca"] or settings.ca,
            psk_file=self["tls-psk"],
            verify_peer=bool(self["tls-verify-peer"]),
            allow_dns=tuple(self["tls-allow-dn"]),
        )
        if settings.psk_file is not None and directory is None and self["tls-cert"] is None:
            settings = replace(settings, cert=None, key=None)
        try:
            settings.check()
        except TLSError as e:
            raise usage.UsageError(f"--tls: {e}") from None
        return settings

    def _limits(self, base: Limits) -> Limits:
        """
        C{base} (the config file's, or the defaults) with what the command
        line says instead.

        @raise usage.UsageError: a limit is not a number, or out of range.
        """
        changes: dict[str, object] = {}
        for option in ("handshake-timeout", "idle-timeout"):
            if self[option] is not None:
                try:
                    seconds = float(self[option])
                except ValueError:
                    raise usage.UsageError(
                        f"--{option}: {self[option]!r} is not a number of seconds"
                    ) from None
                if not 0 <= seconds < float("inf"):
                    raise usage.UsageError(f"--{option} must be zero (never) or more seconds")
                changes[option.replace("-", "_")] = self[option] = seconds
        for option in ("max-connections", "max-negotiating"):
            if self[option] is not None:
                changes[option.replace("-", "_")] = self[option] = self._count(option, minimum=0)
        if self["allow"]:
            changes["allow"] = tuple(self["allow"])
        try:
            return replace(base, **changes)  # type: ignore[arg-type]
        except ValueError as e:
            raise usage.UsageError(str(e)) from None

    def _from_file(self, path: str) -> Config:
        """Load C{--config}, which describes every export by itself."""
        single = [
            option for option in _SINGLE_EXPORT_OPTIONS if self[option] not in (None, False, [])
        ]
        if single:
            raise usage.UsageError(
                f"--config describes the exports; --{single[0]} belongs in its [[export]] tables"
            )
        try:
            return load_config(path)
        except ConfigError as e:
            raise usage.UsageError(str(e)) from None

    def _from_options(self) -> Config:
        """Build the one export the command line describes."""
        image, memory, backend = self["image"], self["memory"], self["backend"]
        if image is None and memory is None and backend is None:
            raise usage.UsageError(
                "nothing to serve: give --image PATH (an image file), --memory SIZE "
                "(a RAM disk), --backend NAME:key=value,... or --config FILE (several exports)"
            )
        given = [o for o, v in (("image", image), ("memory", memory), ("backend", backend)) if v]
        if len(given) > 1:
            raise usage.UsageError(f"--{given[0]} and --{given[1]} cannot be used together")
        if backend is not None and self["size"] is not None:
            raise usage.UsageError("--size only applies to --image; give the backend's own key")
        if memory is not None and self["size"] is not None:
            raise usage.UsageError("--size only applies to --image; --memory takes its own size")
        for option in ("size", "memory", "min-block", "preferred-block", "max-block"):
            self[option] = self._size(option)
        for option in ("name", "description"):
            if self[option] is None:
                self[option] = ""
        if image is not None:
            if image == "":
                raise usage.UsageError("--image needs a path")
            image = self["image"] = os.path.abspath(image)
        spec = ExportSpec(
            name=self["name"],
            description=self["description"],
            read_only=self["read-only"],
            image=image,
            size=self["size"],
            memory=self["memory"],
            min_block=self["min-block"],
            preferred_block=self["preferred-block"],
            max_block=self["max-block"],
            filters=tuple(absolute_paths("filter", ref, os.getcwd()) for ref in self["filter"]),
        )
        try:
            if backend is not None:
                spec = with_backend(spec, absolute_paths("backend", backend, os.getcwd()))
            spec.check(size_hint="add --size SIZE", read_only_hint="add --read-only")
        except SpecError as e:
            prefix = _SPEC_OPTIONS.get(e.setting)
            raise usage.UsageError(f"{prefix} {e}" if prefix else str(e)) from None
        return Config([spec], default=spec.name)

    def _size(self, option: str) -> int | None:
        """
        Parse the size given for C{option}, if any.

        @raise usage.UsageError: it is not a valid size.
        """
        value = self[option]
        if value is None or isinstance(value, int):
            return value
        try:
            return parse_size(value)
        except ValueError as e:
            raise usage.UsageError(f"--{option}: {e}") from None

    def _count(self, option: str, minimum: int = 1) -> int:
        """
        Parse the whole number (at least C{minimum}) given for C{option}.

        @raise usage.UsageError: it is not one.
        """
        value = self[option]
        if isinstance(value, int):
            number = value
        else:
            try:
                number = int(value.strip())
            except ValueError:
                raise usage.UsageError(f"--{option}: {value!r} is not a whole number") from None
        if number < minimum:
            raise usage.UsageError(f"--{option} must be at least {minimum}, not {number}")
        return number


def _plugins_help() -> str:
    """The backends and filters, one line each, for C{--help}."""
    lines = ["", "Backends (--backend NAME:key=value,...; NAME:help lists its keys):"]
    for plugin in registry.all("backend"):
        lines.append(f"  {plugin.name:<10} {plugin.help}")
    lines.append("Filters (--filter NAME:key=value,..., repeatable; the first is outermost):")
    for plugin in registry.all("filter"):
        lines.append(f"  {plugin.name:<10} {plugin.help}")
    return "\n".join(lines) + "\n"


def makeService(options: Options, reactor: Any = None) -> MultiService:
    """
    Build the service tree for parsed L{Options} (see
    L{twisted_nbd.service.build}, which does the work).

    @param reactor: the reactor to listen with and to deliver the thread
        pool's results to; the global reactor if C{None}.
    @raise OSError: an image could not be created or opened after all.
    @raise SystemExit: a filter does not fit the device below it (an
        offset past its end, say), which only shows once the device is
        open: twistd prints the one-line reason instead of a traceback.
    """
    tune_allocator()
    try:
        top = service.build(options.config, reactor)
    except PluginError as e:
        raise SystemExit(f"{os.path.basename(sys.argv[0]) or 'twistd'}: {e}") from None
    if options["run"] is not None or options["print-uri"] or options["takeover"] is not None:
        _operations(top, options, reactor)
    # --metrics, --admin, and the reload of --config on SIGHUP (twisted_nbd.ops).
    from twisted_nbd import ops

    if reactor is None:
        from twisted.internet import reactor as global_reactor

        reactor = global_reactor
    return cast(
        MultiService,
        ops.attach(
            top,
            options.config,
            reactor,
            metrics=options.get("metrics"),
            admin=options.get("admin"),
            token=options.get("admin-token-value"),
            config_path=options.get("config"),
        ),
    )


def _operations(top: MultiService, options: Options, reactor: Any) -> None:
    """Add the services of --takeover, --print-uri and --run to C{top}."""
    if reactor is None:
        from twisted.internet import reactor as global_reactor

        reactor = global_reactor
    config = options.config
    if options["takeover"] is not None:
        from twisted_nbd.restart import attach_takeover

        try:
            attach_takeover(top, config, options["takeover"], reactor)
        except ConfigError as e:
            raise SystemExit(f"{os.path.basename(sys.argv[0]) or 'twistd'}: {e}") from None
    from twisted_nbd.captive import attach

    name = config.default if config.default is not None else config.exports[0].name
    attach(top, reactor, name, config.tls, options["run"], options["print-uri"])
