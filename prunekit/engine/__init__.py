"""Engine: the sequential block runner, block-input capture, statistics collectors,
block-wise gradients, and the process-group helpers that merge statistics across ranks.

Calibrates one decoder block at a time (capture its inputs, gather statistics on its
linears, hand them to a method, propagate the outputs). May import models and the
cross-cutting root modules; never a method, an allocation or evaluation.
"""

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
