"""
Tests for backends and filters by name (L{twisted_nbd.registry}): the
C{NAME:key=value} syntax, discovery through entry points, C{--backend} and
C{--filter}, the config file, worker processes, and the authoring API of
L{twisted_nbd.base} (C{async def}, plain values, derived capabilities).
"""

from __future__ import annotations

import io
import json
import os
from contextlib import redirect_stdout
from dataclasses import asdict, replace
from importlib import metadata
from typing import Any, Mapping, cast

from twisted.internet.defer import Deferred
from twisted.internet.testing import MemoryReactorClock
from twisted.python.usage import UsageError
from twisted.trial.unittest import SynchronousTestCase, TestCase

from twisted_nbd import registry as registry_module
from twisted_nbd._wire import Errno
from twisted_nbd.backends import OpenContext
from twisted_nbd.backends.memory import MemoryBlockDevice
from twisted_nbd.base import BlockDevice, BlockDeviceFilter
from twisted_nbd.config import Config, ConfigError, ExportSpec, SpecError, load_config
from twisted_nbd.errors import NBDError
from twisted_nbd.filters import find_filter
from twisted_nbd.filters.cow import CopyOnWriteFilter
from twisted_nbd.filters.stats import StatsFilter
from twisted_nbd.interfaces import IBlockDevice
from twisted_nbd.registry import (
    INT,
    BackendPlugin,
    FilterPlugin,
    Key,
    PluginError,
    PluginRef,
    Registry,
    describe,
    parse_ref,
    registry,
)
from twisted_nbd.service import build
from twisted_nbd.tap import Options
from twisted_nbd.testing import BlockDeviceConformanceMixin
from twisted_nbd.workers import check_workers

MiB = 1 << 20


def parse(*argv: str) -> Options:
    options = Options()
    options.parseOptions(list(argv))
    return options


class SyntaxTests(SynchronousTestCase):
    def test_parse(self) -> None:
        self.assertEqual(parse_ref("cow"), PluginRef("cow"))
        self.assertEqual(
            parse_ref("error:rate=0.01,ops=read+write", "filter"),
            PluginRef("error", (("rate", "0.01"), ("ops", "read+write"))),
        )
        self.assertEqual(str(parse_ref("a:b=1,c=2")), "a:b=1,c=2")
        self.assertEqual(parse_ref("x:help").args, (("help", ""),))
        for bad in [":x=1", "x:y", "x:=1", "-x"]:
            self.assertRaises(PluginError, parse_ref, bad)

    def test_json(self) -> None:
        ref = PluginRef("delay", (("delay", "1ms"), ("seed", 3)))
        self.assertEqual(PluginRef.from_json(json.loads(json.dumps(ref.to_json()))), ref)

    def test_resolve(self) -> None:
        plugin, values = registry.resolve("filter", parse_ref("error:rate=1%,ops=all,errno=enospc"))
        self.assertEqual(values["rate"], 0.01)
        self.assertEqual(len(values["ops"]), 7)
        self.assertEqual(values["errno"].name, "ENOSPC")
        self.assertIsNone(values["seed"])
        _, values = registry.resolve("filter", parse_ref("delay:delay=250us"))
        self.assertAlmostEqual(values["delay"], 0.00025)

    def test_errors_name_plugin_and_key(self) -> None:
        cases = {
            "nosuch": "no filter called 'nosuch'",
            "error:bogus=1": "filter 'error' has no key 'bogus'",
            "error:rate=x": "filter 'error': rate:",
            "error:rate=1,rate=2": "'rate' is given twice",
            "error:errno=EWHAT": "filter 'error': errno:",
            "offset": "filter 'offset' needs offset=SIZE",
            "cow:overlay=disk": "filter 'cow': overlay:",
        }
        for text, fragment in cases.items():
            with self.assertRaises(PluginError) as caught:
                registry.resolve("filter", parse_ref(text, "filter"))
            self.assertIn(fragment, str(caught.exception))
            self.assertNotIn("\n", str(caught.exception))

    def test_describe(self) -> None:
        text = describe(registry.get("filter", "error"))
        self.assertIn("filter error:", text)
        self.assertIn("rate=RATE", text)
        self.assertIn("[default: EIO]", text)
        self.assertIn("(required)", describe(registry.get("backend", "pattern")))


