# -*- test-case-name: tests.test_exports -*-
"""
Exports: what a client can ask for by name.

An L{Export} joins a name and a description to a block device and the policy
under which it is served (read-only for now; TLS requirements later). An
L{ExportRegistry} maps names to exports and knows the default export, the one
a client gets when it asks for the empty name.

A connection gets its device from L{Export.attach}: the export's shared
device, wrapped in the export's per-connection layers if it has any (a
filter that needs state of its own per client, as nbdkit's filters get an
C{open} per connection).

The checks that a name, a description and block sizes can be served are
defined here once (L{check_text}, L{check_block_sizes});
L{twisted_nbd.config.ExportSpec} applies them to what users write, and
L{Export} to what code builds.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable, Iterable, Iterator

from twisted_nbd._wire import MAX_STRING
from twisted_nbd.interfaces import Capabilities, IBlockDevice
from twisted_nbd.tls import dn_allowed

__all__ = [
    "Attachment",
    "ConnectionContext",
    "ConnectionLayer",
    "Export",
    "ExportRegistry",
    "MAX_STRING",
    "check_block_sizes",
    "check_text",
]


def check_text(what: str, text: str) -> None:
    """
    Check that a name or description can go on the wire.

    @param what: what it is, for the message ("the name").
    @raise ValueError: it is longer than L{MAX_STRING} bytes of UTF-8, or
        contains a NUL.
    """
    if len(text.encode("utf-8")) > MAX_STRING:
        raise ValueError(f"{what} is longer than {MAX_STRING} bytes (UTF-8)")
    if "\0" in text:
        raise ValueError(f"{what} must not contain a NUL character")


@dataclass(frozen=True)
class ConnectionContext:
    """
    What an export knows about a connection that attaches to it.

    @ivar export_name: the name the client asked for.
    @ivar read_only: the export is served read-only.
    @ivar tls: the connection is encrypted.
    @ivar peer: the client's address, for logs.
    """

    export_name: str
    read_only: bool = False
    tls: bool = False
    peer: str = ""


#: A per-connection layer: wraps the device a connection uses (the export's
#: shared device, or the previous layer) for that connection alone. Its
#: C{close()} is called when the connection ends and must release only
#: what the layer itself holds, never the device it wraps.
ConnectionLayer = Callable[[IBlockDevice, ConnectionContext], IBlockDevice]


@dataclass(frozen=True)
class Attachment:
    """
    The device one connection uses, and the per-connection layers to close
    when it ends (outermost first).
    """

    device: IBlockDevice
    layers: tuple[IBlockDevice, ...] = ()


@dataclass(frozen=True)
class Export:
    """
    A named block device and the policy it is served under.

    @ivar name: the export's canonical name.
    @ivar device: the L{IBlockDevice} behind it.
    @ivar description: a human-readable description for NBD_OPT_LIST and
        NBD_INFO_DESCRIPTION.
    @ivar read_only: refuse every write even if the device could write.
    @ivar min_block: the minimum block size to advertise instead of the
        device's (never below the device's own).
    @ivar preferred_block: likewise the preferred block size.
    @ivar max_block: likewise the maximum payload.
    @ivar connection_layers: per-connection layers (see L{ConnectionLayer})
        that L{attach} wraps around C{device}, innermost first.
    @ivar tls_required: only connections that have done STARTTLS may see
        and use the export (nbd-server's C{force_tls}, the spec's
        SELECTIVETLS).
    @ivar allowed_dns: if not empty, only clients whose certificate's
        subject DN matches one of these patterns may see and use it.
    """

    name: str
    device: IBlockDevice
    description: str = ""
    read_only: bool = False
    min_block: int | None = None
    preferred_block: int | None = None
    max_block: int | None = None
    connection_layers: tuple[ConnectionLayer, ...] = ()
    tls_required: bool = False
    allowed_dns: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        check_text("the export name", self.name)
        check_text("the export description", self.description)
        caps = self.capabilities
        check_block_sizes(caps.min_block, caps.preferred_block, caps.max_block)

    def allows_peer(self, dn: str | None) -> bool:
        """
        Whether a client whose TLS certificate has subject C{dn} (RFC 4514;
        C{None}: no certificate) may use this export: always, unless
        C{allowed_dns} lists patterns (shell-style, case-sensitive, as
        qemu's C{authz-simple}), one of which must match.
        """
        return dn_allowed(dn, self.allowed_dns)

    def attach(self, context: ConnectionContext) -> Attachment:
        """
        The device a new connection uses: the shared device wrapped in this
        export's per-connection layers. The layers must keep the shared
        device's size and capabilities (the client was told those during
        the handshake).
        """
        device = self.device
        layers: list[IBlockDevice] = []
        for layer in self.connection_layers:
            device = layer(device, context)
            layers.append(device)
        return Attachment(device, tuple(reversed(layers)))

    @property
    def size(self) -> int:
        """The export's size in bytes."""
        return int(self.device.size)

    @property
    def capabilities(self) -> Capabilities:
        """
        The device's capabilities, with writing turned off when the export is
        read-only.
        """
        caps: Capabilities = self.device.capabilities
        if (self.min_block, self.preferred_block, self.max_block) != (None, None, None):
            # A device that needs bigger blocks than asked for keeps its own minimum.
            minimum = max(self.min_block or 1, caps.min_block)
            caps = replace(
                caps,
                min_block=minimum,
                preferred_block=self.preferred_block or max(caps.preferred_block, minimum),
                max_block=self.max_block or caps.max_block,
            )
        if self.read_only and caps.can_write:
            caps = replace(
                caps,
                can_write=False,
                can_trim=False,
                can_zero=False,
                can_fast_zero=False,
                can_fua=False,
            )
        return caps


