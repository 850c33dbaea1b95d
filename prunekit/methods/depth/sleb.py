"""SLEB (Song et al., 2024): greedy block elimination by calibration perplexity.

One block at a time, remove the block whose removal raises the calibration perplexity
least, then re-evaluate every remaining candidate. The first `protect_first` and last
`protect_last` blocks are never candidates (the reference's `early_barrier=1`,
`latter_barrier=1`). This costs about n²/2 block forwards per removed block, so it uses
only the first `eval_windows` calibration windows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from prunekit.errors import PrunekitError
from prunekit.methods.base import PruneRequest, register
from prunekit.methods.depth.base import (
    CalibrationPath,
    DepthChoice,
    DepthConfig,
    DepthMethod,
    first_windows,
    removal_nlls,
)
from prunekit.models.loading import LoadedModel


@dataclass
class SLEBConfig(DepthConfig):
    """`eval_windows`: calibration windows used for perplexity (0 = all of them);
    `protect_first` / `protect_last`: blocks at either end that are never removed."""

    eval_windows: int = 8
    protect_first: int = 1
    protect_last: int = 1


@register
class SLEB(DepthMethod):
    name = "sleb"
    summary = "SLEB: greedily remove the block whose removal hurts calibration perplexity least"
    Config = SLEBConfig

    def choose(
        self, lm: LoadedModel, calib: torch.Tensor, request: PruneRequest, k: int
    ) -> DepthChoice:
        windows = first_windows(calib, self.config.eval_windows)
        path = CalibrationPath(lm, windows, request.device, request.batch_size)
        num_blocks = lm.adapter.num_layers
        first, last = self.config.protect_first, self.config.protect_last
        kept = list(range(num_blocks))
        candidates = [i for i in kept if first <= i < num_blocks - last]
        if len(candidates) < k:
            raise PrunekitError(
                f"sleb protects the first {first} and last {last} of {num_blocks} blocks, "
                f"leaving {len(candidates)} candidates for {k} removals; lower "
                "--opt protect_first / protect_last"
            )
        removed, steps, first_ppl = [], [], None
        for step in range(k):
            nlls = removal_nlls(path, kept, f"SLEB step {step + 1}/{k}", candidates)
            if first_ppl is None:
                first_ppl = [math.exp(nlls[i]) if i in nlls else None for i in kept]
            best = min(candidates, key=lambda i: (nlls[i], i))
            kept.remove(best)
            candidates.remove(best)
            removed.append(best)
            steps.append({"removed": best, "calib_ppl": round(math.exp(nlls[best]), 6)})
        return DepthChoice(
            removed,
            first_ppl or [],
            "calibration perplexity with the block removed from the full model (higher = keep)",
            {
                "removal_order": removed,
                "greedy_steps": steps,
                "eval_windows": len(windows),
                "protect_first": first,
                "protect_last": last,
            },
        )
