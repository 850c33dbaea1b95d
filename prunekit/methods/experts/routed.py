"""The tokens a mixture-of-experts router sends to each expert, as the expert sees them,
and per-expert sums of a statistic of those tokens (what expert_wanda and
expert_sparsegpt prune from)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from prunekit.eval.perplexity import window_nll
from prunekit.methods.base import PruneRequest
from prunekit.models.loading import LoadedModel
from prunekit.surgery.experts import expert_count


def routed_inputs(
    experts: nn.Module, args: tuple
) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """From the arguments of an experts module's forward (`x` [tokens, H], `index`
    [tokens, top_k], ...): per expert reached, `(e, inputs [t, H], hidden [t, I])` with
    the float32 inputs of its fused gate/up weight and of its down weight
    (act(gate) · up)."""
    x, index = args[0], args[1]
    for e in index.unique().tolist():
        tokens, _ = torch.where(index == e)
        inputs = x[tokens].float()
        gate, up = F.linear(inputs, experts.gate_up_proj[e].float()).chunk(2, dim=-1)
        yield e, inputs, experts.act_fn(gate) * up


class RoutedSums:
    """Per expert: Σ `statistic(tokens)` over the tokens routed to it, for its two inputs
    (`x`: the layer input of the fused gate/up weight; `h`: act(gate) · up, the down
    weight's input), and the token count; from a pre-hook on the experts module.

    `statistic` maps float32 tokens [t, F] to a summable tensor (e.g. Σ x² [F], XᵀX
    [F, F]); the sums take its dtype and shape and live on the CPU."""

    def __init__(self, moe: nn.Module, statistic: Callable[[torch.Tensor], torch.Tensor]):
        experts, n = moe.experts, expert_count(moe)
        self.statistic = statistic
        widths = (experts.gate_up_proj.shape[2], experts.down_proj.shape[2])
        empty = [statistic(torch.zeros(0, w)) for w in widths]
        self.x, self.h = (torch.zeros(n, *s.shape, dtype=s.dtype) for s in empty)
        self.count = torch.zeros(n, dtype=torch.long)
        self.handle = experts.register_forward_pre_hook(self.hook)

    @torch.no_grad()
    def hook(self, experts: nn.Module, args: tuple) -> None:
        for e, inputs, hidden in routed_inputs(experts, args):
            self.x[e] += self.statistic(inputs).cpu()
            self.h[e] += self.statistic(hidden).cpu()
            self.count[e] += inputs.shape[0]

    def reached_weights(
        self, moe: nn.Module, unreached: list[int]
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """`(weight [out, in], its input statistic)` for both weights of every expert that
        a calibration token reached; the others' indices are appended to `unreached`."""
        experts = moe.experts
        for e in range(len(self.count)):
            if self.count[e] == 0:
                unreached.append(e)
                continue
            yield experts.gate_up_proj.data[e], self.x[e]
            yield experts.down_proj.data[e], self.h[e]


def routed_pass(lm: LoadedModel, calib: torch.Tensor, request: PruneRequest, stats: list):
    """Run the calibration windows through the model on `request.device` while the
    statistics' hooks (`.handle`) collect, then remove the hooks; returns `stats`."""
    home = next(lm.model.parameters()).device
    lm.model.to(request.device)
    try:
        with torch.no_grad():
            window_nll(lm.model, calib, request.batch_size, desc="expert statistics")
    finally:
        for s in stats:
            s.handle.remove()
        lm.model.to(home)
    return stats
