"""ShortGPT (Men et al., 2024): remove the blocks that change their input the least.

Block Influence BI_i = 1 − mean over calibration tokens of cos(h_in, h_out) for block i;
the k blocks with the lowest BI are removed. The reference (icip-cas/ShortGPT) reads
h_in / h_out from transformers' `hidden_states`, whose last entry is the final norm's
output, so the last block is scored against its normed output; `final_norm=false`
scores its raw output like every other block.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from prunekit.methods.base import PruneRequest, register
from prunekit.methods.depth.base import (
    CalibrationPath,
    DepthChoice,
    DepthConfig,
    DepthMethod,
    mean_token_cosine,
    progress,
)
from prunekit.models.loading import LoadedModel


@dataclass
class ShortGPTConfig(DepthConfig):
    final_norm: bool = True  # score the last block on the final norm's output (reference)


def block_influence(path: CalibrationPath, final_norm: bool = True) -> list[float]:
    """BI of every block of the unpruned model, in block order (one pass)."""
    scores = []
    h = path.hidden0
    last = path.lm.adapter.num_layers - 1
    for index in progress(range(last + 1), "block influence"):
        out = path.run_block(index, h)
        scored = path.final(out) if final_norm and index == last else out
        scores.append(1.0 - mean_token_cosine(h, scored))
        h = out
    return scores


@register
class ShortGPT(DepthMethod):
    name = "shortgpt"
    summary = "ShortGPT: remove the k blocks with the lowest Block Influence (1 - cos(in, out))"
    Config = ShortGPTConfig
    streams = True  # one pass over the blocks in order

    def choose(
        self, lm: LoadedModel, calib: torch.Tensor, request: PruneRequest, k: int
    ) -> DepthChoice:
        path = CalibrationPath(lm, calib, request.device, request.batch_size)
        scores = block_influence(path, self.config.final_norm)
        order = sorted(range(len(scores)), key=lambda i: (scores[i], i))
        return DepthChoice(
            order[:k], scores, "block influence (higher = keep)", {"removal_order": order}
        )
