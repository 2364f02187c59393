# STUB: being written now by the lead developer; the factory signature below is final.
from __future__ import annotations

from twisted.internet.protocol import Factory

from twisted_nbd.exports import ExportRegistry

DEFAULT_MAX_QUEUE_DEPTH = 64
DEFAULT_MAX_BYTES_IN_FLIGHT = 64 * 1024 * 1024


class NBDServerFactory(Factory):
    def __init__(
        self,
        registry: ExportRegistry,
        *,
        max_queue_depth: int = DEFAULT_MAX_QUEUE_DEPTH,
        max_bytes_in_flight: int = DEFAULT_MAX_BYTES_IN_FLIGHT,
    ) -> None:
        self.registry = registry
        self.max_queue_depth = max_queue_depth
        self.max_bytes_in_flight = max_bytes_in_flight
