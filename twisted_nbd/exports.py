# -*- test-case-name: tests.test_exports -*-
"""
Exports: what a client can ask for by name.

An L{Export} joins a name and a description to a block device and the policy
under which it is served (read-only for now; TLS requirements later). An
L{ExportRegistry} maps names to exports and knows the default export, the one
a client gets when it asks for the empty name.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Iterable, Iterator

from twisted_nbd.interfaces import Capabilities, IBlockDevice

__all__ = ["Export", "ExportRegistry", "MAX_STRING"]

#: The protocol's limit for names and descriptions, in UTF-8 bytes.
MAX_STRING = 4096


@dataclass(frozen=True)
class Export:
    """
    A named block device and the policy it is served under.

    @ivar name: the export's canonical name.
    @ivar device: the L{IBlockDevice} behind it.
    @ivar description: a human-readable description for NBD_OPT_LIST and
        NBD_INFO_DESCRIPTION.
    @ivar read_only: refuse every write even if the device could write.
    """

    name: str
    device: IBlockDevice
    description: str = ""
    read_only: bool = False

    def __post_init__(self) -> None:
        for what, text in (("name", self.name), ("description", self.description)):
            if len(text.encode("utf-8")) > MAX_STRING:
                raise ValueError(f"export {what} is longer than {MAX_STRING} bytes")
            if "\0" in text:
                raise ValueError(f"export {what} contains a NUL character")

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
