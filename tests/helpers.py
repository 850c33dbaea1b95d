"""Small helpers shared by the test files."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import prunekit

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """`python -m prunekit.cli ARGS` in `cwd` with this checkout's prunekit; output captured."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run(
        [sys.executable, "-m", "prunekit.cli", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


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
