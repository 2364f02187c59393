"""
Import Ceph's Python bindings (C{rados} and C{rbd}) from wherever they are.

Debian's python3-rados and python3-rbd are compiled extension modules built
for Debian's own Python 3 and installed in C{/usr/lib/python3/dist-packages}.
Another CPython of the same version (a pyenv or venv interpreter) can load
them, but adding that whole folder to C{sys.path} would shadow the
interpreter's own packages with Debian's older copies. So when a plain
C{import rados} fails, only the two extension modules are loaded, by file
name, from the folders in L{SEARCH_PATH} (and from C{TWISTED_NBD_CEPH_PATH},
a C{os.pathsep}-separated list of folders, first).
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import sys
from types import ModuleType

__all__ = ["CephBindingsMissingError", "SEARCH_PATH", "import_rados", "import_rbd"]

#: Where Linux distributions install the bindings.
SEARCH_PATH = (
    "/usr/lib/python3/dist-packages",
    "/usr/lib64/python{0}.{1}/site-packages",
    "/usr/lib/python{0}.{1}/site-packages",
    "/usr/local/lib/python{0}.{1}/dist-packages",
)


class CephBindingsMissingError(ImportError):
    """Ceph's C{rados}/C{rbd} Python bindings cannot be imported."""


def _folders() -> list[str]:
    extra = os.environ.get("TWISTED_NBD_CEPH_PATH", "")
    major, minor = sys.version_info[:2]
    return [f for f in extra.split(os.pathsep) if f] + [f.format(major, minor) for f in SEARCH_PATH]


def _load(name: str) -> ModuleType:
    """
    Import the extension module C{name}, normally or by file name.

    @raise CephBindingsMissingError: it is in none of the folders, or does not
        load into this interpreter.
    """
    if name in sys.modules:
        return sys.modules[name]
    try:
        return importlib.import_module(name)
    except ImportError as e:
        first = e
    tried = []
    for folder in _folders():
        for suffix in importlib.machinery.EXTENSION_SUFFIXES:
            path = os.path.join(folder, name + suffix)
            if not os.path.exists(path):
                continue
            tried.append(path)
            spec = importlib.util.spec_from_file_location(name, path)
            if spec is None or spec.loader is None:
                continue
            module = importlib.util.module_from_spec(spec)
            # Registered before it runs: rbd imports rados by name.
            sys.modules[name] = module
            try:
                spec.loader.exec_module(module)
            except ImportError as e:
                del sys.modules[name]
                raise CephBindingsMissingError(
                    f"Ceph's {name!r} Python binding at {path} does not load into "
                    f"this Python ({sys.version.split()[0]}): {e}"
                ) from e
            return module
    where = ", ".join(tried) if tried else "none found in " + ", ".join(_folders())
    raise CephBindingsMissingError(
        f"Ceph's {name!r} Python binding is not importable ({first}; files: {where}); "
        f"install python3-rados and python3-rbd (Debian) or set TWISTED_NBD_CEPH_PATH "
        f"to the folder holding {name}{importlib.machinery.EXTENSION_SUFFIXES[0]}"
    ) from first


def import_rados() -> ModuleType:
    """
    The C{rados} module.

    @raise CephBindingsMissingError: it cannot be imported.
    """
    return _load("rados")


def import_rbd() -> ModuleType:
    """
    The C{rbd} module (and C{rados}, which it needs).

    @raise CephBindingsMissingError: either cannot be imported.
    """
    import_rados()
    return _load("rbd")