class DiscoveryTests(SynchronousTestCase):
    def test_builtins_load(self) -> None:
        for kind in ("backend", "filter"):
            names = registry.names(kind)
            self.assertEqual([p.name for p in registry.all(kind)], names)
        self.assertIn("cow", registry.names("filter"))

    def test_entry_points(self) -> None:
        """A third-party package's entry point is found like a built-in."""
        point = metadata.EntryPoint(
            name="thirdparty", value="tests.test_registry:thirdparty_plugin", group="g"
        )
        clash = metadata.EntryPoint(name="cow", value="elsewhere:plugin", group="g")

        def fake(group: str) -> list[metadata.EntryPoint]:
            return [point, clash] if group == registry_module.FILTER_GROUP else []

        self.patch(registry_module, "_entry_points", fake)
        found = Registry()
        self.assertIs(found.get("filter", "thirdparty"), thirdparty_plugin)
        # A third party cannot replace a built-in.
        self.assertEqual(found.get("filter", "cow").name, "cow")
        self.assertEqual(len(self.flushLoggedErrors()), 0)

    def test_bad_entry_point(self) -> None:
        found = Registry(builtin_filters={"broken": "no.such.module:plugin"})
        with self.assertRaises(PluginError) as caught:
            found.get("filter", "broken")
        self.assertIn("cannot be loaded", str(caught.exception))


class _Doubler(BlockDeviceFilter):
    pass


thirdparty_plugin = FilterPlugin(
    name="thirdparty",
    help="a filter from elsewhere",
    keys=(Key("n", INT, 1, "a number"),),
    wrap=lambda inner, values, context: _Doubler(inner),
)


class CommandLineTests(TestCase):
    def test_backend(self) -> None:
        options = parse("--backend", "pattern:size=1M", "--filter", "stats", "--filter", "cow")
        (spec,) = options.config.exports
        self.assertEqual(spec.backend, "pattern")
        self.assertEqual([f.name for f in spec.filters], ["stats", "cow"])

    def test_image_shorthand(self) -> None:
        """--backend file:... is --image, --backend memory:... is --memory."""
        path = os.path.abspath(self.mktemp())
        (spec,) = parse("--backend", f"file:path={path},size=1M").config.exports
        self.assertEqual((spec.image, spec.size, spec.backend_ref), (path, MiB, None))
        (spec,) = parse("--backend", "memory:size=2M").config.exports
        self.assertEqual((spec.memory, spec.backend_ref), (2 * MiB, None))
        self.assertEqual(parse("--memory", "2M").config.exports[0], spec)

    def test_help_lists(self) -> None:
        text = str(Options())
        for name in ("pattern", "cow", "readonly", "error", "stats", "blocksize"):
            self.assertIn(f"  {name} ", text)

    def test_plugin_help_exits(self) -> None:
        out = io.StringIO()
        with redirect_stdout(out), self.assertRaises(SystemExit) as caught:
            parse("--filter", "cow:help")
        self.assertEqual(caught.exception.code, 0)
        self.assertIn("block-size=SIZE", out.getvalue())

    def test_bad_usage(self) -> None:
        cases = [
            (["--backend", "nosuch"], "--backend: there is no backend called 'nosuch'"),
            (["--memory", "1M", "--filter", "error:rate=5"], "--filter: filter 'error': rate:"),
            (["--memory", "1M", "--filter", "cow:nokey=1"], "filter 'cow' has no key 'nokey'"),
            (["--backend", "pattern"], "backend 'pattern' needs size=SIZE"),
            (["--backend", "pattern:size=1M", "--memory", "1M"], "cannot be used together"),
            (["--backend", "pattern:size=1M", "--backend", "pattern:size=1M"], "given twice"),
        ]
        for argv, fragment in cases:
            with self.assertRaises(UsageError, msg=argv) as caught:
                parse(*argv)
            self.assertIn(fragment, str(caught.exception))
            self.assertNotIn("\n", str(caught.exception))

    def test_misfit_at_build(self) -> None:
        """A filter that does not fit its device stops twistd with one line."""
        from twisted_nbd.tap import makeService

        options = parse("--memory", "1M", "--filter", "offset:offset=2M")
        with self.assertRaises(SystemExit) as caught:
            makeService(options, MemoryReactorClock())
        self.assertIn("filter 'offset': offset:", str(caught.exception.code))

    def test_workers(self) -> None:
        """Filters travel to workers; those with one state per export are refused."""
        (spec,) = parse("--memory", "1M", "--filter", "stats", "-w", "2").config.exports
        again = ExportSpec.from_json(json.loads(json.dumps(asdict(spec))))
        self.assertEqual(again, spec)
        with self.assertRaises(UsageError) as caught:
            parse("--memory", "1M", "--filter", "cow", "-w", "2")
        self.assertIn("'cow' filter keeps one state per export", str(caught.exception))
        with self.assertRaises(UsageError):
            parse("--backend", "pattern:size=1M", "-w", "2")