def check_block_sizes(minimum: int, preferred: int, maximum: int) -> None:
    """
    Check block size constraints against the protocol's rules: the minimum
    a power of two from 1 to 64 KiB, the preferred size a power of two at
    least max(minimum, 512), the maximum payload at least the preferred size
    and a multiple of the minimum, fitting in 32 bits.

    @raise ValueError: one of them breaks a rule; the message says which.
    """

    def power_of_two(n: int) -> bool:
        return n > 0 and n & (n - 1) == 0

    if not power_of_two(minimum) or minimum > 65536:
        raise ValueError(f"minimum block size {minimum} is not a power of two from 1 to 65536")
    if not power_of_two(preferred) or preferred < max(minimum, 512):
        raise ValueError(
            f"preferred block size {preferred} is not a power of two of at least "
            f"{max(minimum, 512)}"
        )
    if maximum < preferred or maximum % minimum or maximum > 0xFFFFFFFF:
        raise ValueError(
            f"maximum payload {maximum} must be at least the preferred size {preferred}, "
            f"a multiple of the minimum {minimum}, and below 4 GiB"
        )


@dataclass
class ExportRegistry:
    """
    The exports one server offers.

    @ivar default_name: the export a client gets for the empty name, or
        C{None} for none.
    """

    exports: dict[str, Export] = field(default_factory=dict)
    default_name: str | None = None

    @classmethod
    def of(cls, exports: Iterable[Export], default_name: str | None = None) -> ExportRegistry:
        """
        Build a registry; the default export is C{default_name}, or the only
        export when there is exactly one.

        @raise ValueError: two exports share a name, or the default is not
            among them.
        """
        table: dict[str, Export] = {}
        for export in exports:
            if export.name in table:
                raise ValueError(f"two exports are named {export.name!r}")
            table[export.name] = export
        if default_name is None and len(table) == 1:
            default_name = next(iter(table))
        if default_name is not None and default_name not in table:
            raise ValueError(f"the default export {default_name!r} does not exist")
        return cls(table, default_name)

    def lookup(self, name: str) -> Export | None:
        """
        Find the export a client means by C{name}; the empty name means the
        default export.
        """
        export = self.exports.get(name)
        if export is None and name == "" and self.default_name is not None:
            export = self.exports[self.default_name]
        return export

    def __iter__(self) -> Iterator[Export]:
        return iter(self.exports.values())

    def __len__(self) -> int:
        return len(self.exports)
