"""Hard-concrete gates (Louizos, Welling and Kingma, 2018) over a model's structures, as
Sheared LLaMA (Xia et al., 2024) uses them: one gate per KV group and per MLP channel of
every block, and one per block.

A gate with log-odds `a` samples z = clamp(sigmoid((log u − log(1 − u) + a) / β)·(ζ − γ) + γ,
0, 1) with u ~ U(0, 1) in training, so z is exactly 0 or 1 with positive probability; its
probability of being nonzero, 1 − Q(0) = sigmoid(a − β·log(−γ / ζ)), is the expected L0.
The expected parameter count is a differentiable function of these probabilities.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from prunekit.models.adapter import ModelAdapter
from prunekit.surgery.plan import block_costs
from prunekit.surgery.width import block_widths

BETA, GAMMA, ZETA = 2.0 / 3.0, -0.1, 1.1
KINDS = ("kv", "intermediate", "layers")


class HardConcrete(nn.Module):
    """`n` hard-concrete gates; `log_alpha` [n] initialised so P(z ≠ 0) = `keep`."""

    def __init__(self, n: int, keep: float = 0.95):
        super().__init__()
        start = math.log(keep / (1 - keep)) + BETA * math.log(-GAMMA / ZETA)
        self.log_alpha = nn.Parameter(torch.full((n,), start))

    def sample(self, generator: torch.Generator) -> torch.Tensor:
        """Training gates z [n] in [0, 1]."""
        u = torch.rand(self.log_alpha.shape, generator=generator).clamp(1e-6, 1 - 1e-6)
        s = torch.sigmoid((u.log() - (1 - u).log() + self.log_alpha) / BETA)
        return (s * (ZETA - GAMMA) + GAMMA).clamp(0.0, 1.0)

    def deterministic(self) -> torch.Tensor:
        """Test-time gates z [n] = clamp(sigmoid(a)·(ζ − γ) + γ, 0, 1) (Louizos et al.)."""
        return (torch.sigmoid(self.log_alpha) * (ZETA - GAMMA) + GAMMA).clamp(0.0, 1.0)

    def keep_probability(self) -> torch.Tensor:
        """P(z ≠ 0) [n]: the expected L0 norm per gate."""
        return torch.sigmoid(self.log_alpha - BETA * math.log(-GAMMA / ZETA))


@dataclass(frozen=True)
class BlockCost:
    """Parameters of one KV group and one MLP channel of a block, and the block's others."""

    group: int
    channel: int
    fixed: int  # parameters that go only with the whole block (norms)


class ModelGates(nn.Module):
    """Gates over every block's KV groups and MLP channels and over the blocks."""

    def __init__(self, adapter: ModelAdapter, keep: float = 0.95):
        super().__init__()
        self.adapter = adapter
        self.kv = nn.ModuleList()
        self.intermediate = nn.ModuleList()
        self.costs: list[BlockCost] = []
        for block in adapter.blocks:
            widths, costs = block_widths(adapter, block), block_costs(adapter, block)
            self.kv.append(HardConcrete(widths.kv_heads, keep))
            self.intermediate.append(HardConcrete(widths.intermediate, keep))
            total = sum(p.numel() for p in block.parameters())
            fixed = total - widths.kv_heads * costs.group - widths.intermediate * costs.channel
            self.costs.append(BlockCost(costs.group, costs.channel, fixed))
        self.layers = HardConcrete(len(adapter.blocks), keep)
        self.head_width = adapter.head_dim * (adapter.num_heads // adapter.num_kv_heads)
        self.values: dict[str, list[torch.Tensor]] = {}

    def expected_counts(self) -> dict[str, torch.Tensor]:
        """Expected kept KV groups [blocks], channels [blocks] and blocks (scalar)."""
        return {
            "kv": torch.stack([g.keep_probability().sum() for g in self.kv]),
            "intermediate": torch.stack([g.keep_probability().sum() for g in self.intermediate]),
            "layers": self.layers.keep_probability().sum(),
        }

    def expected_parameters(self) -> torch.Tensor:
        """Expected decoder-block parameters: Σ_blocks P(block)·(fixed + E[groups]·group
        + E[channels]·channel)."""
        counts, layer = self.expected_counts(), self.layers.keep_probability()
        total = torch.zeros(())
        for i, cost in enumerate(self.costs):
            width = cost.fixed + counts["kv"][i] * cost.group
            total = total + layer[i] * (width + counts["intermediate"][i] * cost.channel)
        return total

    def deterministic_values(self) -> dict[str, list[torch.Tensor]]:
        """Test-time gate values of every kind (detached)."""
        with torch.no_grad():
            return {
                "kv": [g.deterministic() for g in self.kv],
                "intermediate": [g.deterministic() for g in self.intermediate],
                "layers": list(self.layers.deterministic().unbind()),
            }

    def draw(self, generator: torch.Generator | None) -> None:
        """Set the gate values used by the hooks: sampled (training) or fixed 0/1 masks
        from `binary_masks` when `generator` is None."""
        if generator is None:
            masks = self.binary_masks()
            self.values = {k: [m.float() for m in v] for k, v in masks.items()}
            return
        self.values = {
            "kv": [g.sample(generator) for g in self.kv],
            "intermediate": [g.sample(generator) for g in self.intermediate],
            "layers": list(self.layers.sample(generator).unbind()),
        }

    def binary_masks(self, targets: dict[str, int] | None = None) -> dict[str, list[torch.Tensor]]:
        """Kept structures as booleans: per block the top-`targets[kind]` gates by log-odds
        (Sheared LLaMA's final selection), or gates with P(z ≠ 0) > 0.5 without targets."""

        def top(gates: HardConcrete, count: int | None) -> torch.Tensor:
            scores = gates.log_alpha.detach()
            if count is None:
                return gates.keep_probability().detach() > 0.5
            keep = torch.zeros_like(scores, dtype=torch.bool)
            keep[torch.argsort(scores, descending=True, stable=True)[:count]] = True
            return keep

        targets = targets or {}
        return {
            "kv": [top(g, targets.get("kv")) for g in self.kv],
            "intermediate": [top(g, targets.get("intermediate")) for g in self.intermediate],
            "layers": list(top(self.layers, targets.get("layers")).unbind()),
        }

    @contextmanager
    def attached(self) -> Iterator[ModelGates]:
        """Hooks applying the current `values`: KV groups and channels scale the inputs of
        o and down; a block gate z gives x + z·(block(x) − x)."""
        adapter, handles = self.adapter, []

        def scale(kind: str, index: int, repeat: int):
            def fn(module: nn.Module, args: tuple) -> tuple:
                x = args[0]
                gate = self.values[kind][index].repeat_interleave(repeat).to(x.dtype)
                return (x * gate, *args[1:])

            return fn

        def skip(index: int):
            def fn(module: nn.Module, args: tuple, kwargs: dict, output):
                x = args[0] if args else kwargs["hidden_states"]
                z = self.values["layers"][index].to(x.dtype)
                out = output[0] if isinstance(output, tuple) else output
                mixed = x + z * (out - x)
                return (mixed, *output[1:]) if isinstance(output, tuple) else mixed

            return fn

        for i, block in enumerate(adapter.blocks):
            o, down = adapter.linear(block, "o"), adapter.linear(block, "down")
            handles.append(o.register_forward_pre_hook(scale("kv", i, self.head_width)))
            handles.append(down.register_forward_pre_hook(scale("intermediate", i, 1)))
            handles.append(block.register_forward_hook(skip(i), with_kwargs=True))
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()
