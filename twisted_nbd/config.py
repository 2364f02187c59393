# -*- test-case-name: tests.test_config -*-
"""
What to serve: export specifications from the command line or from a TOML
file, checked before anything is opened.

A config file (C{twistd nbd --config exports.toml}) looks like this::

    default = "disk"            # what a client asking for the empty name gets

    [[export]]
    name = "disk"
    image = "disk.raw"          # relative to the config file's directory
    size = "10G"                # create a sparse image if it does not exist
    description = "the VM's system disk"

    [[export]]
    name = "scratch"
    memory = "1G"
    read-only = false
    min-block = 512             # block size constraints, sent in NBD_INFO_BLOCK_SIZE
    preferred-block = 4096
    max-block = "32M"

    [[export]]
    name = "test"
    backend = "pattern:size=1G" # any backend by name (or a table: {name = "pattern", size = "1G"})
    filters = ["cow", { name = "delay", delay = "10ms", ops = "read" }]   # outermost first

    [limits]                    # optional; the command line overrides each
    handshake-timeout = 10      # seconds to choose an export; 0 never
    idle-timeout = 0            # seconds idle in transmission before a close; 0 never
    max-connections = 1000      # 0: no cap
    max-negotiating = 100       # 0: no cap
    allow = ["127.0.0.0/8", "::1", "10.0.0.0/8"]   # where clients may come from

Every mistake is reported as L{ConfigError} naming the file, the line and
the reason.
"""

from __future__ import annotations

import os
import re
import stat
import tomllib
from dataclasses import dataclass, field, replace
from typing import Any

from twisted_nbd.exports import check_block_sizes, check_text
from twisted_nbd.interfaces import Capabilities
from twisted_nbd.limits import Limits
from twisted_nbd.registry import PATH, PluginError, PluginRef, parse_ref, registry
from twisted_nbd.tls import TLSError, TLSSettings

__all__ = [
    "DEFAULT_LISTEN",
    "DEFAULT_MAX_BYTES_IN_FLIGHT",
    "DEFAULT_MAX_QUEUE_DEPTH",
    "DEFAULT_SHUTDOWN_TIMEOUT",
    "MAX_SIZE",
    "Config",
    "ConfigError",
    "check_config",
    "ExportSpec",
    "SpecError",
    "check_image",
    "load_config",
    "parse_size",
    "with_backend",
]

#: Where the server listens when nothing else is said: the IANA NBD port.
DEFAULT_LISTEN = "tcp:10809"
#: Stop reading a connection's requests while this many are in flight.
DEFAULT_MAX_QUEUE_DEPTH = 64
#: ... or while their payloads and replies hold this many bytes. As much as
#: nbdcopy keeps in flight on one connection or more slows nothing down (the
#: benchmark), while four such connections stay under 128 MiB of RSS; a
#: single larger request is still taken (then nothing more until it is done).
DEFAULT_MAX_BYTES_IN_FLIGHT = 8 * 1024 * 1024
#: On stop, how long requests in flight get to finish.
DEFAULT_SHUTDOWN_TIMEOUT = 10.0

#: The longest a connection busy-polls for its client's next request (seconds).
DEFAULT_POLL_MAX = 100e-6

#: The largest size accepted: offsets are signed 64-bit numbers in most
#: clients (qemu, the Linux kernel), so nothing larger is usable.
MAX_SIZE = 2**63 - 1

_UNITS = {
    "": 1,
    "b": 1,
    "k": 1 << 10,
    "kib": 1 << 10,
    "m": 1 << 20,
    "mib": 1 << 20,
    "g": 1 << 30,
    "gib": 1 << 30,
    "t": 1 << 40,
    "tib": 1 << 40,
    "p": 1 << 50,
    "pib": 1 << 50,
}
_AMBIGUOUS_UNITS = frozenset({"kb", "mb", "gb", "tb", "pb"})
_SIZE = re.compile(r"([+-]?[0-9]+)\s*([a-z]*)")


