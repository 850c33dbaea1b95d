"""Shortened LLaMA (Kim et al., 2024): one-shot removal of the least important blocks.

`criterion=ppl`: a block's importance is the calibration perplexity of the model with
only that block removed. `criterion=taylor` (Taylor+): importance is Σ |W ⊙ ∂L/∂W| over
the block's weights, with gradients of the language-modelling loss summed over a few
calibration windows. With either criterion the first `keep_first` and last `keep_last`
blocks are never removed, as in the reference. The k least important blocks are removed
at once (no re-evaluation, unlike SLEB).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from prunekit.errors import PrunekitError, choice_error
from prunekit.methods.base import PruneRequest, register
from prunekit.methods.depth.base import (
    CalibrationPath,
    DepthChoice,
    DepthConfig,
    DepthMethod,
    first_windows,
    progress,
    removal_nlls,
)
from prunekit.models.loading import LoadedModel

CRITERIA = ("ppl", "taylor")


def taylor_block_scores(lm: LoadedModel, windows: torch.Tensor, device: str) -> list[float]:
    """Σ |W ⊙ Σ_windows ∂L/∂W| over each block's weights, L the mean token NLL per window."""
    model = lm.model
    home = next(model.parameters()).device
    model.to(device)
    model.zero_grad(set_to_none=True)
    try:
        with torch.enable_grad():
            for row in progress(windows, "taylor gradients"):
                ids = row.unsqueeze(0).to(device)
                model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
        scores = []
        for block in lm.adapter.blocks:
            total = 0.0
            for name, param in block.named_parameters():
                if name.endswith("weight") and param.grad is not None:
                    total += float((param.detach() * param.grad).abs().sum())
            scores.append(total)
    finally:
        model.zero_grad(set_to_none=True)
        model.to(home)
    return scores


@dataclass
class ShortenedLlamaConfig(DepthConfig):
    """`criterion`: ppl or taylor; `eval_windows`: calibration windows used (0 = all);
    `keep_first` / `keep_last`: blocks never removed (with either criterion)."""

    criterion: str = "ppl"
    eval_windows: int = 8
    keep_first: int = 4
    keep_last: int = 2

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.criterion not in CRITERIA:
            raise choice_error("criterion", self.criterion, CRITERIA)


@register
class ShortenedLlama(DepthMethod):
    name = "shortened_llama"
    summary = "Shortened LLaMA: one-shot removal by block PPL or Taylor+ importance"
    Config = ShortenedLlamaConfig

    def choose(
        self, lm: LoadedModel, calib: torch.Tensor, request: PruneRequest, k: int
    ) -> DepthChoice:
        config = self.config
        num_blocks = lm.adapter.num_layers
        windows = first_windows(calib, config.eval_windows)
        first, last = config.keep_first, config.keep_last
        candidates = list(range(max(first, 0), num_blocks - max(last, 0)))
        if len(candidates) < k:
            raise PrunekitError(
                f"shortened_llama keeps the first {first} and last {last} of {num_blocks} "
                f"blocks, leaving {len(candidates)} candidates for {k} removals; lower "
                "--opt keep_first / keep_last"
            )
        extra = {
            "criterion": config.criterion,
            "eval_windows": len(windows),
            "keep_first": first,
            "keep_last": last,
        }
        if config.criterion == "ppl":
            path = CalibrationPath(lm, windows, request.device, request.batch_size)
            nlls = removal_nlls(path, range(num_blocks), "block PPL", candidates)
            scores = [math.exp(nlls[i]) if i in nlls else None for i in range(num_blocks)]
            meaning = "calibration perplexity with only this block removed (higher = keep)"
        else:
            scores = taylor_block_scores(lm, windows, request.device)
            meaning = "Taylor importance sum |W * dL/dW| of the block (higher = keep)"
        order = sorted(candidates, key=lambda i: (scores[i], i))
        return DepthChoice(order[:k], scores, meaning, {**extra, "removal_order": order})