class ConfigFileTests(TestCase):
    def load(self, text: str) -> Config:
        path = self.mktemp()
        with open(path, "w") as f:
            f.write(text)
        return load_config(path)

    def test_backend_and_filters(self) -> None:
        config = self.load(
            "[[export]]\n"
            'name = "a"\n'
            'backend = "pattern:size=1M"\n'
            'filters = ["cow:overlay=memory", {name = "delay", delay = 0.001, ops = ["read"]}]\n'
            "[[export]]\n"
            'name = "b"\n'
            'backend = {name = "file", path = "disk.raw", size = "1M"}\n'
            "[[export]]\n"
            'name = "c"\n'
            'backend = {name = "memory", size = 1048576}\n'
        )
        a, b, c = config.exports
        self.assertEqual(a.backend, "pattern")
        self.assertEqual([f.name for f in a.filters], ["cow", "delay"])
        self.assertTrue(b.image is not None and os.path.isabs(b.image))
        self.assertEqual(b.size, MiB)
        self.assertEqual(c.memory, MiB)

    def test_errors_point_at_the_key(self) -> None:
        with self.assertRaises(ConfigError) as caught:
            self.load('[[export]]\nname = "a"\nmemory = "1M"\nfilters = ["error:rate=9"]\n')
        self.assertIn(":4:", str(caught.exception))
        self.assertIn("filter 'error': rate:", str(caught.exception))
        with self.assertRaises(ConfigError) as caught:
            self.load('[[export]]\nname = "a"\nbackend = "nosuch"\n')
        self.assertIn(":3:", str(caught.exception))


class BuildTests(SynchronousTestCase):
    def test_stack_built(self) -> None:
        """Filters wrap the backend once per export, the first outermost."""
        config = Config(
            [
                ExportSpec(
                    name="x",
                    memory=MiB,
                    filters=(parse_ref("stats"), parse_ref("cow:overlay=memory")),
                )
            ],
            listen=("tcp:0:interface=127.0.0.1",),
        )
        service = build(config, MemoryReactorClock())
        device = service.registry.exports["x"].device
        self.assertIsInstance(device, StatsFilter)
        self.assertIsInstance(find_filter(device, CopyOnWriteFilter), CopyOnWriteFilter)

    def test_bad_filter(self) -> None:
        spec = ExportSpec(memory=MiB, filters=(parse_ref("nosuch"),))
        with self.assertRaises(SpecError) as caught:
            spec.check()
        self.assertEqual(caught.exception.setting, "filters")

    def test_per_connection(self) -> None:
        """rate:per=connection is a layer of each connection, outside the export's filters."""
        from twisted_nbd.exports import ConnectionContext
        from twisted_nbd.filters.rate import RateFilter

        spec = ExportSpec(
            name="x",
            memory=MiB,
            filters=(parse_ref("rate:rate=1M,per=connection"), parse_ref("cow:overlay=memory")),
        )
        service = build(Config([spec], listen=("tcp:0:interface=127.0.0.1",)), MemoryReactorClock())
        export = service.registry.exports["x"]
        self.assertIsInstance(export.device, CopyOnWriteFilter)
        one, two = export.attach(ConnectionContext("x")), export.attach(ConnectionContext("x"))
        self.assertIsInstance(one.device, RateFilter)
        self.assertIsNot(one.device, two.device)
        self.assertIs(cast(RateFilter, one.device).inner, export.device)
        self.successResultOf(one.device.close())
        self.successResultOf(export.device.write(0, b"still open"))
        # Allowed with workers: each process has its own connections anyway.
        check_workers(Config([replace(spec, filters=spec.filters[:1])], workers=2))
        wrong = replace(spec, filters=tuple(reversed(spec.filters)))
        with self.assertRaises(SpecError) as caught:
            wrong.check()
        self.assertIn("must come before", str(caught.exception))

    def test_check_workers(self) -> None:
        config = Config([ExportSpec(memory=MiB, filters=(parse_ref("cache"),))], workers=2)
        self.assertRaises(ConfigError, check_workers, config)


# The authoring API.


