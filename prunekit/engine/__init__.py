"""The sequential block engine and the statistics collectors."""

from prunekit.engine.capture import BlockCall, CapturedInputs, capture_inputs
from prunekit.engine.collectors import COLLECTORS, Collector
from prunekit.engine.runner import BlockContext, LayerStats, SequentialRunner, attach_collectors

__all__ = [
    "COLLECTORS",
    "BlockCall",
    "BlockContext",
    "CapturedInputs",
    "Collector",
    "LayerStats",
    "SequentialRunner",
    "attach_collectors",
    "capture_inputs",
]
