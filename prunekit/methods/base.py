"""The method base class, the common request, and the method registry.

A method is one file in its family's folder (`unstructured/`, `width/`, `depth/`) with a
class decorated by `@register`. `Method.run(lm, calib, request)` may do anything; each
family's driver (`unstructured/layerwise.py`, `width/base.py`, `depth/base.py`) narrows
that to the few functions a method of the family implements.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch

from prunekit.models.loading import LoadedModel
from prunekit.options import Options
from prunekit.registry import Registry
from prunekit.surgery.masks import Pattern, Target


@dataclass
class MethodConfig(Options):
    """Options of a method beyond the common ones; subclasses add typed fields."""


@dataclass
class PruneRequest:
    """The common part of a pruning run, shared by every method.

    `sparsity` is the mean target (share of weights zeroed, or of structure removed);
    `layer_sparsity` optionally gives one ratio per block (allocation). `propagate` says
    whether block i+1 is calibrated on the pruned ("pruned", as the papers do) or the dense
    ("dense", one pass per block) outputs of block i. `compute_dtype` is the precision of
    the calibration forwards ("auto": the weights' dtype; "bfloat16" / "float16":
    autocast, statistics and solves still float32).
    """

    sparsity: float
    pattern: Pattern = field(default_factory=Pattern)
    scope: str = "row"
    device: str = "cpu"
    batch_size: int = 8
    seed: int = 0
    propagate: str = "pruned"
    layer_sparsity: list[float] | None = None
    compute_dtype: str = "auto"

    def target(self, block_index: int) -> Target:
        ratio = self.layer_sparsity[block_index] if self.layer_sparsity else self.sparsity
        if self.pattern.is_nm:
            ratio = self.pattern.sparsity
        return Target(ratio, self.pattern, self.scope)


class Method:
    """A pruning method: `run` changes `lm.model` in place and returns facts to record."""

    name: ClassVar[str]
    summary: ClassVar[str]
    kind: ClassVar[str] = "unstructured"  # unstructured | structured | depth | lowrank
    Config: ClassVar[type[MethodConfig]] = MethodConfig
    needs_calibration: ClassVar[bool] = True
    supports_nm: ClassVar[bool] = True
    # where unstructured masks compare weights when --scope is not given: "row" (each
    # output row keeps the same share) or "layer" (one threshold per matrix), as the
    # method's reference implementation does
    default_scope: ClassVar[str] = "row"
    # why a non-uniform `--allocation` does not apply to this method (None: it does)
    no_allocation: ClassVar[str | None] = None
    # whether its calibration forwards run through the engine at a chosen precision
    # (`PruneRequest.compute_dtype`); methods that need float32 gradients or their own
    # forwards say False and run in the weights' dtype
    compute_dtypes: ClassVar[bool] = False
    # whether it works on one block at a time in order, so a model whose blocks are on
    # disk (`--offload disk`) can be pruned block by block; methods that need the whole
    # model at once (global selection, whole-model perplexity, gradients) say False
    streams: ClassVar[bool] = False
    # whether ranks of a process group can each calibrate on their share of the windows:
    # the method reads data only through the engine's collectors (merged across ranks)
    distributes: ClassVar[bool] = False
    # what `--sparsity` means for this method (shown by `prunekit methods` and --help)
    sparsity_meaning: ClassVar[str] = "share of weights zeroed in every pruned linear"

    def __init__(self, config: MethodConfig | None = None):
        self.config = config if config is not None else self.Config()

    def run(self, lm: LoadedModel, calib: torch.Tensor | None, request: PruneRequest) -> dict:
        """Prune `lm` with calibration windows `calib` [n, L]; return extra facts to record."""
        raise NotImplementedError

    def outcome(self, details: dict) -> str | None:
        """One line saying what `--sparsity` became in this run (from `run`'s facts), or
        None when the achieved sparsity says it all."""
        if "decoder_share_removed" not in details:
            return None
        return (
            f"decoder-block parameters {details['decoder_parameters_before']:,} -> "
            f"{details['decoder_parameters_after']:,} ({details['decoder_share_removed']:.1%} "
            "removed; embeddings and head are not counted)"
        )


REGISTRY: Registry[type[Method]] = Registry("method")
register = REGISTRY.register
get_method = REGISTRY.lookup