class AsyncDevice(BlockDevice):
    """A backend written with async def and plain values."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.data = bytearray(size)
        self.flushes = 0

    async def read(self, offset: int, length: int) -> bytes:  # type: ignore[override]
        return bytes(self.data[offset : offset + length])

    def write(self, offset: int, data: bytes, fua: bool = False) -> None:  # type: ignore[override]
        self.data[offset : offset + len(data)] = data

    async def flush(self) -> None:  # type: ignore[override]
        self.flushes += 1


class AsyncDeviceConformance(BlockDeviceConformanceMixin, TestCase):
    def make_device(self, size: int) -> IBlockDevice:
        return AsyncDevice(size)


class AuthoringTests(SynchronousTestCase):
    def test_derived_capabilities(self) -> None:
        caps = AsyncDevice.capabilities
        self.assertTrue(caps.can_write and caps.can_flush and caps.can_fua and caps.can_zero)
        self.assertFalse(caps.can_trim or caps.can_cache or caps.can_extents)
        self.assertFalse(caps.can_fast_zero)

        class ReadOnly(BlockDevice):
            def read(self, offset: int, length: int) -> bytes:  # type: ignore[override]
                return bytes(length)

        self.assertFalse(ReadOnly.capabilities.can_write)
        self.assertFalse(ReadOnly.capabilities.can_flush)

    def test_plain_values_and_errors(self) -> None:
        # Callers see IBlockDevice: every method returns a Deferred.
        device: IBlockDevice = AsyncDevice(16)
        self.assertIsNone(self.successResultOf(device.write(0, b"ab")))
        self.assertEqual(self.successResultOf(device.read(0, 2)), b"ab")
        self.failureResultOf(device.write(0, None))  # type: ignore[arg-type]

    def test_fua_emulated(self) -> None:
        """A backend that does not handle FUA gets a flush after the write."""
        device = AsyncDevice(16)
        served: IBlockDevice = device
        self.successResultOf(served.write(0, b"a", fua=True))
        self.assertEqual(device.flushes, 1)

    def test_async_filter(self) -> None:
        class Upper(BlockDeviceFilter):
            async def read(self, offset: int, length: int) -> bytes:  # type: ignore[override]
                return bytes(await self.inner.read(offset, length)).upper()

        inner = MemoryBlockDevice(16)
        self.successResultOf(inner.write(0, b"abc"))
        served: IBlockDevice = Upper(inner)
        d: Deferred[bytes] = served.read(0, 3)
        self.assertEqual(self.successResultOf(d), b"ABC")

    def test_backend_plugin(self) -> None:
        """A backend plugin made in a few lines opens by name."""
        opened: list[Mapping[str, Any]] = []

        def open_(values: Mapping[str, Any], context: OpenContext) -> IBlockDevice:
            opened.append(values)
            return AsyncDevice(values["n"])

        plugin = BackendPlugin("mine", "mine", (Key("n", INT, help="size"),), open_)
        registry.add(plugin)
        self.addCleanup(registry.remove, plugin)
        device = registry.open_backend(parse_ref("mine:n=0x10"), OpenContext(None))
        self.assertEqual(device.size, 16)
        self.assertEqual(opened, [{"n": 16}])


# The documentation's example backend and filter (docs/examples/blockstore.py).

from docs.examples import blockstore  # noqa: E402
from docs.examples.blockstore_tests import BlockStoreTests, ProtectFilterTests  # noqa: E402

__all__ = ["BlockStoreTests", "ProtectFilterTests"]


class ExampleTests(SynchronousTestCase):
    def test_by_name(self) -> None:
        """Added to the registry (as entry points would), they serve by name."""
        for plugin in (blockstore.backend, blockstore.protect):
            registry.add(plugin)
            self.addCleanup(registry.remove, plugin)
        options = parse("--backend", "blockstore:size=1M", "--filter", "protect:size=4K")
        service = build(
            replace(options.config, listen=("tcp:0:interface=127.0.0.1",)), MemoryReactorClock()
        )
        device: IBlockDevice = service.registry.exports[""].device
        self.assertIsInstance(device, blockstore.ProtectFilter)
        failure = self.failureResultOf(device.write(100, b"x"), NBDError)
        self.assertEqual(failure.value.errno, Errno.EPERM)
        self.successResultOf(device.write(8192, b"x"))
        self.assertEqual(self.successResultOf(device.read(8192, 2)), b"x\0")


class PageTests(SynchronousTestCase):
    def test_every_plugin_and_key_listed(self) -> None:
        """docs/backends-and-filters.md has a row for each built-in, naming every key."""
        from pathlib import Path

        page = (
            Path(__file__).resolve().parents[1] / "docs" / "backends-and-filters.md"
        ).read_text()
        rows = {line.split("`")[1]: line for line in page.splitlines() if line.startswith("| `")}
        for kind in ("backend", "filter"):
            for plugin in registry.all(kind):
                if plugin.name not in registry_module.BUILTIN_BACKENDS and (
                    plugin.name not in registry_module.BUILTIN_FILTERS
                ):
                    continue
                self.assertIn(plugin.name, rows)
                for key in plugin.keys:
                    self.assertIn(f"`{key.name}=", rows[plugin.name], plugin.name)
