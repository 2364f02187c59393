"""Storage backends: where the bytes of an export live."""

from twisted_nbd.backends.file import FileBlockDevice, create_image
from twisted_nbd.backends.memory import MemoryBlockDevice

__all__ = ["FileBlockDevice", "MemoryBlockDevice", "create_image"]
