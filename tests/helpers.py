"""Small helpers shared by the test files."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

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


def block0_inputs(lm, calib: torch.Tensor, paths) -> dict[str, torch.Tensor]:
    """X [tokens, in] (float64) of each linear `paths` of block 0 on the dense model,
    caught by forward hooks (no prunekit code involved)."""
    block = lm.model.model.layers[0]
    caught: dict[str, list[torch.Tensor]] = {p: [] for p in paths}
    hooks = [
        block.get_submodule(p).register_forward_pre_hook(
            lambda _m, args, p=p: caught[p].append(args[0].reshape(-1, args[0].shape[-1]))
        )
        for p in paths
    ]
    with torch.no_grad():
        for row in calib:
            lm.model(row.unsqueeze(0), use_cache=False)
    for h in hooks:
        h.remove()
    return {p: torch.cat(x).double() for p, x in caught.items()}
