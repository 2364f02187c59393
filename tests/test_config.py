# -*- test-case-name: tests.test_config -*-
"""
Tests for L{twisted_nbd.config} (the TOML config file and export
specifications) and the block size overrides of L{twisted_nbd.exports}.
"""

from __future__ import annotations

import os
import tempfile
import textwrap

from twisted.trial.unittest import SynchronousTestCase

from twisted_nbd.config import ConfigError, ExportSpec, load_config, parse_size
from twisted_nbd.exports import Export, check_block_sizes
from twisted_nbd.interfaces import Capabilities
from twisted_nbd.limits import DEFAULT_MAX_NEGOTIATING, Limits
from twisted_nbd.testing import ControllableBlockDevice


class ConfigFileTests(SynchronousTestCase):
    """Loading exports from a TOML file."""

    def setUp(self) -> None:
        self.dir = tempfile.mkdtemp()
        self.addCleanup(lambda: __import__("shutil").rmtree(self.dir))
        self.image = os.path.join(self.dir, "disk.raw")
        with open(self.image, "wb") as f:
            f.truncate(1 << 20)

    def write(self, text: str) -> str:
        path = os.path.join(self.dir, "exports.toml")
        with open(path, "w") as f:
            f.write(textwrap.dedent(text))
        return path

    def assert_config_error(self, text: str, line: int, reason: str) -> None:
        path = self.write(text)
        error = self.assertRaises(ConfigError, load_config, path)
        self.assertEqual(str(error).split(": ", 1)[0], f"{path}:{line}", str(error))
        self.assertIn(reason, str(error))

    def test_full_example(self) -> None:
        """Every setting is read; image paths are relative to the file."""
        path = self.write(
            """\
            default = "scratch"

            [[export]]
            name = "disk"
            image = "disk.raw"
            description = "the disk"
            read-only = true

            [[export]]
            name = "scratch"
            memory = "1G"
            min-block = 512
            preferred-block = "8K"
            max-block = "1M"

            [[export]]
            name = "new"
            image = "new.raw"
            size = "64M"
            """
        )
        config = load_config(path)
        self.assertEqual(config.default, "scratch")
        self.assertEqual(
            config.exports,
            [
                ExportSpec("disk", "the disk", True, image=self.image),
                ExportSpec(
                    "scratch",
                    memory=1 << 30,
                    min_block=512,
                    preferred_block=8192,
                    max_block=1 << 20,
                ),
                ExportSpec("new", image=os.path.join(self.dir, "new.raw"), size=64 << 20),
            ],
        )

    def test_syntax_error_has_line(self) -> None:
        """A TOML syntax error names the file and the line."""
        self.assert_config_error('[[export]]\nname = "a"\nmemory = 1G\n', 3, "Expected")

    def test_unknown_key(self) -> None:
        """An unknown export setting is named, with its line."""
        self.assert_config_error(
            '[[export]]\nname = "a"\nmemory = "1M"\n[[export]]\nname = "b"\nmemroy = "1G"\n',
            6,
            "'memroy'",
        )

    def test_missing_image(self) -> None:
        """An image that does not exist, without a size, is refused at the image line."""
        self.assert_config_error(
            '[[export]]\nname = "a"\nimage = "nope.raw"\n', 3, "does not exist"
        )

    def test_two_backends(self) -> None:
        """An export with both an image and a memory size is refused."""
        self.assert_config_error(
            '[[export]]\nname = "a"\nimage = "disk.raw"\nmemory = "1M"\n', 3, "exactly one"
        )

    def test_duplicate_names(self) -> None:
        """Two exports with one name are refused at the second."""
        self.assert_config_error(
            '[[export]]\nname = "a"\nmemory = "1M"\n[[export]]\nname = "a"\nmemory = "1M"\n',
            5,
            "two exports",
        )

    def test_bad_default(self) -> None:
        """A default that names no export is refused."""
        self.assert_config_error('default = "b"\n[[export]]\nname = "a"\nmemory = "1M"\n', 1, "'b'")

    def test_bad_size(self) -> None:
        """A size that is not one is refused with the reason."""
        self.assert_config_error('[[export]]\nname = "a"\nmemory = "lots"\n', 3, "not a size")

    def test_bad_block_sizes(self) -> None:
        """Block sizes that break the protocol's rules are refused, at their line."""
        self.assert_config_error(
            '[[export]]\nname = "a"\nmemory = "1M"\nmin-block = 3000\n', 4, "power of two"
        )

    def test_no_exports(self) -> None:
        """A file without exports is refused."""
        self.assert_config_error('default = "a"\n', 1, "no exports")

    def test_wrong_types(self) -> None:
        """Settings of the wrong type are refused."""
        self.assert_config_error('[[export]]\nname = 5\nmemory = "1M"\n', 2, "string")
        self.assert_config_error(
            '[[export]]\nname = "a"\nmemory = "1M"\nread-only = "yes"\n', 4, "true or false"
        )

    def test_limits_table(self) -> None:
        """A [limits] table sets the connection limits; what it leaves out keeps its default."""
        path = self.write(
            """\
            [[export]]
            name = "a"
            memory = "1M"

            [limits]
            handshake-timeout = 2.5
            idle-timeout = 600
            max-connections = 50
            allow = ["10.0.0.0/8", "::1"]
            """
        )
        limits = load_config(path).limits
        self.assertEqual(
            limits,
            Limits(
                handshake_timeout=2.5,
                idle_timeout=600.0,
                max_connections=50,
                allow=("10.0.0.0/8", "::1/128"),
            ),
        )
        self.assertEqual(limits.max_negotiating, DEFAULT_MAX_NEGOTIATING)
        self.assertEqual(
            load_config(self.write('[[export]]\nname = "a"\nmemory = "1M"\n')).limits, Limits()
        )

    def test_limits_mistakes(self) -> None:
        """Each mistake in [limits] names its line."""
        head = '[[export]]\nname = "a"\nmemory = "1M"\n[limits]\nmax-connections = 5\n'
        self.assert_config_error(head + "max-conections = 5\n", 6, "'max-conections'")
        self.assert_config_error(head + 'handshake-timeout = "soon"\n', 6, "seconds")
        self.assert_config_error(head + "idle-timeout = -1\n", 6, "zero (none) or more")
        self.assert_config_error(head + "max-negotiating = 1.5\n", 6, "whole number")
        self.assert_config_error(head + 'allow = "10.0.0.0/8"\n', 6, "list of networks")
        self.assert_config_error(head + 'allow = ["10.1.2.3/8"]\n', 6, "did you mean 10.0.0.0/8")
        self.assert_config_error('limits = 5\n[[export]]\nname = "a"\nmemory = "1M"\n', 1, "table")

    def test_unreadable_file(self) -> None:
        """A config file that cannot be read gives a clear error."""
        error = self.assertRaises(ConfigError, load_config, os.path.join(self.dir, "none.toml"))
        self.assertIn("cannot read", str(error))


