"""
Tests that the built wheel carries the twistd plugin the right way.

C{find_packages()} cannot see C{twisted/plugins} (it has no C{__init__.py},
and must not), so C{setup.py} lists it by hand; this builds a wheel from a
copy of the source tree and looks inside.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from email.parser import Parser
from functools import cache
from pathlib import Path

from twisted.trial.unittest import TestCase

import twisted_nbd

REPO = Path(__file__).resolve().parent.parent

#: Only a guard against a hung build; nothing here depends on speed.
BUILD_TIMEOUT = 300

#: Left out of the copy: version control, caches and earlier build output.
_IGNORE = shutil.ignore_patterns(
    ".git",
    ".venv",
    "venv",
    "build",
    "dist",
    "*.egg-info",
    "__pycache__",
    ".mypy_cache",
    ".ruff_cache",
    ".pytest_cache",
    ".hypothesis",
    "_trial_temp*",
    "tests.*",
)


@cache
def built_wheel() -> tuple[list[str], dict[str, list[str]]]:
    """
    Build the wheel once per test run and describe it.

    The source tree is copied first, and a C{dropin.cache} is planted in the
    copy's plugin directory (as twistd would leave one); the build runs
    without isolation, so it needs no network.

    @return: the wheel's member names and its metadata fields.
    """
    work = Path(tempfile.mkdtemp(prefix="twisted-nbd-wheel-"))
    try:
        source = work / "src"
        shutil.copytree(REPO, source, ignore=_IGNORE)
        (source / "twisted" / "plugins" / "dropin.cache").write_bytes(b"stale")
        out = work / "out"
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "wheel",
                "--no-deps",
                "--no-build-isolation",
                "--no-cache-dir",
                "--disable-pip-version-check",
                "--wheel-dir",
                str(out),
                str(source),
            ],
            cwd=str(work),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=BUILD_TIMEOUT,
        )
        if result.returncode != 0:
            raise AssertionError(f"building the wheel failed:\n{result.stdout}{result.stderr}")
        wheels = list(out.glob("*.whl"))
        if len(wheels) != 1:
            raise AssertionError(f"expected one wheel, found {wheels}")
        with zipfile.ZipFile(wheels[0]) as wheel:
            names = wheel.namelist()
            (metadata_name,) = [n for n in names if n.endswith(".dist-info/METADATA")]
            message = Parser().parsestr(wheel.read(metadata_name).decode("utf-8"))
            fields = {key: message.get_all(key) or [] for key in set(message.keys())}
            (entry_points,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
            # Not a metadata field: kept under a name no field has.
            fields["entry_points.txt"] = [wheel.read(entry_points).decode("utf-8")]
        return names, fields
    finally:
        shutil.rmtree(work, ignore_errors=True)


class WheelTests(TestCase):
    """
    Inspect the built wheel's contents and metadata.
    """

    def setUp(self) -> None:
        self.names, self.metadata = built_wheel()

    def test_dropin_shipped(self) -> None:
        """
        The dropin is in the wheel, at C{twisted/plugins/}.
        """
        self.assertIn("twisted/plugins/twisted_nbd_dropin.py", self.names)

    def test_no_plugin_package_init(self) -> None:
        """
        The wheel has no C{twisted/plugins/__init__.py} or
        C{twisted/__init__.py}, which would replace Twisted's own.
        """
        self.assertNotIn("twisted/plugins/__init__.py", self.names)
        self.assertNotIn("twisted/__init__.py", self.names)
        under_twisted = [n for n in self.names if n.startswith("twisted/")]
        self.assertEqual(under_twisted, ["twisted/plugins/twisted_nbd_dropin.py"])

    def test_entry_points(self) -> None:
        """
        The built-in backends and filters are declared as entry points, the
        same objects L{twisted_nbd.registry} names for an uninstalled tree.
        """
        from configparser import ConfigParser

        from twisted_nbd.registry import BUILTIN_BACKENDS, BUILTIN_FILTERS

        parser = ConfigParser()
        parser.read_string(self.metadata["entry_points.txt"][0])
        self.assertEqual(dict(parser["twisted_nbd.backends"]), BUILTIN_BACKENDS)
        self.assertEqual(dict(parser["twisted_nbd.filters"]), BUILTIN_FILTERS)

    def test_no_dropin_cache(self) -> None:
        """
        No C{dropin.cache} is shipped, even when one lies in the source tree.
        """
        self.assertEqual([n for n in self.names if n.endswith("dropin.cache")], [])

    def test_every_module_shipped(self) -> None:
        """
        Every module of the C{twisted_nbd} source tree is in the wheel, so
        a new subpackage cannot be forgotten in C{setup.py}'s explicit list.
        """
        expected = sorted(
            path.relative_to(REPO).as_posix()
            for path in (REPO / "twisted_nbd").rglob("*.py")
            if "__pycache__" not in path.parts
        )
        shipped = sorted(n for n in self.names if n.startswith("twisted_nbd/"))
        self.assertEqual([n for n in expected if n not in shipped], [])
        self.assertEqual([n for n in shipped if not n.endswith(".py")], ["twisted_nbd/py.typed"])

    def test_typed(self) -> None:
        """
        The package is marked as typed (PEP 561), so type checkers of
        applications that embed it read its annotations.
        """
        self.assertIn("twisted_nbd/py.typed", self.names)

    def test_license(self) -> None:
        """The wheel carries the MIT license and says so."""
        self.assertTrue(
            any(
                n.endswith(".dist-info/licenses/LICENSE") or n.endswith("/LICENSE")
                for n in self.names
            ),
            self.names,
        )
        self.assertIn(
            "MIT",
            " ".join(
                self.metadata.get("License", [])
                + self.metadata.get("License-Expression", [])
                + self.metadata.get("Classifier", [])
            ),
        )

    def test_no_tests(self) -> None:
        """
        The tests are not installed as a top-level C{tests} package.
        """
        self.assertEqual([n for n in self.names if n.startswith("tests/")], [])

    def test_metadata(self) -> None:
        """
        The wheel is named twisted-nbd, has the package's version, needs
        Python 3.11, and depends on Twisted (with its TLS extra),
        zope.interface, pyOpenSSL (a version with what TLS-PSK needs) and
        treq (the http backend).
        """
        self.assertEqual(self.metadata["Name"], ["twisted-nbd"])
        self.assertEqual(self.metadata["Version"], [twisted_nbd.__version__])
        self.assertEqual(self.metadata["Requires-Python"], [">=3.11"])
        requirements = {
            re.split(r"[\s<>=!~;\[]", requirement, maxsplit=1)[0].lower()
            for requirement in self.metadata["Requires-Dist"]
            if "extra ==" not in requirement
        }
        self.assertEqual(requirements, {"twisted", "zope.interface", "pyopenssl", "treq"})
