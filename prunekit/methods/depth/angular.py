"""Angular distance (Gromov et al., "The Unreasonable Ineffectiveness of the Deeper
Layers"): remove the contiguous run of k blocks whose input and output point the most
alike.

d(l, k) = arccos(cos(h_l, h_{l+k})) / π, where h_l is block l's input and h_{l+k} the
output of block l+k−1; taken at the last token of each calibration window (the paper's
choice) or averaged over all tokens (`tokens=all`), then averaged over windows. The run
l..l+k−1 with the smallest d is removed. Each block's own score is d(i, 1).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from prunekit.errors import choice_error
from prunekit.methods.base import PruneRequest, register
from prunekit.methods.depth.base import (
    CalibrationPath,
    DepthChoice,
    DepthConfig,
    DepthMethod,
    progress,
)
from prunekit.models.loading import LoadedModel

TOKEN_MODES = ("last", "all")


def angular_distance(a: torch.Tensor, b: torch.Tensor, tokens: str) -> float:
    """Mean arccos(cos(a, b)) / π of [n, L, H] states at the last token or over all tokens."""
    if tokens == "last":
        a, b = a[:, -1], b[:, -1]
    cos = F.cosine_similarity(a.double(), b.double(), dim=-1).clamp(-1.0, 1.0)
    return float((torch.arccos(cos) / torch.pi).mean())


def run_distances(path: CalibrationPath, k: int, tokens: str) -> tuple[list[float], list[float]]:
    """(d(l, k) for every start l, d(i, 1) for every block i) in one pass over the blocks.

    Only the last k+1 block boundaries are kept in memory.
    """
    num_blocks = path.lm.adapter.num_layers
    window: deque[torch.Tensor] = deque([path.hidden0], maxlen=k + 1)
    runs, singles = [], []
    h = path.hidden0
    for index in progress(range(num_blocks), "angular distance"):
        out = path.run_block(index, h)
        singles.append(angular_distance(h, out, tokens))
        window.append(out)
        if index + 1 >= k:
            runs.append(angular_distance(window[0], window[-1], tokens))
        h = out
    return runs, singles


@dataclass
class AngularConfig(DepthConfig):
    """`tokens`: "last" (the paper) or "all" (average over every token)."""

    tokens: str = "last"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.tokens not in TOKEN_MODES:
            raise choice_error("tokens mode", self.tokens, TOKEN_MODES)


@register
class AngularDistance(DepthMethod):
    name = "angular"
    summary = "Gromov et al.: remove the contiguous run of k blocks with least angular change"
    Config = AngularConfig
    streams = True  # one pass over the blocks in order

    def choose(
        self, lm: LoadedModel, calib: torch.Tensor, request: PruneRequest, k: int
    ) -> DepthChoice:
        tokens = self.config.tokens
        path = CalibrationPath(lm, calib, request.device, request.batch_size)
        runs, singles = run_distances(path, k, tokens)
        start = min(range(len(runs)), key=lambda s: (runs[s], s))
        return DepthChoice(
            list(range(start, start + k)),
            singles,
            "angular distance of the block alone, d(i, 1) (higher = keep)",
            {"run_start": start, "run_distances": [round(d, 8) for d in runs]},
        )
