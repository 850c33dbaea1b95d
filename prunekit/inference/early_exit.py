"""Early exit (AdaInfer, Fan et al., 2024): stop the forward pass per input when an
intermediate layer already predicts what the last layer would.

After block l the hidden state goes through the final norm and the LM head; the
features are the top probability and the gap between the top two probabilities. A
logistic regression, trained on calibration text with label "layer l's top-1 token
equals the last layer's", gives the probability that stopping is safe; the input stops
at the first block where it reaches `threshold`.

Stopping is per input: the whole sequence goes through the same blocks and the decision
is taken at its last token. Because block l's output at position t depends only on
blocks ≤ l and positions ≤ t, every position of a window can be scored as the input that
ends there, from one full forward pass (`EarlyExitPolicy.score`).

```
policy = prunekit.inference.early_exit.fit(lm, calib)        # calib: [n, L] token windows
policy.score(lm, windows)                          # average layers, agreement, NLL
policy.generate(lm, ids, max_new_tokens=20)        # greedy, exits early at each step
```
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

from prunekit.errors import PrunekitError
from prunekit.models.adapter import ModelAdapter
from prunekit.models.loading import LoadedModel
from prunekit.progress import progress as tqdm

FEATURES = ("top_prob", "top2_gap")


@contextlib.contextmanager
def block_outputs(adapter: ModelAdapter) -> Iterator[list[torch.Tensor]]:
    """Collect every block's output hidden states [B, L, H] while the context is open."""
    outputs: list[torch.Tensor] = []

    def hook(module, args, output):
        outputs.append(output[0] if isinstance(output, tuple) else output)

    handles = [block.register_forward_hook(hook) for block in adapter.blocks]
    try:
        yield outputs
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def head_logits(adapter: ModelAdapter, hidden: torch.Tensor) -> torch.Tensor:
    """Logits of intermediate hidden states through the final norm and LM head: [..., V].

    A model's final logit soft-capping (`final_logit_softcapping`), if any, is applied.
    """
    logits = adapter.lm_head(adapter.final_norm(hidden)).float()
    cap = getattr(adapter.config, "final_logit_softcapping", None)
    return torch.tanh(logits / cap) * cap if cap else logits


def exit_features(logits: torch.Tensor) -> torch.Tensor:
    """AdaInfer's features of logits [..., V]: (top probability, top1 − top2 gap) [..., 2]."""
    top = logits.softmax(-1).topk(2, dim=-1).values
    return torch.stack([top[..., 0], top[..., 0] - top[..., 1]], dim=-1)


@dataclass
class LayerView:
    """One window seen at every block: features [n_blocks, T, 2], top-1 [n_blocks, T], and
    the NLL (nats) of each next token [n_blocks, T−1]."""

    features: torch.Tensor
    top1: torch.Tensor
    nll: torch.Tensor


@torch.no_grad()
def layer_view(lm: LoadedModel, ids: torch.Tensor) -> LayerView:
    """Run one window `ids` [T] through the model and read every block's prediction."""
    adapter = lm.adapter
    device = next(lm.model.parameters()).device
    with block_outputs(adapter) as outputs:
        lm.model(input_ids=ids.unsqueeze(0).to(device), use_cache=False)
    features, top1, nll = [], [], []
    targets = ids[1:].to(device)
    for hidden in outputs:
        logits = head_logits(adapter, hidden[0])
        features.append(exit_features(logits).cpu())
        top1.append(logits.argmax(-1).cpu())
        nll.append(F.cross_entropy(logits[:-1], targets, reduction="none").cpu())
    return LayerView(torch.stack(features), torch.stack(top1), torch.stack(nll))


