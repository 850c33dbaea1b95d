"""ShortGPT (Men et al., 2024): remove the blocks that change their input the least.

Block Influence BI_i = 1 − mean over calibration tokens of cos(h_in, h_out) for block i;
the k blocks with the lowest BI are removed.
"""

from __future__ import annotations

import torch

from prunekit.methods.base import PruneRequest, register
from prunekit.methods.depth.base import (
    CalibrationPath,
    DepthChoice,
    DepthMethod,
    mean_token_cosine,
    progress,
)
from prunekit.models.loading import LoadedModel


def block_influence(path: CalibrationPath) -> list[float]:
    """BI of every block of the unpruned model, in block order (one pass)."""
    scores = []
    h = path.hidden0
    for index in progress(range(path.lm.adapter.num_layers), "block influence"):
        out = path.run_block(index, h)
        scores.append(1.0 - mean_token_cosine(h, out))
        h = out
    return scores


@register
class ShortGPT(DepthMethod):
    name = "shortgpt"
    summary = "ShortGPT: remove the k blocks with the lowest Block Influence (1 - cos(in, out))"

    def choose(
        self, lm: LoadedModel, calib: torch.Tensor, request: PruneRequest, k: int
    ) -> DepthChoice:
        path = CalibrationPath(lm, calib, request.device, request.batch_size)
        scores = block_influence(path)
        order = sorted(range(len(scores)), key=lambda i: (scores[i], i))
        return DepthChoice(
            order[:k], scores, "block influence (higher = keep)", {"removal_order": order}
        )
