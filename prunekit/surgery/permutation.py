"""Input-channel permutations that let an N:M mask keep more importance, folded into
the model so it stays a plain `transformers` checkpoint and computes the same function.

A consumer linear's input channels can be reordered freely when the producer of those
channels is another linear of the same block whose output channels feed them one to one:

- MLP: `down` reads the intermediate channels made by `gate`/`up` (or `gate_up`, or
  `up` = fc1 in a plain MLP): permute down's columns and the producers' rows alike.
- attention: `o` reads each head's values; inside a key-value head the value dimensions
  may be reordered when `v`'s rows and the matching `o` columns of every query head that
  shares it move together (GQA-aware).

Layers fed by the residual stream (q, k, v, gate, up) cannot be permuted without
permuting the whole model and keep their order.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from prunekit.errors import PrunekitError
from prunekit.models.adapter import ModelAdapter, weight_matrix


@dataclass
class ChannelGroup:
    """`size` channels that one permutation reorders together.

    The consumer's columns `off + k` for each `off` in `consumer_offsets`, and each
    producer's rows `off + k` for each of its offsets, all take channel k.
    """

    size: int
    consumer_offsets: list[int]
    producers: list[tuple[nn.Module, list[int]]]


def couplings(adapter: ModelAdapter, block: nn.Module) -> dict[str, list[ChannelGroup]]:
    """Consumer linear path -> channel groups it can be permuted by (see module doc)."""
    roles = adapter.spec.linears
    linear = lambda role: adapter.linear(block, role)  # noqa: E731
    out: dict[str, list[ChannelGroup]] = {}
    if "down" in roles:
        width = weight_matrix(linear("down")).shape[1]
        if "gate_up" in roles:
            producers = [(linear("gate_up"), [0, width])]
        else:
            producers = [(linear(r), [0]) for r in ("gate", "up") if r in roles]
        out[roles["down"]] = [ChannelGroup(width, [0], producers)]
    if "v" in roles and "o" in roles:
        hd, heads, kv = adapter.head_dim, adapter.num_heads, adapter.num_kv_heads
        per_kv = heads // kv
        out[roles["o"]] = [
            ChannelGroup(
                hd,
                [h * hd for h in range(g * per_kv, (g + 1) * per_kv)],
                [(linear("v"), [g * hd])],
            )
            for g in range(kv)
        ]
    return out


def group_scores(scores: torch.Tensor, group: ChannelGroup) -> torch.Tensor:
    """The consumer's scores [rows, in] of one group, stacked: [rows · offsets, size]."""
    return torch.cat([scores[:, off : off + group.size] for off in group.consumer_offsets])


def column_index(groups: list[ChannelGroup], perms: list[torch.Tensor], width: int):
    """Full consumer column order [width] from one permutation per group."""
    index = torch.arange(width)
    for group, perm in zip(groups, perms, strict=True):
        for off in group.consumer_offsets:
            index[off : off + group.size] = off + perm
    return index


@torch.no_grad()
def apply_permutation(consumer: nn.Module, groups: list[ChannelGroup], perms: list[torch.Tensor]):
    """Reorder the consumer's columns and the producers' rows (and biases) in place."""
    w = weight_matrix(consumer)
    w.copy_(w[:, column_index(groups, perms, w.shape[1]).to(w.device)])
    for group, perm in zip(groups, perms, strict=True):
        for producer, offsets in group.producers:
            pw = weight_matrix(producer)
            bias = getattr(producer, "bias", None)
            for off in offsets:
                rows = (off + perm).to(pw.device)
                pw[off : off + group.size] = pw[rows].clone()
                if bias is not None:
                    bias.data[off : off + group.size] = bias.data[rows].clone()


def nm_retained(scores: torch.Tensor, n: int, m: int) -> float:
    """Total of the n largest scores in every group of m consecutive columns of each row."""
    groups = scores.reshape(scores.shape[0], -1, m)
    return float(torch.topk(groups, n, dim=2).values.sum())


def _balanced_start(scores: torch.Tensor, m: int) -> torch.Tensor:
    """Channels sorted by total score dealt to the groups in snake order: [in]."""
    order = torch.argsort(scores.sum(0), descending=True)
    n_groups = scores.shape[1] // m
    perm = torch.empty_like(order)
    for k, channel in enumerate(order.tolist()):
        slot, pos = divmod(k, n_groups)
        group = pos if slot % 2 == 0 else n_groups - 1 - pos
        perm[group * m + slot] = channel
    return perm


def _gain_matrix(rest: torch.Tensor, free: torch.Tensor, n: int, chunk: int = 64) -> torch.Tensor:
    """Retained score of group g plus channel c, for all c, g: [channels, groups].

    `rest` [rows, groups, m-1] holds each group without one slot; `free` [rows, channels]
    the channels taken out. With a = sum of the n-1 largest of a group's rest and b its
    n-th largest, adding x keeps a + max(b, x) in each row.
    """
    top = torch.topk(rest, n, dim=2).values  # n <= m - 1
    a = top[:, :, : n - 1].sum(2)  # [rows, groups]
    b = top[:, :, n - 1]  # [rows, groups]
    gains = torch.empty(free.shape[1], rest.shape[1], dtype=torch.float64)
    for start in range(0, free.shape[1], chunk):
        x = free[:, start : start + chunk]  # [rows, c]
        best = torch.maximum(b.unsqueeze(1), x.unsqueeze(2))  # [rows, c, groups]
        gains[start : start + chunk] = (best.sum(0) + a.sum(0).unsqueeze(0)).double()
    return gains


def find_nm_permutation(scores: torch.Tensor, n: int, m: int, rounds: int = 8) -> torch.Tensor:
    """An order of the columns of `scores` [rows, in] under which N:M keeps more score.

    Start: channels sorted by total score, dealt to the in/m groups in snake order so
    every group gets a mix of strong and weak channels. Refinement (as RIA): each round
    takes the channel in one slot out of every group and puts them back by a linear sum
    assignment that maximises the retained score; slots rotate, and a round is kept only
    when it helps. Returns perm [in] with `scores[:, perm]` the better order; never worse
    than the identity.
    """
    try:
        from scipy.optimize import linear_sum_assignment
    except ImportError:
        raise PrunekitError(
            "channel permutation needs scipy: pip install 'prunekit[permute]'"
        ) from None

    scores = scores.float()
    in_features = scores.shape[1]
    n_groups = in_features // m
    identity = torch.arange(in_features)
    perm = _balanced_start(scores, m)
    best = nm_retained(scores[:, perm], n, m)
    stale = 0
    for r in range(rounds):
        if stale >= m:
            break
        slot = r % m
        layout = perm.view(n_groups, m)
        keep = [s for s in range(m) if s != slot]
        free_ids = layout[:, slot]
        rest = scores[:, layout[:, keep].flatten()].reshape(-1, n_groups, m - 1)
        gains = _gain_matrix(rest, scores[:, free_ids], n)
        chan, grp = linear_sum_assignment(gains.numpy(), maximize=True)
        new_layout = layout.clone()
        new_layout[torch.as_tensor(grp), slot] = free_ids[torch.as_tensor(chan)]
        candidate = new_layout.flatten()
        value = nm_retained(scores[:, candidate], n, m)
        if value > best * (1 + 1e-9):
            perm, best, stale = candidate, value, 0
        else:
            stale += 1
    return perm if best >= nm_retained(scores, n, m) else identity
