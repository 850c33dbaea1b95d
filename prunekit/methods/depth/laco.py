"""LaCo (Yang et al., 2024): collapse runs of consecutive blocks into one.

A merge folds blocks l+1..l+m−1 into block l by adding their parameter differences,
θ_l ← θ_l + Σ_j (θ_{l+j} − θ_l) (the linears' weights and biases; block l keeps its
norms), then drops them. The scan runs from the top of the model down, as the reference's
does: its first candidate run ends just below the final block, which is never merged. A
merge is accepted when the merged model's final representations (after the final norm)
keep a mean token cosine similarity of at least `threshold` with the original model's on
calibration text; after an accepted merge the scan skips `interval` blocks. When a full
scan removes fewer than k blocks, the threshold drops by at least `threshold_step`, and
at least to that scan's best similarity, and the scan restarts, until exactly k blocks
are gone (the last merge takes only as many blocks as still needed).
"""

from __future__ import annotations

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
    mean_token_cosine,
    progress,
)
from prunekit.models.loading import LoadedModel
from prunekit.surgery.depth import merge_into, mergeable_parameters


@dataclass
class LaCoConfig(DepthConfig):
    """`merge`: blocks collapsed into one per merge (≥ 2); `threshold`: minimum cosine
    similarity of final representations; `threshold_step`: the least it drops after a
    scan that fell short; `interval`: blocks skipped after a merge; `lowest`: lowest
    block a merge may start at; `eval_windows`: calibration windows used (0 = all);
    `scores`: also record the one-shot merge similarity of every start block (about
    n²/2 extra block forwards)."""

    merge: int = 3
    threshold: float = 0.9
    threshold_step: float = 0.05
    interval: int = 2
    lowest: int = 1
    eval_windows: int = 8
    scores: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.merge < 2:
            raise PrunekitError(f"option merge must be >= 2 blocks, got {self.merge}")
        if self.threshold_step <= 0 or self.interval < 1:
            raise PrunekitError("options threshold_step must be > 0 and interval >= 1")


class _Search:
    """The current model as groups of original blocks; group[0] holds the merged weights."""

    def __init__(self, lm: LoadedModel, path: CalibrationPath):
        self.lm, self.path = lm, path
        self.groups = [[i] for i in range(lm.adapter.num_layers)]
        self.reference = path.final(path.run(range(lm.adapter.num_layers)))
        self.inputs: list[torch.Tensor] = []

    @property
    def bases(self) -> list[int]:
        return [g[0] for g in self.groups]

    def refresh_inputs(self) -> None:
        """Inputs of every current block (valid while merges happen above them only)."""
        self.inputs, h = [], self.path.hidden0
        for base in self.bases:
            self.inputs.append(h)
            h = self.path.run_block(base, h)

    def similarity(self, pos: int, count: int) -> float:
        """Similarity to the original after merging current blocks pos..pos+count−1."""
        bases = self.bases
        h = self.path.run(bases[pos : pos + 1] + bases[pos + count :], self.inputs[pos])
        return mean_token_cosine(self.path.final(h), self.reference)

    def _merge(self, pos: int, count: int) -> None:
        bases = self.bases
        merge_into(self.lm.adapter, bases[pos], bases[pos + 1 : pos + count])

    def merged_similarity(self, pos: int, count: int) -> float:
        """Similarity after merging current blocks pos..pos+count−1; the merge is undone."""
        block = self.lm.adapter.blocks[self.bases[pos]]
        params = mergeable_parameters(self.lm.adapter, block)
        backup = {name: p.detach().clone() for name, p in params.items()}
        self._merge(pos, count)
        try:
            return self.similarity(pos, count)
        finally:
            with torch.no_grad():
                for name, p in params.items():
                    p.copy_(backup[name])

    def accept(self, pos: int, count: int) -> list[int]:
        """Merge current blocks pos..pos+count−1 for good; returns the merged group."""
        self._merge(pos, count)
        merged = [i for g in self.groups[pos : pos + count] for i in g]
        self.groups[pos : pos + count] = [merged]
        return merged


@register
class LaCo(DepthMethod):
    name = "laco"
    summary = "LaCo: merge runs of blocks by parameter differences while outputs stay similar"
    Config = LaCoConfig

    def choose(
        self, lm: LoadedModel, calib: torch.Tensor, request: PruneRequest, k: int
    ) -> DepthChoice:
        c = self.config
        num_blocks = lm.adapter.num_layers
        if not 0 <= c.lowest < num_blocks - 1:
            raise PrunekitError(f"option lowest must be in 0..{num_blocks - 2}, got {c.lowest}")
        if num_blocks - c.lowest - 2 < k:
            raise PrunekitError(
                f"only {num_blocks - c.lowest - 2} blocks lie between block {c.lowest} and the "
                f"final block; cannot remove {k} by merging (lower the option lowest)"
            )
        windows = first_windows(calib, c.eval_windows)
        search = _Search(lm, CalibrationPath(lm, windows, request.device, request.batch_size))
        search.refresh_inputs()
        starts = range(num_blocks - 2) if c.scores else range(0)
        scores = [
            search.merged_similarity(p, min(c.merge, num_blocks - 1 - p))
            for p in progress(starts, "LaCo one-shot scores")
        ]
        merges, threshold, removed = [], c.threshold, 0
        while removed < k:
            search.refresh_inputs()
            pos = max(len(search.groups) - 1 - c.merge, c.lowest)
            best = -1.0
            while pos >= c.lowest and removed < k:
                count = min(c.merge, k - removed + 1, len(search.groups) - 1 - pos)
                sim = search.merged_similarity(pos, count)
                best = max(best, sim)
                if sim < threshold:
                    pos -= 1
                    continue
                group = search.accept(pos, count)
                merges.append(
                    {"blocks": group, "similarity": round(sim, 6), "threshold": round(threshold, 6)}
                )
                removed += count - 1
                pos = min(pos - c.interval, len(search.groups) - 1 - c.merge)
            if removed < k:  # the next scan accepts at least this scan's best merge
                threshold = min(threshold - c.threshold_step, best)
        kept = set(search.bases)
        return DepthChoice(
            [i for i in range(num_blocks) if i not in kept],
            scores,
            f"per start block (all but the last two): final-representation cosine similarity "
            f"after merging it with the next {c.merge - 1} (higher = merge first)",
            {
                "merges": merges,
                "final_threshold": round(threshold, 6),
                "eval_windows": len(windows),
            },
        )
