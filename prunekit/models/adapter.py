"""ModelAdapter: where an architecture keeps its blocks, linears, norms and heads.

Methods never name architectures: they ask the adapter for blocks, for the linears of a
block by role (q, k, v, o, gate, up, down, ...) and for the head geometry.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch
from torch import nn
from transformers import PretrainedConfig
from transformers.pytorch_utils import Conv1D

ATTENTION_ROLES = ("q", "k", "v", "qkv", "o")
MLP_ROLES = ("gate", "up", "gate_up", "down")


@dataclass(frozen=True)
class FamilySpec:
    """Module paths of one architecture family, relative to the model or to a block.

    `linears` maps a role to its path inside a block. Roles: q, k, v, o (separate
    attention projections), qkv (fused attention input), gate, up, down (GLU MLP),
    gate_up (fused GLU input); a plain MLP uses up (fc1) and down (fc2).
    `glu` is True when the MLP is act(gate(x)) * up(x).
    `norm_kind` says how the residual-stream norms scale: "rms" (x / rms(x) · w),
    "rms_offset" (x / rms(x) · (1 + w), Gemma) or "layer" (LayerNorm with bias).
    `output_norms` is True when sublayer outputs are normalised before the residual add
    (Gemma 2/3), so the residual stream is not only touched by pre-norms.
    `qkv_layout` says how a fused qkv linear orders its output rows: "stacked" is
    [all q | all k | all v] (GPT-2, Phi-3), "per_head" is [q_h, k_h, v_h] for each head
    h (GPT-NeoX). `heads_removable` is False where the attention slices its fused
    projection by the config's head counts (shared by all layers), so surgery cannot
    give one layer fewer heads.
    `moe` is the path of a block's mixture-of-experts module (router `gate` [experts, H],
    fused expert weights `experts.gate_up_proj` [E, 2I, H] / `experts.down_proj` [E, H, I],
    optionally `shared_expert`), empty for dense MLPs.
    """

    model_types: tuple[str, ...]
    blocks: str
    final_norm: str
    embed: str
    linears: dict[str, str]
    norms: dict[str, str] = field(default_factory=dict)
    glu: bool = True
    norm_kind: str = "rms"
    output_norms: bool = False
    qkv_layout: str = ""
    heads_removable: bool = True
    moe: str = ""


def get_path(root: nn.Module, path: str) -> nn.Module:
    """`get_path(model, "model.layers")` follows dotted attribute names."""
    module = root
    for part in path.split("."):
        module = getattr(module, part)
    return module


def set_path(root: nn.Module, path: str, value: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(get_path(root, parent) if parent else root, name, value)


def weight_matrix(module: nn.Module) -> torch.Tensor:
    """The weight of a linear-like module as an [out_features, in_features] view.

    GPT-2's `Conv1D` stores [in, out]; its transpose is returned (a view, so in-place
    writes reach the module).
    """
    if isinstance(module, Conv1D):
        return module.weight.data.t()
    return module.weight.data


def as_weight_parameter(module: nn.Module, matrix: torch.Tensor) -> torch.Tensor:
    """An [out, in] matrix in the layout of `module.weight` (transposed for `Conv1D`)."""
    return matrix.t() if isinstance(module, Conv1D) else matrix


def set_weight_matrix(module: nn.Module, weight: torch.Tensor) -> None:
    """Write an [out, in] matrix back into a linear-like module, keeping its dtype."""
    target = weight_matrix(module)
    target.copy_(weight.to(target.dtype))


def context_length(config: PretrainedConfig) -> int | None:
    """Longest sequence a model of `config` accepts (tokens), or None when unbounded."""
    return getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)


class BlockStore(Protocol):
    """Where the decoder blocks live when they are not in memory (`offload.DiskBlocks`)."""

    prefix: str  # state-dict prefix of the blocks, e.g. "model.layers."
    files: dict[str, Path]  # checkpoint tensor name -> safetensors file
    counts: dict[int, dict[str, tuple[int, int]]]  # block -> linear -> (zeros, weights)

    def load(self, index: int) -> None: ...
    def unload(self, index: int, keep: bool) -> None: ...
    def staged(self, index: int) -> Path: ...
    def names(self, index: int) -> list[str]: ...
    def missing(self) -> list[int]: ...
    def block_bytes(self, index: int) -> int: ...


class ModelAdapter:
    """Architecture-independent view of a causal LM (`transformers` PreTrainedModel)."""

    def __init__(self, model: nn.Module, spec: FamilySpec):
        self.model = model
        self.spec = spec
        self.config = model.config
        self.offload: BlockStore | None = None  # blocks streamed from disk (offload.py)

    # -- structure -------------------------------------------------------------------
    @property
    def blocks(self) -> nn.ModuleList:
        return get_path(self.model, self.spec.blocks)

    @property
    def final_norm(self) -> nn.Module:
        return get_path(self.model, self.spec.final_norm)

    @property
    def embed(self) -> nn.Module:
        return get_path(self.model, self.spec.embed)

    @property
    def lm_head(self) -> nn.Module:
        return self.model.get_output_embeddings()

    def moe(self, block: nn.Module) -> nn.Module | None:
        """The block's mixture-of-experts module, or None for a dense MLP."""
        return get_path(block, self.spec.moe) if self.spec.moe else None

    def linears(self, block: nn.Module) -> dict[str, nn.Module]:
        """Prunable linears of a block, `{path inside block: module}`, attention first."""
        return {path: get_path(block, path) for path in self.spec.linears.values()}

    def linear(self, block: nn.Module, role: str) -> nn.Module:
        return get_path(block, self.spec.linears[role])

    def role(self, path: str) -> str:
        """Role ("q", "down", ...) of a linear given its path inside a block."""
        for role, p in self.spec.linears.items():
            if p == path:
                return role
        raise KeyError(path)

    def norm(self, block: nn.Module, role: str) -> nn.Module:
        return get_path(block, self.spec.norms[role])

    def set_norm(self, block: nn.Module, role: str, module: nn.Module) -> None:
        set_path(block, self.spec.norms[role], module)

    def norm_scale(self, norm: nn.Module) -> torch.Tensor:
        """Per-channel scale an RMS norm applies after normalising: [hidden] (float32)."""
        scale = norm.weight.data.float()
        return scale + 1 if self.spec.norm_kind == "rms_offset" else scale

    @staticmethod
    def norm_eps(norm: nn.Module) -> float:
        return float(getattr(norm, "variance_epsilon", None) or norm.eps)

    def set_final_norm(self, module: nn.Module) -> None:
        set_path(self.model, self.spec.final_norm, module)

    def set_embed(self, module: nn.Module) -> None:
        set_path(self.model, self.spec.embed, module)

    # -- geometry --------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return len(self.blocks)

    @property
    def hidden_size(self) -> int:
        c = self.config
        return getattr(c, "hidden_size", None) or c.n_embd

    @property
    def num_heads(self) -> int:
        c = self.config
        return getattr(c, "num_attention_heads", None) or c.n_head

    @property
    def num_kv_heads(self) -> int:
        return getattr(self.config, "num_key_value_heads", None) or self.num_heads

    @property
    def head_dim(self) -> int:
        return getattr(self.config, "head_dim", None) or self.hidden_size // self.num_heads

    @property
    def group_width(self) -> int:
        """Input columns of o per KV group: head_dim x query heads per KV group."""
        return self.head_dim * (self.num_heads // self.num_kv_heads)

    @property
    def max_context(self) -> int | None:
        """Longest sequence the model accepts (tokens), or None when unbounded."""
        return context_length(self.config)

    @property
    def model_type(self) -> str:
        return self.config.model_type

    def describe(self) -> str:
        return (
            f"{self.model_type}: {self.num_layers} blocks, hidden {self.hidden_size}, "
            f"{self.num_heads} heads ({self.num_kv_heads} KV), head_dim {self.head_dim}"
        )