@dataclass
class EarlyExitPolicy:
    """A trained stopping rule: p(stop) = σ(w · standardized features + b).

    `weight` and `mean` / `std` have one entry per feature in FEATURES; `num_blocks` is
    the depth of the model it was trained on.
    """

    weight: list[float]
    bias: float
    mean: list[float]
    std: list[float]
    threshold: float
    num_blocks: int
    training: dict = field(default_factory=dict)

    def stop_probability(self, features: torch.Tensor) -> torch.Tensor:
        """p(stop) for features [..., 2]."""
        x = (features.double() - torch.tensor(self.mean, dtype=torch.float64)) / torch.tensor(
            self.std, dtype=torch.float64
        )
        return torch.sigmoid(x @ torch.tensor(self.weight, dtype=torch.float64) + self.bias)

    def exit_blocks(self, features: torch.Tensor) -> torch.Tensor:
        """Index of the block each input stops after, from features [n_blocks, T, 2]: [T].

        The last block is always an exit.
        """
        stop = self.stop_probability(features) >= self.threshold
        stop[-1] = True
        return stop.double().argmax(0)

    def _check_model(self, lm: LoadedModel) -> None:
        if lm.adapter.num_layers != self.num_blocks:
            raise PrunekitError(
                f"this early-exit policy was trained on {self.num_blocks} blocks; "
                f"the model has {lm.adapter.num_layers}"
            )

    def score(self, lm: LoadedModel, windows: torch.Tensor) -> dict:
        """Every position of `windows` [n, T] as an input that exits early, vs the full model.

        Returns the mean blocks used, the share of positions whose top-1 equals the full
        model's (agreement), next-token accuracy and NLL / perplexity with early exit and
        with the full model.
        """
        self._check_model(lm)
        views = [layer_view(lm, ids) for ids in tqdm(windows, desc="early-exit views", leave=False)]
        return self.score_views(views, windows)

    def score_views(self, views: list[LayerView], windows: torch.Tensor) -> dict:
        """`score` from precomputed `layer_view`s of `windows` (to compare thresholds)."""
        used = agree = correct = full_correct = 0
        nll = full_nll = 0.0
        count = 0
        for view, ids in zip(views, windows, strict=True):
            exits = self.exit_blocks(view.features)[:-1]  # positions with a next token
            positions = torch.arange(exits.numel())
            chosen = view.top1[exits, positions]
            full = view.top1[-1, :-1]
            targets = ids[1:]
            used += int((exits + 1).sum())
            agree += int((chosen == full).sum())
            correct += int((chosen == targets).sum())
            full_correct += int((full == targets).sum())
            nll += float(view.nll[exits, positions].sum())
            full_nll += float(view.nll[-1].sum())
            count += exits.numel()
        return {
            "positions": count,
            "threshold": self.threshold,
            "mean_blocks_used": used / count,
            "blocks": self.num_blocks,
            "agreement_with_full": agree / count,
            "accuracy": correct / count,
            "full_accuracy": full_correct / count,
            "nll": nll / count,
            "full_nll": full_nll / count,
            "perplexity": math.exp(nll / count),
            "full_perplexity": math.exp(full_nll / count),
        }

    @torch.no_grad()
    def forward_exit(self, lm: LoadedModel, ids: torch.Tensor) -> tuple[torch.Tensor, int]:
        """One input `ids` [1, T]: run blocks until the policy stops at the last token.

        Returns the last position's logits [V] and the number of blocks run. Blocks after
        the exit are not computed.
        """
        self._check_model(lm)
        adapter = lm.adapter
        last = self.num_blocks - 1

        class _Exit(Exception):
            def __init__(self, block: int, hidden: torch.Tensor):
                self.block, self.hidden = block, hidden

        def hook_for(index: int):
            def hook(module, args, output):
                hidden = (output[0] if isinstance(output, tuple) else output)[:, -1]
                if index < last:
                    features = exit_features(head_logits(adapter, hidden))
                    if float(self.stop_probability(features)[0]) >= self.threshold:
                        raise _Exit(index, hidden)
                else:
                    raise _Exit(index, hidden)

            return hook

        handles = [b.register_forward_hook(hook_for(i)) for i, b in enumerate(adapter.blocks)]
        try:
            lm.model(input_ids=ids, use_cache=False)
        except _Exit as stop:
            return head_logits(adapter, stop.hidden)[0], stop.block + 1
        finally:
            for handle in handles:
                handle.remove()
        raise RuntimeError("the model ran without reaching its last block")

    @torch.no_grad()
    def generate(
        self, lm: LoadedModel, ids: torch.Tensor, max_new_tokens: int = 20
    ) -> tuple[torch.Tensor, list[int]]:
        """Greedy decoding of `ids` [1, T] with an early exit at every step.

        Each step re-runs the whole sequence without a KV cache (blocks skipped by an
        earlier exit have no cached keys and values). Returns the ids [1, T + new] and the
        blocks used at each step.
        """
        if ids.dim() != 2 or ids.shape[0] != 1:
            raise PrunekitError(f"generate takes one input of shape [1, T], got {tuple(ids.shape)}")
        device = next(lm.model.parameters()).device
        ids = ids.to(device)
        used = []
        for _ in range(max_new_tokens):
            logits, blocks = self.forward_exit(lm, ids)
            used.append(blocks)
            ids = torch.cat([ids, logits.argmax().view(1, 1).to(device)], dim=1)
        return ids, used

    def as_dict(self) -> dict:
        return {"features": list(FEATURES), **asdict(self)}

    @classmethod
    def from_dict(cls, data: dict) -> EarlyExitPolicy:
        data = {k: v for k, v in data.items() if k != "features"}
        return cls(**data)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(json.dumps(self.as_dict(), indent=2) + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path) -> EarlyExitPolicy:
        return cls.from_dict(json.loads(Path(path).read_text()))


