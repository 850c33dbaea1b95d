"""Hard-concrete gates (Louizos, Welling and Kingma, 2018) over a model's structures, as
Sheared LLaMA (Xia et al., 2024) uses them: one gate per KV group and per MLP channel of
every block, one per block, and one per residual (hidden) dimension of the model.

A gate with log-odds `a` samples z = clamp(sigmoid((log u − log(1 − u) + a) / β)·(ζ − γ) + γ,
0, 1) with u ~ U(0, 1) in training, so z is exactly 0 or 1 with positive probability; its
probability of being nonzero, 1 − Q(0) = sigmoid(a − β·log(−γ / ζ)), is the expected L0.
The expected parameter count is a differentiable function of these probabilities.

The gate values act on the model through `surgery.hooks.StructureScales`.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from prunekit.models.adapter import ModelAdapter
from prunekit.surgery.hooks import StructureScales
from prunekit.surgery.plan import WidthCost, width_cost
from prunekit.surgery.width import block_widths

BETA, GAMMA, ZETA = 2.0 / 3.0, -0.1, 1.1
LOG_ALPHA_RANGE = (math.log(1e-2), math.log(1e2))  # the references' `constrain_parameters`
SOFT_SCALE = 0.8  # LLM-Shearing's `magical_number` in its deterministic gates
KINDS = ("kv", "intermediate", "layers", "hidden")
MODEL_WIDE = ("layers", "hidden")  # one set of gates for the model, not one per block


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

    def constrain(self) -> None:
        """Clamp the log-odds into `LOG_ALPHA_RANGE`, as LLM-Shearing and CoFi do before
        every forward pass."""
        with torch.no_grad():
            self.log_alpha.clamp_(*LOG_ALPHA_RANGE)


def keep_of(log_alpha: float) -> float:
    """P(z ≠ 0) of a gate with log-odds `log_alpha`."""
    return 1.0 / (1.0 + math.exp(-(log_alpha - BETA * math.log(-GAMMA / ZETA))))


class ModelGates(nn.Module):
    """Gates over every block's KV groups and MLP channels, the blocks and the hidden
    dimensions. `values` holds the gate values the hooks apply, per kind a list: one
    tensor per block for kv / intermediate, one scalar per block for layers, and one
    [hidden] tensor for hidden."""

    def __init__(self, adapter: ModelAdapter, keep: float = 0.95):
        super().__init__()
        self.adapter = adapter
        self.kv = nn.ModuleList()
        self.intermediate = nn.ModuleList()
        self.costs: list[WidthCost] = []
        for block in adapter.blocks:
            widths = block_widths(adapter, block)
            self.kv.append(HardConcrete(widths.kv_heads, keep))
            self.intermediate.append(HardConcrete(widths.intermediate, keep))
            self.costs.append(width_cost(adapter, block))
        self.layers = HardConcrete(len(adapter.blocks), keep)
        self.hidden = HardConcrete(adapter.hidden_size, keep)
        self.scales = StructureScales(adapter)

    def gates(self) -> dict[str, list[HardConcrete]]:
        """Every kind's gate modules, per block for kv / intermediate."""
        return {
            "kv": list(self.kv),
            "intermediate": list(self.intermediate),
            "layers": [self.layers],
            "hidden": [self.hidden],
        }

    def widths(self) -> dict[str, list[int]]:
        """Gates per module of each kind."""
        return {k: [len(g.log_alpha) for g in v] for k, v in self.gates().items()}

    def constrain(self) -> None:
        """Clamp every gate's log-odds (once per training step, before sampling)."""
        for gates in self.gates().values():
            for gate in gates:
                gate.constrain()

    def expected_counts(self) -> dict[str, torch.Tensor]:
        """Expected kept KV groups [blocks], channels [blocks], blocks and hidden
        dimensions (scalars)."""
        return {
            "kv": torch.stack([g.keep_probability().sum() for g in self.kv]),
            "intermediate": torch.stack([g.keep_probability().sum() for g in self.intermediate]),
            "layers": self.layers.keep_probability().sum(),
            "hidden": self.hidden.keep_probability().sum(),
        }

    def expected_parameters(self) -> torch.Tensor:
        """Expected decoder-block parameters: Σ_blocks P(block)·cost(E[groups],
        E[channels], E[hidden] / D) (LLM-Shearing's products of expected scores)."""
        counts, layer = self.expected_counts(), self.layers.keep_probability()
        hidden = counts["hidden"] / len(self.hidden.log_alpha)
        total = torch.zeros(())
        for i, cost in enumerate(self.costs):
            kept = cost.at(counts["kv"][i], counts["intermediate"][i], hidden)
            total = total + layer[i] * kept
        return total

    @staticmethod
    def _as_values(kind: str, per_gate: list[torch.Tensor]) -> list[torch.Tensor]:
        return list(per_gate[0].unbind()) if kind == "layers" else per_gate

    def deterministic_values(self) -> dict[str, list[torch.Tensor]]:
        """Test-time gate values of every kind (detached)."""
        with torch.no_grad():
            return {
                k: self._as_values(k, [g.deterministic() for g in v])
                for k, v in self.gates().items()
            }

    def draw(self, generator: torch.Generator | None) -> None:
        """Set the gate values used by the hooks: sampled (training) or fixed 0/1 masks
        from `binary_masks` when `generator` is None."""
        if generator is None:
            masks = self.binary_masks()
            self.values = {k: [m.float() for m in v] for k, v in masks.items()}
            return
        self.values = {
            k: self._as_values(k, [g.sample(generator) for g in v]) for k, v in self.gates().items()
        }

    def binary_masks(self, targets: dict[str, int] | None = None) -> dict[str, list[torch.Tensor]]:
        """Kept structures as booleans: per block (model-wide for layers and hidden) the
        top-`targets[kind]` gates by log-odds (Sheared LLaMA's final selection), or gates
        with P(z ≠ 0) > 0.5 without targets."""

        def top(gates: HardConcrete, count: int | None) -> torch.Tensor:
            scores = gates.log_alpha.detach()
            if count is None:
                return gates.keep_probability().detach() > 0.5
            keep = torch.zeros_like(scores, dtype=torch.bool)
            keep[torch.argsort(scores, descending=True, stable=True)[:count]] = True
            return keep

        targets = targets or {}
        return {
            k: self._as_values(k, [top(g, targets.get(k)) for g in v])
            for k, v in self.gates().items()
        }

    def soft_values(self, masks: dict[str, list[torch.Tensor]]) -> dict[str, list[torch.Tensor]]:
        """LLM-Shearing's deterministic gates: sigmoid(log-odds / β · 0.8) on the structures
        `masks` keeps, 0 on the others."""
        with torch.no_grad():
            soft = {
                k: [torch.sigmoid(g.log_alpha / BETA * SOFT_SCALE) for g in v]
                for k, v in self.gates().items()
            }
        soft = {k: self._as_values(k, v) for k, v in soft.items()}
        return {k: [s * m.float() for s, m in zip(soft[k], masks[k], strict=True)] for k in soft}

    @contextmanager
    def attached(self, hidden: bool = False) -> Iterator[ModelGates]:
        """The hooks of `StructureScales` applying the current `values` (hidden gates
        only with `hidden`)."""
        with self.scales.attached(hidden):
            yield self

    @property
    def values(self) -> dict[str, list[torch.Tensor]]:
        return self.scales.values

    @values.setter
    def values(self, values: dict[str, list[torch.Tensor]]) -> None:
        self.scales.values = values