class ConfigError(ValueError):
    """A configuration mistake; C{str()} is one line for the user."""


class SpecError(ValueError):
    """
    An export specification that cannot be served; C{str()} is one line
    for the user.

    @ivar setting: what is wrong: C{"name"}, C{"description"},
        C{"block sizes"}, C{"image"} or C{"export"} (the whole), so that the
        command line and the config file can point at the option or key.
    """

    def __init__(self, setting: str, reason: str) -> None:
        super().__init__(reason)
        self.setting = setting


def parse_size(text: str) -> int:
    """
    Parse a size such as C{512}, C{64K}, C{512M}, C{1G}, C{2T} or C{10GiB}.

    Suffixes are powers of 1024 and case-insensitive (C{k}, C{K} and C{KiB}
    are all 1024); C{KB}, C{MB}, ... are refused because they are read as
    powers of 1000 elsewhere.

    @return: the size in bytes, at least 1 and at most L{MAX_SIZE}.
    @raise ValueError: C{text} is not a size, or is zero, negative or too
        large; the message is one line meant for the user.
    """
    cleaned = text.strip().lower()
    match = _SIZE.fullmatch(cleaned)
    if match is None or (match.group(2) not in _UNITS and match.group(2) not in _AMBIGUOUS_UNITS):
        raise ValueError(
            f"{text!r} is not a size: write a number of bytes with an optional "
            "K, M, G, T or P suffix (powers of 1024), e.g. 512M or 1G"
        )
    number, unit = int(match.group(1)), match.group(2)
    if unit in _AMBIGUOUS_UNITS:
        plain = unit[0].upper()
        raise ValueError(
            f"{text!r} is ambiguous: write {number}{plain} or {number}{plain}iB (powers of 1024)"
        )
    if number <= 0:
        raise ValueError(f"{text!r} is not a usable size: it must be greater than zero")
    size = number * _UNITS[unit]
    if size > MAX_SIZE:
        raise ValueError(f"{text!r} is too large: the limit is {MAX_SIZE} bytes (8 EiB - 1)")
    return size


