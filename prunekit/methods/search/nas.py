"""NAS structural pruning (Klein et al., 2023, "Structural Pruning of Pre-trained Language
Models via Neural Architecture Search"; 2024, "Structural Pruning of Large Language
Models via Neural Architecture Search"): the pretrained model is a weight-sharing
super-network whose sub-networks keep fewer KV groups, MLP channels and blocks; it is
fine-tuned with the sandwich rule, then searched for the Pareto front of parameters
against validation loss, and one point of the front is cut out.

- **Sub-networks.** Within each block the KV groups and MLP channels are ranked once by a
  width method's scores (`order`: Wanda-SP, from one dense calibration pass, or the
  data-free magnitude-SP) and a sub-network keeps the top k;
  blocks are ranked by ShortGPT's block influence and a sub-network keeps the top l.
  Search space `small` (the papers' SMALL): one count per kind for every block; `layer`
  (LAYER): a count per block. Sub-networks are applied by hooks
  (`surgery.hooks.StructureScales`), so all share the model's weights.
- **Sandwich rule.** Each step sums the losses of the largest sub-network (next-token
  CE), the smallest and `random_subnets` random ones; with `distill` those learn from the
  largest's next-token distribution (in-place distillation, KL). Every weight is trained.
- **Search.** `samples` random sub-networks plus the largest and smallest, each scored by
  its next-token NLL on `eval_windows` held-out calibration windows; the Pareto front is
  the points no other point beats on both parameters and NLL.
- **Export.** `point=-1`: the front's lowest NLL within `--sparsity`'s budget of decoder
  parameters; `point=i`: the front's i-th point (sorted by parameters; the record lists
  the front, and the same seed gives the same front).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from prunekit.engine.training import TrainSettings, train
from prunekit.errors import PrunekitError, choice_error
from prunekit.eval.perplexity import mean_nll, next_token_loss
from prunekit.methods.base import Method, MethodConfig, PruneRequest, register
from prunekit.methods.depth.base import CalibrationPath
from prunekit.methods.depth.shortgpt import block_influence
from prunekit.methods.width.magnitude_sp import MagnitudeSP
from prunekit.methods.width.wanda_sp import WandaSP
from prunekit.models.adapter import ModelAdapter
from prunekit.models.loading import LoadedModel
from prunekit.progress import progress
from prunekit.surgery.depth import remove_blocks
from prunekit.surgery.hooks import StructureScales
from prunekit.surgery.plan import width_cost
from prunekit.surgery.width import (
    block_widths,
    decoder_parameters,
    keep_channels,
    keep_heads,
    update_config_widths,
)

SPACES = ("small", "layer")
ORDERS = {"wanda_sp": WandaSP, "magnitude_sp": MagnitudeSP}
KINDS = ("kv", "intermediate", "layers")

Subnet = dict[str, list[int]]  # kv / intermediate: kept per block; layers: [blocks kept]


@dataclass
class NASConfig(MethodConfig):
    space: str = "small"  # small: one count per kind for all blocks | layer: per block
    kinds: str = "kv,intermediate,layers"  # what sub-networks may shrink
    order: str = "wanda_sp"  # how groups and channels are ranked: wanda_sp | magnitude_sp
    steps: int = 20  # sandwich-rule fine-tuning steps (0: search the pretrained model)
    random_subnets: int = 2  # random sub-networks per step beside the largest and smallest
    lr: float = 1e-4
    distill: bool = True  # smaller sub-networks learn from the largest's distribution
    smallest: float = 0.25  # share of each kind the smallest sub-network keeps
    samples: int = 64  # random sub-networks scored in the search
    eval_windows: int = 4  # calibration windows held out to score sub-networks
    point: int = -1  # front point to export (-1: lowest NLL within the --sparsity budget)

    def __post_init__(self) -> None:
        if self.space not in SPACES:
            raise choice_error("space", self.space, SPACES)
        if self.order not in ORDERS:
            raise choice_error("order", self.order, tuple(ORDERS))
        bad = [k for k in self.kinds.split(",") if k not in KINDS]
        if bad or not self.kinds:
            raise PrunekitError(f"kinds {self.kinds!r} invalid; valid: {', '.join(KINDS)}")
        if self.steps < 0 or self.random_subnets < 0 or self.samples < 0 or self.lr <= 0:
            raise PrunekitError("steps, random_subnets and samples >= 0, lr > 0")
        if not 0 < self.smallest <= 1 or self.eval_windows < 1:
            raise PrunekitError("smallest in (0, 1], eval_windows >= 1")


class SuperNetwork:
    """A model's sub-networks: their masks, parameter counts and losses (weights shared).

    `group_order[i]` / `channel_order[i]`: block i's KV groups / channels, most important
    first; `block_order`: blocks, most influential first.
    """

    def __init__(
        self,
        adapter: ModelAdapter,
        group_order: list[torch.Tensor],
        channel_order: list[torch.Tensor],
        block_order: list[int],
    ):
        self.adapter = adapter
        self.group_order, self.channel_order = group_order, channel_order
        self.block_order = block_order
        self.costs = [width_cost(adapter, block) for block in adapter.blocks]
        widths = [block_widths(adapter, block) for block in adapter.blocks]
        self.full: Subnet = {
            "kv": [w.kv_heads for w in widths],
            "intermediate": [w.intermediate for w in widths],
            "layers": [len(widths)],
        }
        self.scales = StructureScales(adapter)

    def kept_blocks(self, subnet: Subnet) -> list[int]:
        return sorted(self.block_order[: subnet["layers"][0]])

    def parameters(self, subnet: Subnet) -> int:
        """Decoder-block parameters of the cut sub-network."""
        total = 0.0
        for i in self.kept_blocks(subnet):
            total += self.costs[i].at(subnet["kv"][i], subnet["intermediate"][i], 1.0)
        return round(total)

    def select(self, subnet: Subnet) -> None:
        """Set the hooks' scales to `subnet` (0/1 masks)."""

        def top(order: torch.Tensor, count: int) -> torch.Tensor:
            mask = torch.zeros(order.numel())
            mask[order[:count]] = 1.0
            return mask

        kept = set(self.kept_blocks(subnet))
        self.scales.values = {
            "kv": [top(o, k) for o, k in zip(self.group_order, subnet["kv"], strict=True)],
            "intermediate": [
                top(o, k) for o, k in zip(self.channel_order, subnet["intermediate"], strict=True)
            ],
            "layers": [torch.tensor(float(i in kept)) for i in range(len(self.costs))],
        }

    def cut(self, lm: LoadedModel, subnet: Subnet) -> None:
        """Surgery: keep `subnet`'s structures and blocks (the model becomes it)."""
        adapter = self.adapter
        for i, block in enumerate(adapter.blocks):
            if subnet["kv"][i] < self.full["kv"][i]:
                keep_heads(adapter, block, self.group_order[i][: subnet["kv"][i]].tolist())
            if subnet["intermediate"][i] < self.full["intermediate"][i]:
                channels = self.channel_order[i][: subnet["intermediate"][i]].tolist()
                keep_channels(adapter, block, channels)
        update_config_widths(adapter)
        dropped = sorted(set(range(len(self.costs))) - set(self.kept_blocks(subnet)))
        if dropped:
            remove_blocks(adapter, dropped)


