# -*- test-case-name: tests.test_registry -*-
"""
Backends and filters by name.

A backend is described by a L{BackendPlugin}, a filter by a
L{FilterPlugin}: a name, a line of help, the keys it takes (L{Key}: name,
type, default, help) and a function that opens it. Both are found the same
way, built-in or not: through the Python entry point groups
L{BACKEND_GROUP} (C{twisted_nbd.backends}) and L{FILTER_GROUP}
(C{twisted_nbd.filters}), whose entries name a plugin object. A package
adds one in its own metadata, without touching this one::

    # pyproject.toml of a third-party package
    [project.entry-points."twisted_nbd.backends"]
    s3 = "nbd_s3.backend:plugin"

Entry points rather than Twisted's plugin system: they are listed from
installed metadata without importing anything (only the plugin that is
used is imported), they need no C{dropin.cache} nor a shared
C{twisted/plugins} directory, and every Python packaging tool writes them.
The built-ins are declared in C{setup.py} too; L{BUILTIN_BACKENDS} and
L{BUILTIN_FILTERS} name the same objects so that a source checkout that
is not installed (or installed from an older version) still has them.

On the command line and in the config file, a plugin is written
C{NAME:key=value,key=value} (L{parse_ref}); L{PluginRef} keeps that
unparsed, as strings, so that it can travel to worker processes as JSON;
L{Registry.resolve} checks it and converts the values.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from importlib import import_module, metadata
from typing import TYPE_CHECKING, Any, Callable, Generic, Iterable, Mapping, TypeVar

from twisted.logger import Logger

from twisted_nbd._wire import Errno

if TYPE_CHECKING:
    from twisted_nbd.backends import OpenContext
    from twisted_nbd.interfaces import IBlockDevice

__all__ = [
    "BACKEND_GROUP",
    "BOOL",
    "BUILTIN_BACKENDS",
    "BUILTIN_FILTERS",
    "BackendPlugin",
    "DURATION",
    "ERRNO",
    "FILTER_GROUP",
    "FLOAT",
    "FilterPlugin",
    "INT",
    "Key",
    "KeyType",
    "PATH",
    "PluginError",
    "PluginRef",
    "REQUIRED",
    "Registry",
    "SIZE",
    "STRING",
    "choice",
    "describe",
    "parse_ref",
    "registry",
    "set_of",
]

_log = Logger()

#: The entry point group of backends.
BACKEND_GROUP = "twisted_nbd.backends"
#: The entry point group of filters.
FILTER_GROUP = "twisted_nbd.filters"

#: The built-in backends, as their entry points name them (setup.py lists the same).
BUILTIN_BACKENDS = {
    "file": "twisted_nbd.backends:file_plugin",
    "memory": "twisted_nbd.backends:memory_plugin",
    "pattern": "twisted_nbd.backends.pattern:plugin",
    "http": "twisted_nbd.backends.http:plugin",
    "nbd": "twisted_nbd.backends.nbd:plugin",
    "s3": "twisted_nbd.backends.s3:plugin",
    "rbd": "twisted_nbd.backends.rbd:plugin",
}
#: The built-in filters, likewise.
BUILTIN_FILTERS = {
    "blocksize": "twisted_nbd.filters.blocksize:plugin",
    "cache": "twisted_nbd.filters.cache:plugin",
    "cow": "twisted_nbd.filters.cow:plugin",
    "delay": "twisted_nbd.filters.delay:plugin",
    "error": "twisted_nbd.filters.error:plugin",
    "offset": "twisted_nbd.filters.offset:plugin",
    "rate": "twisted_nbd.filters.rate:plugin",
    "readonly": "twisted_nbd.filters.readonly:plugin",
    "stats": "twisted_nbd.filters.stats:plugin",
    "truncate": "twisted_nbd.filters.truncate:plugin",
}

_T = TypeVar("_T")


class PluginError(ValueError):
    """
    A plugin reference that cannot be used; C{str()} is one line for the
    user, naming the backend or filter and the key at fault.
    """


# Key types.


@dataclass(frozen=True)
class KeyType(Generic[_T]):
    """
    How a key's value is written and converted.

    @ivar name: what to call it in help (C{SIZE}, C{SECONDS}, ...).
    @ivar parse: converts the text of the command line or config file, or
        raises C{ValueError} with a reason.
    @ivar native: the TOML types accepted as they are (then C{check} runs).
    @ivar check: checks (and may convert) a native value.
    """

    name: str
    parse: Callable[[str], _T]
    native: tuple[type, ...] = ()
    check: Callable[[Any], _T] | None = None

    def convert(self, value: object) -> _T:
        """
        Convert text, or a native TOML value, to the key's value.

        @raise ValueError: it is not a valid value.
        """
        if isinstance(value, str):
            return self.parse(value)
        if (
            self.native
            and isinstance(value, self.native)
            and not (isinstance(value, bool) and bool not in self.native)
        ):
            return self.check(value) if self.check is not None else value  # type: ignore[return-value]
        raise ValueError(f"expected {self.name}, not {value!r}")


def _parse_size(text: str) -> int:
    from twisted_nbd.config import parse_size

    return parse_size(text)


def _parse_int(text: str) -> int:
    try:
        return int(text.strip(), 0)
    except ValueError:
        raise ValueError(f"{text!r} is not a whole number") from None


def _parse_float(text: str) -> float:
    try:
        value = float(text.strip())
    except ValueError:
        raise ValueError(f"{text!r} is not a number") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise ValueError(f"{text!r} is not a finite number")
    return value


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise ValueError(f"{text!r} is not true or false")


_DURATION = re.compile(r"([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*(us|ms|s|m|h)?")
_SECONDS = {None: 1.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "m": 60.0, "h": 3600.0}


def _parse_duration(text: str) -> float:
    match = _DURATION.fullmatch(text.strip().lower())
    if match is None:
        raise ValueError(f"{text!r} is not a duration: write e.g. 10ms, 0.5s, 250us or 2")
    return float(match.group(1)) * _SECONDS[match.group(2)]


def _parse_errno(text: str) -> Errno:
    name = text.strip().upper()
    try:
        return Errno[name]
    except KeyError:
        known = ", ".join(e.name for e in Errno)
        raise ValueError(f"{text!r} is not an NBD error; one of {known}") from None


def _same_int(value: int) -> int:
    return value


def _size_check(value: int) -> int:
    return _parse_size(str(value))


def _float_check(value: float) -> float:
    return float(value)


def _duration_check(value: float) -> float:
    if value < 0:
        raise ValueError(f"{value} is negative")
    return float(value)


#: A size in bytes with an optional K, M, G, T or P suffix (powers of 1024).
SIZE: KeyType[int] = KeyType("SIZE", _parse_size, (int,), _size_check)
#: A whole number (C{0x} and C{0o} prefixes allowed).
INT: KeyType[int] = KeyType("INT", _parse_int, (int,), _same_int)
#: A number.
FLOAT: KeyType[float] = KeyType("NUMBER", _parse_float, (int, float), _float_check)
#: true/false, yes/no, on/off, 1/0.
BOOL: KeyType[bool] = KeyType("BOOL", _parse_bool, (bool,))
#: Any text.
STRING: KeyType[str] = KeyType("TEXT", str)
#: A file path (made absolute against the config file's directory there).
PATH: KeyType[str] = KeyType("PATH", str)
#: Seconds, with an optional unit: C{10ms}, C{250us}, C{0.5s}, C{2}.
DURATION: KeyType[float] = KeyType("SECONDS", _parse_duration, (int, float), _duration_check)
#: An NBD error name: EIO, ENOSPC, EPERM, EINVAL, ENOMEM, EOVERFLOW, ENOTSUP, ESHUTDOWN.
ERRNO: KeyType[Errno] = KeyType("ERRNO", _parse_errno)


def choice(*choices: str) -> KeyType[str]:
    """A key whose value is one of C{choices}."""

    def parse(text: str) -> str:
        if text not in choices:
            raise ValueError(f"{text!r} is not one of {', '.join(choices)}")
        return text

    return KeyType("|".join(choices), parse)


def set_of(*choices: str) -> KeyType[frozenset[str]]:
    """
    A key whose value is a set of C{choices} joined with C{+}
    (C{read+write}), or C{all}; a TOML array of them works too.
    """

    def parse(text: str) -> frozenset[str]:
        if text.strip() == "all":
            return frozenset(choices)
        names = [name.strip() for name in text.split("+")]
        for name in names:
            if name not in choices:
                raise ValueError(f"{name!r} is not one of {', '.join(choices)} (or all)")
        return frozenset(names)

    def check(value: list[Any]) -> frozenset[str]:
        if not all(isinstance(item, str) for item in value):
            raise ValueError(f"{value!r} is not a list of names")
        return parse("+".join(value))

    return KeyType("+".join(choices[:2]) + "+...", parse, (list,), check)


_REQUIRED_MARK = object()
#: The default of a key that must be given.
REQUIRED: Any = _REQUIRED_MARK


@dataclass(frozen=True)
class Key:
    """
    One key a backend or filter takes.

    @ivar name: as written: C{rate}, C{block-size}.
    @ivar type: how its value is written and converted.
    @ivar default: the value when it is not given (already converted), or
        L{REQUIRED}.
    @ivar help: one line for C{NAME:help}.
    @ivar shown: how C{NAME:help} shows the default, if not as it is.
    """

    name: str
    type: KeyType[Any]
    default: Any = REQUIRED
    help: str = ""
    shown: str | None = None

    @property
    def required(self) -> bool:
        """Whether the key must be given."""
        return self.default is REQUIRED


# Plugins.

#: Opens a backend from its converted keys; may block briefly (it runs while
#: the server is built). Raises C{ValueError} or C{OSError} with a reason.
BackendOpener = Callable[[Mapping[str, Any], "OpenContext"], "IBlockDevice"]

#: Wraps a device in a filter from its converted keys.
FilterWrapper = Callable[["IBlockDevice", Mapping[str, Any], "OpenContext"], "IBlockDevice"]


@dataclass(frozen=True)
class BackendPlugin:
    """
    A backend that can be named on the command line or in a config file.

    @ivar name: its name (C{file}, C{memory}, ...).
    @ivar help: one line saying what it serves.
    @ivar keys: the keys it takes.
    @ivar open: makes the device.
    @ivar check: optionally checks converted keys early (while the command
        line is parsed), raising C{ValueError} naming the key as
        C{"key: reason"}.
    """

    name: str
    help: str
    keys: tuple[Key, ...]
    open: BackendOpener
    check: Callable[[Mapping[str, Any]], None] | None = None


@dataclass(frozen=True)
class FilterPlugin:
    """
    A filter that can be named on the command line or in a config file.

    @ivar name: its name (C{cow}, C{readonly}, ...).
    @ivar help: one line saying what it does.
    @ivar keys: the keys it takes.
    @ivar wrap: wraps a device in the filter (once per export: every
        connection to the export shares it).
    @ivar per_process: the filter's state may be kept apart in each worker
        process (C{--workers}); false for those whose state must be one
        per export (an overlay, a cache, a rate limit).
    @ivar per_connection: given the converted keys, whether C{wrap} is
        called once per connection (around that connection's device)
        instead of once per export. Such filters must come first, outside
        every per-export one, and their C{close} must leave the device
        below open (see L{twisted_nbd.exports.ConnectionLayer}).
    """

    name: str
    help: str
    keys: tuple[Key, ...]
    wrap: FilterWrapper
    per_process: bool = True
    per_connection: Callable[[Mapping[str, Any]], bool] | None = None


Plugin = BackendPlugin | FilterPlugin


@dataclass(frozen=True)
class PluginRef:
    """
    A backend or filter as the user named it, its values still text (or
    native TOML values), so that it can be compared and sent as JSON.

    @ivar name: the backend's or filter's name.
    @ivar args: C{(key, value)} pairs in the order given.
    """

    name: str
    args: tuple[tuple[str, Any], ...] = ()

    def __str__(self) -> str:
        if not self.args:
            return self.name
        return self.name + ":" + ",".join(f"{key}={value}" for key, value in self.args)

    def to_json(self) -> dict[str, Any]:
        """A JSON-able form, read back by L{from_json}."""
        return {"name": self.name, "args": [list(pair) for pair in self.args]}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> PluginRef:
        """The reference L{to_json} (or C{dataclasses.asdict}) described."""
        return cls(str(data["name"]), tuple((str(k), v) for k, v in data["args"]))


_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def parse_ref(text: str, kind: str = "backend") -> PluginRef:
    """
    Parse C{NAME} or C{NAME:key=value,key=value}. A value runs to the next
    comma; the names of keys are checked later, against the plugin.

    @param kind: C{"backend"} or C{"filter"}, for messages.
    @raise PluginError: it is not written that way.
    """
    name, _, rest = text.partition(":")
    name = name.strip()
    if not _NAME.fullmatch(name):
        raise PluginError(f"{text!r} does not start with a {kind} name (NAME:key=value,...)")
    args: list[tuple[str, str]] = []
    if rest.strip():
        for item in rest.split(","):
            key, equals, value = item.partition("=")
            key = key.strip()
            if key == "help" and not equals:
                args.append(("help", ""))
                continue
            if not equals or not key:
                raise PluginError(f"{kind} {name!r}: {item!r} is not key=value")
            args.append((key, value.strip()))
    return PluginRef(name, tuple(args))


def describe(plugin: Plugin, kind: str | None = None) -> str:
    """The text C{--backend NAME:help} and C{--filter NAME:help} print."""
    if kind is None:
        kind = "backend" if isinstance(plugin, BackendPlugin) else "filter"
    lines = [f"{kind} {plugin.name}: {plugin.help}"]
    if not plugin.keys:
        lines.append("  (no keys)")
    width = max((len(key.name) + len(key.type.name) + 1 for key in plugin.keys), default=0)
    for key in plugin.keys:
        left = f"{key.name}={key.type.name}"
        if key.required:
            note = " (required)"
        elif key.shown is not None:
            note = f" [default: {key.shown}]"
        elif key.default is None:
            note = ""
        else:
            default = key.default
            if isinstance(default, frozenset):
                default = "+".join(sorted(default))
            elif isinstance(default, Errno):
                default = default.name
            elif isinstance(default, bool):
                default = str(default).lower()
            elif key.type is SIZE:
                default = _human(default)
            note = f" [default: {default}]"
        lines.append(f"  {left:<{width}}  {key.help}{note}")
    return "\n".join(lines)


def _human(size: int) -> str:
    """C{65536} as C{64K}: the largest unit that divides it."""
    for suffix, unit in (("T", 1 << 40), ("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if size % unit == 0:
            return f"{size // unit}{suffix}"
    return str(size)


@dataclass
class Registry:
    """
    The backends and filters that can be named: the built-ins and those of
    every installed distribution's entry points, loaded on first use.
    Tests and applications may L{add} more.
    """

    builtin_backends: Mapping[str, str] = field(default_factory=lambda: dict(BUILTIN_BACKENDS))
    builtin_filters: Mapping[str, str] = field(default_factory=lambda: dict(BUILTIN_FILTERS))
    discover: bool = True
    _found: dict[str, dict[str, Any]] | None = None

    def _sources(self) -> dict[str, dict[str, Any]]:
        """C{{group: {name: "module:attr" or a plugin}}}, built-ins first."""
        if self._found is None:
            found: dict[str, dict[str, Any]] = {
                BACKEND_GROUP: dict(self.builtin_backends),
                FILTER_GROUP: dict(self.builtin_filters),
            }
            if self.discover:
                for group, table in found.items():
                    for entry in _entry_points(group):
                        known = table.get(entry.name)
                        if known is None:
                            table[entry.name] = entry.value
                        elif known != entry.value:
                            _log.warn(
                                "Ignored the {group} entry point {name!r} = {value!r}: "
                                "{name!r} is already {known!r}",
                                group=group,
                                name=entry.name,
                                value=entry.value,
                                known=known,
                            )
            self._found = found
        return self._found

    def add(self, plugin: Plugin) -> None:
        """Make C{plugin} available by its name (replacing one of that name)."""
        group = BACKEND_GROUP if isinstance(plugin, BackendPlugin) else FILTER_GROUP
        self._sources()[group][plugin.name] = plugin

    def remove(self, plugin: Plugin) -> None:
        """Forget a plugin L{add}ed."""
        group = BACKEND_GROUP if isinstance(plugin, BackendPlugin) else FILTER_GROUP
        self._sources()[group].pop(plugin.name, None)

    def names(self, kind: str) -> list[str]:
        """The names of every C{"backend"} or C{"filter"}, sorted."""
        return sorted(self._sources()[_group(kind)])

    def get(self, kind: str, name: str) -> Plugin:
        """
        The C{"backend"} or C{"filter"} called C{name}, loaded.

        @raise PluginError: there is none, or it cannot be loaded.
        """
        table = self._sources()[_group(kind)]
        source = table.get(name)
        if source is None:
            known = ", ".join(sorted(table))
            raise PluginError(f"there is no {kind} called {name!r} (known: {known})")
        if isinstance(source, (BackendPlugin, FilterPlugin)):
            return source
        try:
            module, _, attr = str(source).partition(":")
            loaded: Any = import_module(module)
            for part in attr.split("."):
                loaded = getattr(loaded, part)
        except Exception as e:
            raise PluginError(f"{kind} {name!r} cannot be loaded from {source}: {e}") from None
        wanted = BackendPlugin if kind == "backend" else FilterPlugin
        if not isinstance(loaded, wanted):
            raise PluginError(f"{kind} {name!r} ({source}) is not a {wanted.__name__}")
        table[name] = loaded
        return loaded

    def all(self, kind: str) -> list[Plugin]:
        """Every C{"backend"} or C{"filter"} that loads, sorted by name."""
        plugins: list[Plugin] = []
        for name in self.names(kind):
            try:
                plugins.append(self.get(kind, name))
            except PluginError as e:
                _log.warn("{error}", error=str(e))
        return plugins

    def resolve(self, kind: str, ref: PluginRef) -> tuple[Plugin, dict[str, Any]]:
        """
        Find the plugin C{ref} names and convert its values, filling in
        defaults.

        @return: the plugin and its keys' values, by key name.
        @raise PluginError: no such plugin, an unknown or repeated key, a
            bad value, or a required key missing; the message names the
            plugin and the key.
        """
        plugin = self.get(kind, ref.name)
        keys = {key.name: key for key in plugin.keys}
        values: dict[str, Any] = {}
        for name, raw in ref.args:
            key = keys.get(name)
            if key is None:
                known = ", ".join(keys) or "none"
                raise PluginError(
                    f"{kind} {ref.name!r} has no key {name!r} (its keys: {known}; "
                    f"see {ref.name}:help)"
                )
            if name in values:
                raise PluginError(f"{kind} {ref.name!r}: {name!r} is given twice")
            try:
                values[name] = key.type.convert(raw)
            except ValueError as e:
                raise PluginError(f"{kind} {ref.name!r}: {name}: {e}") from None
        for key in plugin.keys:
            if key.name not in values:
                if key.required:
                    raise PluginError(
                        f"{kind} {ref.name!r} needs {key.name}={key.type.name} ({key.help})"
                    )
                values[key.name] = key.default
        check = getattr(plugin, "check", None)
        if check is not None:
            try:
                check(values)
            except ValueError as e:
                raise PluginError(f"{kind} {ref.name!r}: {e}") from None
        return plugin, values

    def open_backend(self, ref: PluginRef, context: OpenContext) -> IBlockDevice:
        """
        Open the backend C{ref} names.

        @raise PluginError: C{ref} is wrong.
        @raise OSError: the backend could not be opened.
        """
        plugin, values = self.resolve("backend", ref)
        assert isinstance(plugin, BackendPlugin)
        try:
            return plugin.open(values, context)
        except ValueError as e:
            raise PluginError(f"backend {ref.name!r}: {e}") from None

    def split(
        self, filters: Iterable[PluginRef]
    ) -> tuple[list[tuple[FilterPlugin, dict[str, Any]]], list[PluginRef]]:
        """
        Separate the filters made per connection (which come first) from
        those made per export.

        @return: the per-connection filters with their values, outermost
            first, and the references of the per-export ones.
        @raise PluginError: a reference is wrong, or a per-connection
            filter comes after a per-export one.
        """
        per_connection: list[tuple[FilterPlugin, dict[str, Any]]] = []
        per_export: list[PluginRef] = []
        for ref in filters:
            plugin, values = self.resolve("filter", ref)
            assert isinstance(plugin, FilterPlugin)
            if plugin.per_connection is not None and plugin.per_connection(values):
                if per_export:
                    raise PluginError(
                        f"filter {ref.name!r} is made per connection, so it must come before "
                        f"(outside) every filter made per export, such as {per_export[0].name!r}"
                    )
                per_connection.append((plugin, values))
            else:
                per_export.append(ref)
        return per_connection, per_export

    def wrap(
        self, device: IBlockDevice, filters: Iterable[PluginRef], context: OpenContext
    ) -> IBlockDevice:
        """
        Wrap C{device} in C{filters}, the first the outermost (nearest the
        client), as nbdkit stacks C{--filter}s.

        @raise PluginError: a reference is wrong.
        """
        for ref in reversed(list(filters)):
            plugin, values = self.resolve("filter", ref)
            assert isinstance(plugin, FilterPlugin)
            try:
                device = plugin.wrap(device, values, context)
            except ValueError as e:
                raise PluginError(f"filter {ref.name!r}: {e}") from None
        return device


def _group(kind: str) -> str:
    if kind == "backend":
        return BACKEND_GROUP
    if kind == "filter":
        return FILTER_GROUP
    raise ValueError(f"unknown kind {kind!r}")


def _entry_points(group: str) -> list[metadata.EntryPoint]:
    try:
        return list(metadata.entry_points(group=group))
    except Exception:  # a broken distribution's metadata must not stop the server
        _log.failure("Reading the {group} entry points failed", group=group)
        return []


#: The registry the command line, the config file and the service use.
registry = Registry()
