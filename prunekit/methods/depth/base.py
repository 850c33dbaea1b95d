"""Shared parts of the depth methods: how many blocks go, a calibration path through any
subset of the original blocks, and the base class that removes the chosen blocks.

Depth methods score or search on the *original* block indices ("logical" removal, with
each block keeping the call arguments the engine captured for it) and change the model
once at the end, so a search never re-captures inputs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from prunekit.engine.runner import SequentialRunner
from prunekit.errors import PrunekitError
from prunekit.methods.base import Method, MethodConfig, PruneRequest
from prunekit.models.loading import LoadedModel
from prunekit.models.offload import block_in_memory
from prunekit.progress import progress as progress_bar
from prunekit.surgery.depth import remove_blocks
from prunekit.surgery.masks import prune_count


@dataclass
class DepthConfig(MethodConfig):
    """`blocks`: remove exactly this many blocks (instead of `sparsity`; giving both is an
    error, and the record's sparsity becomes blocks / depth)."""

    blocks: int = 0

    def __post_init__(self) -> None:
        """Options are checked when parsed, before any model is loaded."""
        for name in ("blocks", "eval_windows"):
            if getattr(self, name, 0) < 0:
                raise PrunekitError(f"option {name} must be >= 0, got {getattr(self, name)}")


def blocks_to_remove(sparsity: float, blocks: int, num_blocks: int) -> int:
    """k = `blocks` when given, else round(sparsity × num_blocks); at least one block stays."""
    k = blocks if blocks > 0 else prune_count(num_blocks, sparsity)
    if k >= num_blocks:
        raise PrunekitError(
            f"removing {k} of {num_blocks} blocks leaves none; valid: 0..{num_blocks - 1} blocks"
        )
    return k


class CalibrationPath:
    """Calibration windows through any ordered subset of the model's original blocks.

    `hidden0` is block 0's input [n, L, H]; `run(indices, h)` applies those blocks in order;
    `nll(h)` is the mean next-token NLL (nats) of the head on final hidden states `h`.
    """

    def __init__(self, lm: LoadedModel, windows: torch.Tensor, device: str, batch_size: int):
        self.lm = lm
        self.windows = windows
        self.runner = SequentialRunner(
            lm.adapter, windows, device=device, batch_size=batch_size, progress=None
        )
        self.hidden0: torch.Tensor = self.runner.hidden

    @property
    def device(self) -> torch.device:
        return self.runner.device

    @torch.no_grad()
    def run_block(self, index: int, hidden: torch.Tensor) -> torch.Tensor:
        """Original block `index` on `hidden` [n, L, H] (moved to the device meanwhile;
        read from disk and freed again when the model streams)."""
        with block_in_memory(self.lm.adapter, index, keep=False):
            block = self.lm.adapter.blocks[index]
            home = next(block.parameters()).device
            block.to(self.device)
            try:
                return self.runner.run_block(index, hidden)
            finally:
                block.to(home)

    def run(self, indices: Sequence[int], hidden: torch.Tensor | None = None) -> torch.Tensor:
        """Blocks `indices` in order, from `hidden` (default: block 0's input)."""
        h = self.hidden0 if hidden is None else hidden
        for index in indices:
            h = self.run_block(index, h)
        return h

    @torch.no_grad()
    def final(self, hidden: torch.Tensor) -> torch.Tensor:
        """The final norm applied to `hidden` [n, L, H] (what the head sees)."""
        norm = self.lm.adapter.final_norm
        home = next(norm.parameters(), torch.empty(0)).device
        norm.to(self.device)
        try:
            return norm(hidden.to(self.device)).to(hidden.device)
        finally:
            norm.to(home)

    @torch.no_grad()
    def nll(self, hidden: torch.Tensor) -> float:
        """Mean next-token NLL (nats) of final hidden states [n, L, H], window by window."""
        adapter = self.lm.adapter
        head, norm = adapter.lm_head, adapter.final_norm
        total, count = 0.0, 0
        for row, ids in zip(hidden, self.windows, strict=True):
            h = row.unsqueeze(0).to(next(head.parameters()).device)
            logits = head(norm(h))[0, :-1].float()
            targets = ids[1:].to(logits.device)
            total += F.cross_entropy(logits, targets, reduction="sum").item()
            count += targets.numel()
        return total / count


def removal_nlls(
    path: CalibrationPath,
    kept: Sequence[int],
    desc: str,
    candidates: Sequence[int] | None = None,
) -> dict[int, float]:
    """Calibration NLL of the model made of blocks `kept` minus each candidate in turn
    (`candidates`: a subset of `kept`, default all of it).

    One pass stores every kept block's input; candidate i then runs only the blocks after
    it (about len(kept)²/2 block forwards in all). Returns `{block index: NLL (nats)}`.
    """
    chosen = set(kept if candidates is None else candidates)
    inputs, h = [], path.hidden0
    for index in kept:
        inputs.append(h)
        h = path.run_block(index, h)
    nlls = {}
    for pos, index in progress([p for p in enumerate(kept) if p[1] in chosen], desc):
        nlls[index] = path.nll(path.run(kept[pos + 1 :], inputs[pos]))
    return nlls


def first_windows(calib: torch.Tensor, count: int) -> torch.Tensor:
    """The first `count` calibration windows (all when `count` is 0)."""
    return calib[:count] if count else calib


def mean_token_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean over tokens of cos(a_t, b_t) for [n, L, H] tensors (float64 accumulation)."""
    return float(F.cosine_similarity(a.double(), b.double(), dim=-1).mean())


@dataclass
class DepthChoice:
    """Blocks a method removes (original indices) and the scores it based this on."""

    removed: list[int]
    block_scores: list[float | None]  # None: a protected block that was never scored
    score_meaning: str
    extra: dict[str, Any] = field(default_factory=dict)


class DepthMethod(Method):
    """Removes k whole blocks, chosen by `choose`; records indices and every block's score."""

    kind: ClassVar[str] = "depth"
    supports_nm: ClassVar[bool] = False
    sparsity_meaning: ClassVar[str] = "share of decoder blocks removed (round(s x depth))"
    no_allocation: ClassVar[str | None] = "depth methods remove whole blocks"
    Config: ClassVar[type[MethodConfig]] = DepthConfig

    def choose(
        self, lm: LoadedModel, calib: torch.Tensor, request: PruneRequest, k: int
    ) -> DepthChoice:
        """Original indices of the k blocks to remove, with per-block scores."""
        raise NotImplementedError

    def run(self, lm: LoadedModel, calib: torch.Tensor | None, request: PruneRequest) -> dict:
        if calib is None:
            raise PrunekitError(f"method {self.name!r} needs calibration windows")
        num_blocks = lm.adapter.num_layers
        k = blocks_to_remove(request.sparsity, self.config.blocks, num_blocks)
        if self.config.blocks:
            request.sparsity = k / num_blocks
        choice = self.choose(lm, calib, request, k) if k else DepthChoice([], [], "none")
        kept = remove_blocks(lm.adapter, choice.removed)
        if lm.adapter.offload is not None:
            lm.adapter.offload.renumber(kept)
        return {
            "num_blocks_before": num_blocks,
            "num_blocks_after": len(kept),
            "removed_blocks": sorted(choice.removed),
            "kept_blocks": kept,
            "block_scores": [
                None if s is None else round(float(s), 8) for s in choice.block_scores
            ],
            "score_meaning": choice.score_meaning,
            **choice.extra,
        }

    def outcome(self, details: dict) -> str:
        before, after = details["num_blocks_before"], details["num_blocks_after"]
        return (
            f"removed {before - after} of {before} blocks "
            f"({(before - after) / before:.1%} of the depth): {details['removed_blocks']}"
        )


def progress(iterable, desc: str, total: int | None = None):
    """A progress bar over `iterable` (one line, cleared when done)."""
    return progress_bar(iterable, desc=desc, total=total, leave=False)