def super_network(
    lm: LoadedModel, windows: torch.Tensor, request: PruneRequest, order: str = "wanda_sp"
) -> SuperNetwork:
    """`lm` as a super-network: KV groups and channels ranked by the `order` method's
    scores (from a dense pass over `windows` [n, L] when it needs data), blocks by block
    influence on `windows`."""
    adapter = lm.adapter
    group_order, channel_order = [], []
    ranking = ORDERS[order]()
    for _, _, scores in ranking.block_scores(lm, windows, request, dense=True):
        group_order.append(torch.argsort(scores.groups, descending=True, stable=True))
        channel_order.append(torch.argsort(scores.channels, descending=True, stable=True))
    path = CalibrationPath(lm, windows, request.device, request.batch_size)
    influence = block_influence(path)
    blocks = sorted(range(len(influence)), key=lambda i: (-influence[i], i))
    return SuperNetwork(adapter, group_order, channel_order, blocks)


def pareto_front(points: list[dict]) -> list[dict]:
    """Points not beaten on both `parameters` and `nll` by another, by parameters."""
    front: list[dict] = []
    for point in sorted(points, key=lambda p: (p["parameters"], p["nll"])):
        if not front or point["nll"] < front[-1]["nll"]:
            front.append(point)
    return front


@register
class NAS(Method):
    name = "nas"
    summary = "weight-sharing super-network, sandwich-rule fine-tuning, Pareto search"
    kind = "structured"
    supports_nm = False
    sparsity_meaning = "share of decoder-block parameters removed (the budget of the pick)"
    no_allocation = "the search chooses every block's widths"
    Config = NASConfig

    def _space(self, network: SuperNetwork) -> tuple[Subnet, Subnet, list[str]]:
        """(largest, smallest, kinds that shrink)."""
        kinds = self.config.kinds.split(",")
        if not network.adapter.spec.heads_removable and "kv" in kinds:
            kinds.remove("kv")  # a fused qkv sliced by the config's head counts
        share = self.config.smallest
        smallest = {
            k: [max(1, math.ceil(share * v)) if k in kinds else v for v in network.full[k]]
            for k in KINDS
        }
        if self.config.space == "small":
            smallest = {k: [max(v)] * len(v) if k != "layers" else v for k, v in smallest.items()}
        return network.full, smallest, kinds

    def _sample(
        self, network: SuperNetwork, smallest: Subnet, generator: torch.Generator
    ) -> Subnet:
        """A uniformly random sub-network between `smallest` and the full model."""

        def draw(low: int, high: int) -> int:
            return int(torch.randint(low, high + 1, (1,), generator=generator))

        subnet: Subnet = {}
        for kind in KINDS:
            lows, highs = smallest[kind], network.full[kind]
            if self.config.space == "small" and kind != "layers":
                count = draw(max(lows), min(highs))
                subnet[kind] = [min(count, h) for h in highs]
            else:
                subnet[kind] = [draw(lo, hi) for lo, hi in zip(lows, highs, strict=True)]
        return subnet

    def run(self, lm: LoadedModel, calib: torch.Tensor | None, request: PruneRequest) -> dict:
        config, adapter, model = self.config, lm.adapter, lm.model
        if calib is None or calib.shape[0] <= config.eval_windows:
            have = 0 if calib is None else calib.shape[0]
            raise PrunekitError(
                f"nas holds out eval_windows={config.eval_windows} calibration windows for "
                f"the search and trains on the rest; give --nsamples > {config.eval_windows} "
                f"(got {have})"
            )
        train_windows, held_out = calib[: -config.eval_windows], calib[-config.eval_windows :]
        network = super_network(lm, train_windows, request, config.order)
        largest, smallest, kinds = self._space(network)
        generator = torch.Generator().manual_seed(request.seed)
        before = decoder_parameters(adapter)

        losses = self._fine_tune(lm, network, train_windows, request, largest, smallest)
        points = [largest, smallest] + [
            self._sample(network, smallest, generator) for _ in range(config.samples)
        ]
        scored = []
        model.eval()
        with network.scales.attached():
            for subnet in progress(points, desc="nas search", unit="subnet"):
                network.select(subnet)
                nll = mean_nll(model, held_out, request.batch_size)
                scored.append({"parameters": network.parameters(subnet), "nll": nll, **subnet})
        front = pareto_front(scored)
        chosen = self._pick(front, before, request.sparsity)
        network.cut(lm, {k: chosen[k] for k in KINDS})
        after = decoder_parameters(adapter)
        return {
            "space": config.space,
            "kinds": kinds,
            "fine_tune_loss": {"first": losses[0], "last": losses[-1]} if losses else None,
            "searched": [[p["parameters"], round(p["nll"], 6)] for p in scored],
            "pareto_front": [
                {**p, "nll": round(p["nll"], 6), "removed": round(1 - p["parameters"] / before, 6)}
                for p in front
            ],
            "chosen": front.index(chosen),
            "held_out_nll": round(chosen["nll"], 6),
            "decoder_parameters_before": before,
            "decoder_parameters_after": after,
            "decoder_share_removed": round(1 - after / before, 6),
        }

    def outcome(self, details: dict) -> str:
        front, before = details["pareto_front"], details["decoder_parameters_before"]
        points = ", ".join(
            f"{i}: {1 - p['removed']:.0%} kept / NLL {p['nll']:.3f}" for i, p in enumerate(front)
        )
        return (
            f"{super().outcome(details)}; Pareto front of {len(front)} points ({points}); "
            f"exported point {details['chosen']} (--opt point=i exports another; "
            f"{before:,} decoder parameters dense)"
        )

    def _pick(self, front: list[dict], before: int, sparsity: float) -> dict:
        """The configured point of the front."""
        if self.config.point >= 0:
            if self.config.point >= len(front):
                raise PrunekitError(
                    f"point={self.config.point} but the Pareto front has {len(front)} points; "
                    f"valid: 0..{len(front) - 1} (or -1)"
                )
            return front[self.config.point]
        budget = (1 - sparsity) * before
        within = [p for p in front if p["parameters"] <= budget]
        if not within:
            least = front[0]["parameters"]
            raise PrunekitError(
                f"no searched sub-network has at most {1 - sparsity:.0%} of the decoder "
                f"parameters (the smallest has {least / before:.1%}); lower --sparsity or "
                "--opt smallest"
            )
        return min(within, key=lambda p: p["nll"])

    def _fine_tune(
        self,
        lm: LoadedModel,
        network: SuperNetwork,
        windows: torch.Tensor,
        request: PruneRequest,
        largest: Subnet,
        smallest: Subnet,
    ) -> list[float]:
        """Sandwich-rule steps over `windows`; returns the loss per step."""
        config, model = self.config, lm.model
        if config.steps == 0:
            return []
        batches = list(windows.split(request.batch_size))
        generator = torch.Generator().manual_seed(request.seed + 1)
        params = dict(model.named_parameters())

        def loss_fn(step: int) -> torch.Tensor:
            batch = batches[step % len(batches)]
            network.select(largest)
            logits = model(input_ids=batch, use_cache=False).logits.float()
            loss = next_token_loss(logits, batch)
            teacher = F.log_softmax(logits.detach(), -1).flatten(0, 1)
            others = [smallest] + [
                self._sample(network, smallest, generator) for _ in range(config.random_subnets)
            ]
            for subnet in others:
                network.select(subnet)
                out = model(input_ids=batch, use_cache=False).logits.float()
                if config.distill:
                    student = F.log_softmax(out, -1).flatten(0, 1)
                    loss = loss + F.kl_div(student, teacher, log_target=True, reduction="batchmean")
                else:
                    loss = loss + next_token_loss(out, batch)
            return loss

        settings = TrainSettings(
            steps=config.steps, lr=config.lr, schedule="constant", grad_clip=1.0, save_every=0
        )
        model.train()
        with network.scales.attached():
            stats = train(params, loss_fn, settings, windows.shape[1] * request.batch_size,
                          desc="nas super-network")  # fmt: skip
        model.eval()
        for param in params.values():
            param.requires_grad_(False)
        return [round(v, 6) for v in stats["losses"]]
