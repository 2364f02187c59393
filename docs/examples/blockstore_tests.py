"""The conformance tests of docs/examples/blockstore.py (run from tests/test_registry.py)."""

from twisted.trial.unittest import TestCase

from docs.examples.blockstore import BlockStore, ProtectFilter
from twisted_nbd.interfaces import IBlockDevice
from twisted_nbd.testing import BlockDeviceConformanceMixin, FilterConformanceMixin


class BlockStoreTests(BlockDeviceConformanceMixin, TestCase):
    def make_device(self, size: int) -> IBlockDevice:
        return BlockStore(size)


class ProtectFilterTests(FilterConformanceMixin, TestCase):
    def make_filter(self, inner: IBlockDevice) -> IBlockDevice:
        return ProtectFilter(inner, size=0)  # protecting nothing, it changes nothing
