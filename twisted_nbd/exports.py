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

__all__ = ["Export", "ExportRegistry", "MAX_STRING", "check_block_sizes"]

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
    min_block: int | None = None
    preferred_block: int | None = None
    max_block: int | None = None

    def __post_init__(self) -> None:
        for what, text in (("name", self.name), ("description", self.description)):
            if len(text.encode("utf-8")) > MAX_STRING:
                raise ValueError(f"export {what} is longer than {MAX_STRING} bytes")
            if "\0" in text:
                raise ValueError(f"export {what} contains a NUL character")
        caps = self.capabilities
        check_block_sizes(caps.min_block, caps.preferred_block, caps.max_block)

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