class SizeTests(SynchronousTestCase):
    """L{parse_size}."""

    def test_sizes(self) -> None:
        """Suffixes are powers of 1024; bad sizes raise ValueError."""
        self.assertEqual(parse_size("512"), 512)
        self.assertEqual(parse_size("64k"), 65536)
        self.assertEqual(parse_size("1GiB"), 1 << 30)
        for bad in ("0", "-1", "1GB", "x", "9E"):
            self.assertRaises(ValueError, parse_size, bad)


class BlockSizeTests(SynchronousTestCase):
    """Block size constraints on exports (NBD_INFO_BLOCK_SIZE)."""

    def test_rules(self) -> None:
        """Minimum and preferred are powers of two; maximum at least preferred."""
        check_block_sizes(1, 4096, 32 << 20)
        check_block_sizes(512, 512, 512)
        for bad in (
            (3, 4096, 1 << 20),
            (1, 256, 1 << 20),
            (4096, 4096, 2048),
            (1 << 17, 1 << 17, 1 << 20),
        ):
            self.assertRaises(ValueError, check_block_sizes, *bad)

    def test_export_overrides(self) -> None:
        """An export's block sizes override the device's; a device's larger minimum wins."""
        device = ControllableBlockDevice(1 << 20, Capabilities(min_block=4096))
        export = Export("x", device, min_block=512, max_block=1 << 20)
        caps = export.capabilities
        self.assertEqual(
            (caps.min_block, caps.preferred_block, caps.max_block), (4096, 4096, 1 << 20)
        )
        export = Export("x", ControllableBlockDevice(1 << 20), min_block=65536)
        self.assertEqual(export.capabilities.preferred_block, 65536)

    def test_export_refuses_bad_sizes(self) -> None:
        """An export whose block sizes break the rules cannot be made."""
        self.assertRaises(ValueError, Export, "x", ControllableBlockDevice(1), max_block=100)
