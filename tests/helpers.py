"""Small helpers shared by the test files."""

from __future__ import annotations

import prunekit


def quick_prune(lm, method, pattern="unstructured", sparsity=0.5, **kw):
    """`prunekit.prune` with 8 x 64 calibration tokens of Tiny Shakespeare."""
    return prunekit.prune(
        lm,
        method,
        sparsity=sparsity if pattern == "unstructured" else None,
        pattern=pattern,
        calib="tinyshakespeare",
        nsamples=8,
        seqlen=64,
        **kw,
    )