def check_image(path: str, read_only: bool) -> int | None:
    """
    Check that the server will be able to open C{path} the way it needs.

    @return: the size of the existing file or block device, or C{None} if
        nothing exists at C{path}.
    @raise ValueError: C{path} exists but cannot be served; the message
        says why in one line.
    """
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return None
    except OSError as e:
        raise ValueError(f"{path}: {e.strerror}") from None
    if stat.S_ISDIR(mode):
        raise ValueError(f"{path} is a directory, not an image file")
    if not (stat.S_ISREG(mode) or stat.S_ISBLK(mode)):
        raise ValueError(f"{path} is neither a regular file nor a block device")
    flags = (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC
    try:
        fd = os.open(path, flags)
    except OSError as e:
        if read_only:
            raise ValueError(f"{path} cannot be read: {e.strerror}") from None
        raise ValueError(
            f"{path} cannot be opened for writing: {e.strerror} (serve it read-only instead)"
        ) from None
    try:
        if stat.S_ISBLK(mode):
            return os.lseek(fd, 0, os.SEEK_END)
        return os.fstat(fd).st_size
    except OSError as e:
        raise ValueError(f"{path}: cannot find its size: {e.strerror}") from None
    finally:
        os.close(fd)


@dataclass(frozen=True)
class ExportSpec:
    """
    One export to serve, checked but not yet opened.

    @ivar image: the absolute path of an image file or block device, or
        C{None} for a memory export.
    @ivar size: with C{image}, create a sparse image of this size if none
        exists; otherwise C{None}.
    @ivar memory: the size of a memory export, or C{None}.
    @ivar backend_ref: any other backend, by name with its keys (see
        L{twisted_nbd.registry}), or C{None}. The C{file} and C{memory}
        backends are always given as C{image} and C{memory} instead (see
        L{with_backend}), which worker processes know how to share.
    @ivar filters: the filters around the backend, outermost (nearest the
        client) first, as nbdkit stacks them.
    @ivar tls_required: only clients that have switched to TLS see it.
    @ivar tls_allow_dn: if not empty, only clients whose certificate's
        subject DN matches one of these patterns see it.
    """

    name: str = ""
    description: str = ""
    read_only: bool = False
    image: str | None = None
    size: int | None = None
    memory: int | None = None
    min_block: int | None = None
    preferred_block: int | None = None
    max_block: int | None = None
    backend_ref: PluginRef | None = None
    filters: tuple[PluginRef, ...] = ()
    tls_required: bool = False
    tls_allow_dn: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        # JSON (the workers' settings) turns tuples into lists.
        allow: Any = self.tls_allow_dn
        if not isinstance(allow, tuple):
            object.__setattr__(self, "tls_allow_dn", tuple(allow))

    @property
    def backend(self) -> str:
        """The name of the backend that serves this export (see L{twisted_nbd.backends})."""
        if self.backend_ref is not None:
            return self.backend_ref.name
        return "memory" if self.memory is not None else "file"

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ExportSpec:
        """The specification C{dataclasses.asdict} turned into C{data} (sent as JSON)."""
        fields = dict(data)
        if fields.get("backend_ref") is not None:
            fields["backend_ref"] = PluginRef.from_json(fields["backend_ref"])
        fields["filters"] = tuple(PluginRef.from_json(f) for f in fields.get("filters", ()))
        return cls(**fields)

    def check(
        self, size_hint: str = "give a size", read_only_hint: str = "serve it read-only"
    ) -> None:
        """
        Check the specification as a whole, and that its image can be
        opened (or created). This is the one validator of what users
        write; the command line and the config file both call it.

        @param size_hint: how the user asks for a new image to be created,
            for messages.
        @param read_only_hint: how the user asks for read-only, likewise.
        @raise SpecError: with a one-line reason and the setting at fault.
        """
        for setting in ("name", "description"):
            try:
                check_text(f"the {setting}", getattr(self, setting))
            except ValueError as e:
                raise SpecError(setting, str(e)) from None
        given = [x for x in (self.image, self.memory, self.backend_ref) if x is not None]
        if len(given) != 1:
            raise SpecError("export", "give exactly one of an image, a memory size and a backend")
        if self.backend_ref is not None:
            try:
                registry.resolve("backend", self.backend_ref)
            except PluginError as e:
                raise SpecError("backend", str(e)) from None
        try:
            registry.split(self.filters)
        except PluginError as e:
            raise SpecError("filters", str(e)) from None
        if self.memory is not None and self.size is not None:
            raise SpecError(
                "export", "a size only applies to an image; a memory export has its own"
            )
        try:
            self.check_block_sizes()
        except ValueError as e:
            raise SpecError("block sizes", str(e)) from None
        try:
            self.check_image(size_hint, read_only_hint)
        except ValueError as e:
            raise SpecError("image", str(e)) from None

    def check_block_sizes(self) -> None:
        """
        Check the block size settings against the protocol's rules.

        @raise ValueError: with a one-line reason.
        """
        defaults = Capabilities()
        check_block_sizes(
            self.min_block or defaults.min_block,
            self.preferred_block or max(defaults.preferred_block, self.min_block or 1),
            self.max_block or defaults.max_block,
        )

    def check_image(
        self, size_hint: str = "give a size", read_only_hint: str = "serve it read-only"
    ) -> None:
        """
        Check that the image, if any, can be opened, or created when a size
        is given.

        @raise ValueError: with a one-line reason.
        """
        if self.image is None:
            return
        try:
            existing = check_image(self.image, self.read_only)
        except ValueError as e:
            raise ValueError(str(e).replace("serve it read-only", read_only_hint)) from None
        if existing is None and self.size is None:
            raise ValueError(f"{self.image} does not exist ({size_hint} to create a sparse image)")
        if existing is None:
            parent = os.path.dirname(self.image)
            if not os.path.isdir(parent):
                raise ValueError(f"{self.image} cannot be created: {parent} is not a directory")
            if not os.access(parent, os.W_OK | os.X_OK):
                raise ValueError(f"{self.image} cannot be created: {parent} is not writable")
        elif self.size is not None and self.size != existing:
            raise ValueError(
                f"{self.image} already exists with {existing} bytes, not {self.size} "
                "(leave the size out to serve it as it is)"
            )


@dataclass(frozen=True)
class Config:
    """
    Everything a server needs to be built (see L{twisted_nbd.service.build}):
    what to serve, where, and its limits.

    @ivar exports: the exports.
    @ivar default: the name of the export a client asking for the empty
        name gets, or C{None} (then the only export, if there is one).
    @ivar listen: the server endpoint descriptions to listen on.
    @ivar max_queue_depth: stop reading a connection's requests while this
        many are in flight.
    @ivar max_bytes_in_flight: ... or while they hold this many bytes.
    @ivar shutdown_timeout: on stop, how many seconds requests in flight
        get to finish before their connections are dropped.
    @ivar poll_max: the longest a connection busy-polls for its client's
        next request, in seconds (see L{twisted_nbd.protocol}); 0 never.
    @ivar workers: how many processes serve the connections; with more
        than one, this process only accepts them and hands them out (see
        L{twisted_nbd.workers}).
    @ivar tls: the server's TLS settings (off by default).
    @ivar limits: who may connect, how many at once, and the handshake and
        idle timeouts (see L{twisted_nbd.limits}).
    @ivar verbose: log every request (L{twisted_nbd.logs.RequestLog}).
    """

    exports: list[ExportSpec]
    default: str | None = None
    listen: tuple[str, ...] = (DEFAULT_LISTEN,)
    max_queue_depth: int = DEFAULT_MAX_QUEUE_DEPTH
    max_bytes_in_flight: int = DEFAULT_MAX_BYTES_IN_FLIGHT
    shutdown_timeout: float = DEFAULT_SHUTDOWN_TIMEOUT
    workers: int = 1
    poll_max: float = DEFAULT_POLL_MAX
    tls: TLSSettings = field(default_factory=TLSSettings)
    limits: Limits = field(default_factory=Limits)
    verbose: bool = False


def absolute_paths(kind: str, ref: PluginRef, base: str) -> PluginRef:
    """
    C{ref} with the values of its C{PATH} keys made absolute against
    C{base} (a config file's directory, or the current one); unknown names
    and keys are left for L{ExportSpec.check} to report.
    """
    try:
        plugin = registry.get(kind, ref.name)
    except PluginError:
        return ref
    paths = {key.name for key in plugin.keys if key.type is PATH}
    if not paths:
        return ref
    args = tuple(
        (
            k,
            os.path.join(base, os.path.expanduser(v))
            if k in paths and isinstance(v, str) and v
            else v,
        )
        for k, v in ref.args
    )
    return PluginRef(ref.name, args)


def with_backend(spec: ExportSpec, ref: PluginRef) -> ExportSpec:
    """
    C{spec} served by the backend C{ref} names: C{file} and C{memory} become
    C{image}/C{size} and C{memory} (what C{--image} and C{--memory} fill
    in), any other backend C{backend_ref}. Paths should be absolute already
    (L{absolute_paths}).

    @raise SpecError: the C{file} or C{memory} keys are wrong.
    """
    if ref.name in ("file", "memory"):
        try:
            _, values = registry.resolve("backend", ref)
        except PluginError as e:
            raise SpecError("backend", str(e)) from None
        if ref.name == "file":
            return replace(spec, image=values["path"], size=values["size"])
        return replace(spec, memory=values["size"])
    return replace(spec, backend_ref=ref)


def check_config(config: Config) -> None:
    """
    Check a L{Config} built by code rather than read from a file: every
    export as L{ExportSpec.check} does, names unique, the default one of
    them, the limits positive.

    @raise ConfigError: the configuration as a whole is wrong.
    @raise SpecError: an export is (L{SpecError.setting} says what).
    """
    if not config.exports:
        raise ConfigError("no exports to serve")
    names: set[str] = set()
    for spec in config.exports:
        spec.check()
        if spec.name in names:
            raise ConfigError(f"there are two exports named {spec.name!r}")
        names.add(spec.name)
    if config.default is not None and config.default not in names:
        raise ConfigError(f"the default export {config.default!r} is not defined")
    if not config.listen:
        raise ConfigError("nothing to listen on")
    if config.max_queue_depth < 1 or config.max_bytes_in_flight < 1:
        raise ConfigError("the queue depth and the bytes in flight must be at least 1")
    if not 0 <= config.shutdown_timeout < float("inf"):
        raise ConfigError("the shutdown timeout must be zero or more seconds")
    if config.workers < 1:
        raise ConfigError("the number of workers must be at least 1")
    if not 0 <= config.poll_max <= 0.01:
        raise ConfigError("the poll time must be from 0 to 10000 microseconds")
    for spec in config.exports:
        if (spec.tls_required or spec.tls_allow_dn) and config.tls.mode == "off":
            raise ConfigError(f"export {spec.name!r} requires TLS, but TLS is off (--tls)")
        if spec.tls_allow_dn and not config.tls.verify_peer:
            raise ConfigError(
                f"export {spec.name!r} allows clients by certificate DN, "
                "which needs --tls-verify-peer"
            )
    try:
        config.tls.check()
    except TLSError as e:
        raise ConfigError(str(e)) from None


_EXPORT_KEYS = {
    "name",
    "description",
    "read-only",
    "image",
    "size",
    "memory",
    "min-block",
    "preferred-block",
    "max-block",
    "backend",
    "filters",
    "tls",
    "tls-allow-dn",
}
_BLOCK_KEYS = ("min-block", "preferred-block", "max-block")
_HEADER = re.compile(r"^\s*\[\[\s*export\s*\]\]")


class _Lines:
    """Finds the line of a key, for error messages (tomllib gives no positions)."""

    def __init__(self, text: str) -> None:
        self.lines = text.splitlines()
        self.headers = [i for i, line in enumerate(self.lines) if _HEADER.match(line)]

    def of(self, index: int | None, key: str | None = None) -> int:
        """The 1-based line of export C{index} (or the top level) and C{key}."""
        if index is None:
            start, end = 0, self.headers[0] if self.headers else len(self.lines)
        elif index < len(self.headers):
            start = self.headers[index]
            end = self.headers[index + 1] if index + 1 < len(self.headers) else len(self.lines)
        else:
            return 1
        if key is not None:
            pattern = re.compile(rf"^\s*[\"']?{re.escape(key)}[\"']?\s*=")
            for number in range(start, end):
                if pattern.match(self.lines[number]):
                    return number + 1
        return start + 1

    def of_table(self, table: str, key: str | None = None) -> int:
        """The 1-based line of C{key} in the C{[table]} table (or of its header)."""
        header = re.compile(rf"^\s*\[\s*{re.escape(table)}\s*\]")
        start = next((i for i, line in enumerate(self.lines) if header.match(line)), None)
        if start is None:
            return 1
        end = next(
            (
                i
                for i in range(start + 1, len(self.lines))
                if self.lines[i].lstrip().startswith("[")
            ),
            len(self.lines),
        )
        if key is not None:
            pattern = re.compile(rf"^\s*[\"']?{re.escape(key)}[\"']?\s*=")
            for number in range(start, end):
                if pattern.match(self.lines[number]):
                    return number + 1
        return start + 1


def load_config(path: str) -> Config:
    """
    Read and check a TOML config file (see the module docstring).

    @raise ConfigError: the file cannot be read or parsed, or describes
        something that cannot be served; C{str()} is C{"PATH:LINE: reason"}.
    """
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the config file: {e.strerror}") from None
    try:
        text = raw.decode("utf-8")
        data = tomllib.loads(text)
    except UnicodeDecodeError:
        raise ConfigError(f"{path}:1: the config file is not UTF-8") from None
    except tomllib.TOMLDecodeError as e:
        found = re.search(r"\(at line (\d+), column \d+\)", str(e))
        line = found.group(1) if found else "1"
        reason = re.sub(r"\s*\(at line \d+, column \d+\)", "", str(e))
        raise ConfigError(f"{path}:{line}: {reason}") from None
    lines = _Lines(text)
    base = os.path.dirname(os.path.abspath(path))

    def fail(index: int | None, key: str | None, reason: str) -> ConfigError:
        return ConfigError(f"{path}:{lines.of(index, key)}: {reason}")

    for key in data:
        if key not in ("default", "export", "limits"):
            raise fail(
                None, key, f"unknown setting {key!r} (expected 'default', [[export]] or [limits])"
            )
    tables = data.get("export", [])
    if not isinstance(tables, list) or not tables:
        raise fail(None, "export", "no exports: add at least one [[export]] table")

    specs: list[ExportSpec] = []
    names: set[str] = set()
    for index, table in enumerate(tables):
        if not isinstance(table, dict):
            raise fail(index, None, "each export must be a [[export]] table")
        for key in table:
            if key not in _EXPORT_KEYS:
                raise fail(index, key, f"unknown export setting {key!r}")
        if "name" not in table:
            raise fail(index, None, "the export has no name")
        try:
            spec = _spec(table, base)
        except _KeyError as e:
            raise fail(index, e.key, e.reason) from None
        if spec.name in names:
            raise fail(index, "name", f"there are two exports named {spec.name!r}")
        names.add(spec.name)
        try:
            spec.check()
        except SpecError as e:
            at: str | None = e.setting if e.setting in ("name", "description", "image") else None
            if e.setting == "export" and spec.image:
                at = "image"
            elif e.setting in ("backend", "filters"):
                at = e.setting
            elif e.setting == "block sizes":
                at = next((k for k in _BLOCK_KEYS if k in table), None)
            raise fail(index, at, f"export {spec.name!r}: {e}") from None
        specs.append(spec)

    default = data.get("default")
    if default is not None:
        if not isinstance(default, str):
            raise fail(None, "default", "'default' must be the name of an export")
        if default not in names:
            raise fail(None, "default", f"the default export {default!r} is not defined")
    limits = Limits()
    if "limits" in data:
        try:
            limits = _limits(data["limits"])
        except _KeyError as e:
            raise ConfigError(f"{path}:{lines.of_table('limits', e.key)}: {e.reason}") from None
    return Config(specs, default, limits=limits)


#: The keys of the [limits] table, and the L{Limits} field each sets.
_LIMIT_KEYS = {
    "handshake-timeout": "handshake_timeout",
    "idle-timeout": "idle_timeout",
    "max-connections": "max_connections",
    "max-negotiating": "max_negotiating",
    "allow": "allow",
}


def _limits(table: object) -> Limits:
    """Build L{Limits} from the [limits] table, converting types."""
    if not isinstance(table, dict):
        raise _KeyError("limits", "'limits' must be a [limits] table")
    values: dict[str, Any] = {}
    for key, value in table.items():
        if key not in _LIMIT_KEYS:
            raise _KeyError(key, f"unknown limits setting {key!r}")
        if key.endswith("timeout"):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise _KeyError(key, f"{key!r} must be a number of seconds")
            value = float(value)
        elif key == "allow":
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise _KeyError(key, "'allow' must be a list of networks, e.g. [\"10.0.0.0/8\"]")
            value = tuple(value)
        elif isinstance(value, bool) or not isinstance(value, int):
            raise _KeyError(key, f"{key!r} must be a whole number (0: no cap)")
        try:
            # One at a time, so a mistake points at its own line.
            Limits(**{_LIMIT_KEYS[key]: value})
        except ValueError as e:
            raise _KeyError(key, f"[limits] {key}: {e}") from None
        values[_LIMIT_KEYS[key]] = value
    return Limits(**values)


class _KeyError(Exception):
    def __init__(self, key: str, reason: str) -> None:
        super().__init__(key, reason)
        self.key = key
        self.reason = reason


def _spec(table: dict[str, Any], base: str) -> ExportSpec:
    """Build an L{ExportSpec} from one [[export]] table, converting types."""

    def text(key: str) -> str:
        value = table.get(key, "")
        if not isinstance(value, str):
            raise _KeyError(key, f"{key!r} must be a string")
        return value

    def size(key: str) -> int | None:
        value = table.get(key)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise _KeyError(key, f'{key!r} must be a size such as 512, "64K" or "1G"')
        if isinstance(value, int):
            value = str(value)
        try:
            return parse_size(value)
        except ValueError as e:
            raise _KeyError(key, f"{key!r}: {e}") from None

    read_only = table.get("read-only", False)
    if not isinstance(read_only, bool):
        raise _KeyError("read-only", "'read-only' must be true or false")
    tls = table.get("tls", "inherit")
    if tls not in ("inherit", "require"):
        raise _KeyError("tls", '\'tls\' must be "require" (or "inherit", the default)')
    allow = table.get("tls-allow-dn", [])
    if isinstance(allow, str):
        allow = [allow]
    if not isinstance(allow, list) or not all(isinstance(a, str) and a for a in allow):
        raise _KeyError("tls-allow-dn", "'tls-allow-dn' must be a list of DN patterns")
    image = table.get("image")
    if image is not None:
        if not isinstance(image, str) or not image:
            raise _KeyError("image", "'image' must be a path")
        image = os.path.join(base, os.path.expanduser(image))
    filters = table.get("filters", [])
    if not isinstance(filters, list):
        raise _KeyError("filters", '\'filters\' must be a list such as ["cow", "error:rate=0.01"]')
    refs = tuple(absolute_paths("filter", _ref(item, "filter"), base) for item in filters)
    spec = ExportSpec(
        name=text("name"),
        description=text("description"),
        read_only=read_only,
        image=image,
        size=size("size"),
        memory=size("memory"),
        min_block=size("min-block"),
        preferred_block=size("preferred-block"),
        max_block=size("max-block"),
        filters=refs,
        tls_required=tls == "require",
        tls_allow_dn=tuple(allow),
    )
    if "backend" in table:
        if image is not None or "memory" in table:
            raise _KeyError("backend", "give one of 'backend', 'image' and 'memory'")
        ref = absolute_paths("backend", _ref(table["backend"], "backend"), base)
        try:
            spec = with_backend(spec, ref)
        except SpecError as e:
            raise _KeyError("backend", str(e)) from None
    return spec


def _ref(value: Any, kind: str) -> PluginRef:
    """
    A backend or filter from the config file: C{"NAME:key=value,..."} or a
    table C{{name = "NAME", key = value, ...}}.
    """
    key = "backend" if kind == "backend" else "filters"
    if isinstance(value, str):
        try:
            return parse_ref(value, kind)
        except PluginError as e:
            raise _KeyError(key, str(e)) from None
    if isinstance(value, dict):
        name = value.get("name")
        if not isinstance(name, str):
            raise _KeyError(key, f'a {kind} table needs a name = "..."')
        return PluginRef(name, tuple((k, v) for k, v in value.items() if k != "name"))
    raise _KeyError(key, f'a {kind} is "NAME:key=value,..." or a table with a name')
