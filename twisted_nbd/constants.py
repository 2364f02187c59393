"""
The NBD protocol's numbers, for code that uses twisted-nbd: error numbers
(L{Errno}), transmission flags (L{TxFlags}), commands (L{Cmd}) and their
flags (L{CmdFlags}), options (L{Opt}) and option replies (L{Rep}), and the
C{base:allocation} states. They are defined once, in the private wire codec;
this module is their public name.
"""

from twisted_nbd._wire import (
    BASE_ALLOCATION,
    DEFAULT_MAX_PAYLOAD,
    MAX_STRING,
    ChunkType,
    Cmd,
    CmdFlags,
    Errno,
    Info,
    Opt,
    Rep,
    TxFlags,
)
from twisted_nbd.interfaces import STATE_HOLE, STATE_ZERO

__all__ = [
    "BASE_ALLOCATION",
    "DEFAULT_MAX_PAYLOAD",
    "MAX_STRING",
    "STATE_HOLE",
    "STATE_ZERO",
    "ChunkType",
    "Cmd",
    "CmdFlags",
    "Errno",
    "Info",
    "Opt",
    "Rep",
    "TxFlags",
]
