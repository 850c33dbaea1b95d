"""SLEB (Song et al., 2024): greedy block elimination by calibration perplexity.

One block at a time, remove the block whose removal raises the calibration perplexity
least, then re-evaluate every remaining candidate. This costs about n²/2 block forwards
per removed block, so it uses only the first `eval_windows` calibration windows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from prunekit.methods.base import PruneRequest, register
from prunekit.methods.depth_base import (
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
    """`eval_windows`: calibration windows used for perplexity (0 = all of them)."""

    eval_windows: int = 8


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
        kept = list(range(lm.adapter.num_layers))
        removed, steps, first_ppl = [], [], None
        for step in range(k):
            nlls = removal_nlls(path, kept, f"SLEB step {step + 1}/{k}")
            if first_ppl is None:
                first_ppl = [math.exp(nlls[i]) for i in kept]
            best = min(kept, key=lambda i: (nlls[i], i))
            kept.remove(best)
            removed.append(best)
            steps.append({"removed": best, "calib_ppl": round(math.exp(nlls[best]), 6)})
        return DepthChoice(
            removed,
            first_ppl or [],
            "calibration perplexity with the block removed from the full model (higher = keep)",
            {"removal_order": removed, "greedy_steps": steps, "eval_windows": len(windows)},
        )