class ExitLogits(nn.Module):
    """The model read through an early-exit policy, for log-likelihood scoring.

    Every position's logits come from the first block where `policy` stops for it (per
    position, as `EarlyExitPolicy.score` does). All blocks are computed; `blocks_used` and
    `positions` count the blocks an exiting forward would have run, so
    `blocks_used / positions` is the mean depth. Use batch size 1 so no padding is counted.
    """

    def __init__(self, lm: LoadedModel, policy: EarlyExitPolicy):
        super().__init__()
        policy._check_model(lm)
        self.model, self.adapter, self.policy = lm.model, lm.adapter, policy
        self.config = lm.model.config
        self.blocks_used = 0
        self.positions = 0

    @torch.no_grad()
    def forward(
        self, input_ids: torch.Tensor, logits_to_keep: int = 0, **kwargs
    ) -> SimpleNamespace:
        """Logits [B, K, V] of the last K = `logits_to_keep` positions (all when 0)."""
        kwargs["use_cache"] = False
        with block_outputs(self.adapter) as outputs:
            self.model(input_ids=input_ids, logits_to_keep=1, **kwargs)
        keep = logits_to_keep or input_ids.shape[1]
        result, done = None, None
        for index, hidden in enumerate(outputs):
            logits = head_logits(self.adapter, hidden[:, -keep:])
            stop = self.policy.stop_probability(exit_features(logits)) >= self.policy.threshold
            if result is None:
                result = torch.empty_like(logits)
                done = torch.zeros(stop.shape, dtype=torch.bool, device=stop.device)
            if index == len(outputs) - 1:
                stop = torch.ones_like(done)
            new = stop & ~done
            result[new] = logits[new]
            self.blocks_used += int(new.sum()) * (index + 1)
            done |= new
        self.positions += done.numel()
        return SimpleNamespace(logits=result)


def train_logistic(
    x: torch.Tensor, y: torch.Tensor, balanced: bool = True, l2: float = 1e-4, steps: int = 100
) -> tuple[torch.Tensor, float]:
    """Logistic regression on standardized features x [N, d] and labels y [N] in {0, 1}.

    Full-batch L-BFGS on the mean log-loss plus `l2`·‖w‖²; `balanced` weighs each class
    by N / (2 · its count) so the rarer label counts as much. Returns (w [d], b).
    """
    x, y = x.double(), y.double()
    weights = None
    if balanced:
        positives = y.sum().clamp(1.0, y.numel() - 1.0)
        weights = torch.where(
            y > 0.5, y.numel() / (2 * positives), y.numel() / (2 * (y.numel() - positives))
        )
    w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros((), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([w, b], max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = F.binary_cross_entropy_with_logits(x @ w + b, y, weight=weights)
        loss = loss + l2 * w.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return w.detach(), float(b.detach())


def _share(flags: torch.Tensor) -> float | None:
    """Share of True in `flags`, or None when empty."""
    return float(flags.double().mean()) if flags.numel() else None


def fit(
    lm: LoadedModel, calib: torch.Tensor, threshold: float = 0.5, balanced: bool = True
) -> EarlyExitPolicy:
    """Train an early-exit policy on calibration windows `calib` [n, T].

    Every position of every window at every block but the last is one example: features
    of that block's prediction, label 1 when its top-1 equals the last block's.
    `balanced` weighs the two labels equally (deep blocks make "stop" the common label).
    """
    if not 0.0 < threshold < 1.0:
        raise PrunekitError(f"threshold must be in (0, 1), got {threshold}")
    if lm.adapter.num_layers < 2:
        raise PrunekitError("early exit needs a model with at least 2 blocks")
    xs, ys = [], []
    for ids in tqdm(calib, desc="early-exit features", leave=False):
        view = layer_view(lm, ids)
        xs.append(view.features[:-1].reshape(-1, len(FEATURES)))
        ys.append((view.top1[:-1] == view.top1[-1]).reshape(-1))
    x, y = torch.cat(xs).double(), torch.cat(ys).double()
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    w, b = train_logistic((x - mean) / std, y, balanced)
    predicted = torch.sigmoid(((x - mean) / std) @ w + b) >= 0.5
    return EarlyExitPolicy(
        weight=w.tolist(),
        bias=b,
        mean=mean.tolist(),
        std=std.tolist(),
        threshold=threshold,
        num_blocks=lm.adapter.num_layers,
        training={
            "examples": int(y.numel()),
            "balanced": balanced,
            "positive_share": float(y.mean()),
            "train_recall_stop": _share(predicted[y > 0.5]),
            "train_recall_continue": _share(~predicted[y < 0.5]),
            "windows": int(calib.shape[0]),
            "window_tokens": int(calib.shape[1]),
        },
    )
