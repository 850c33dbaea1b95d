"""Log-likelihood of continuations given contexts, lm-evaluation-harness style, fast on CPU.

Requests that share a context are packed into one row: the context once, then every
continuation after it, each without its last token (which predicts nothing, so one-token
choices such as yes/no or A/B/C/D add no tokens at all). A custom attention mask lets
each continuation see the context and its own earlier tokens only, and position ids
restart after the context for each one, so a continuation is scored exactly as if it
followed the context alone, while the context is encoded once per item instead of once
per choice. Rows are batched, left-padded, and only the positions that predict
continuation tokens go through the LM head.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedTokenizerBase

from prunekit.progress import progress as tqdm

PAD_SEGMENT = -1
CONTEXT_SEGMENT = 0


@dataclass(frozen=True)
class Score:
    """One continuation's log-likelihood (nats, summed over its tokens), whether every
    token was the argmax, and how many tokens it has."""

    logprob: float
    greedy: bool
    tokens: int


def encode_pair(
    tokenizer: PreTrainedTokenizerBase, context: str, continuation: str
) -> tuple[list[int], list[int]]:
    """Token ids of (context, continuation) as lm-evaluation-harness forms them.

    Trailing whitespace of the context moves to the continuation; the continuation's ids
    are those of `context + continuation` after the context's own ids (the tokenizer's
    default special tokens, e.g. BOS, included).
    """
    stripped = context.rstrip()
    continuation = context[len(stripped) :] + continuation
    context_ids = tokenizer.encode(stripped)
    whole = tokenizer.encode(stripped + continuation)
    return context_ids, whole[len(context_ids) :]


@dataclass
class _Row:
    """One packed row: a context and the continuations scored after it."""

    context: list[int]
    continuations: list[list[int]]
    request_ids: list[int]  # index of each continuation's request

    @property
    def fed(self) -> list[list[int]]:
        """Continuation tokens fed to the model: all but each one's last (never a predictor)."""
        return [c[:-1] for c in self.continuations]

    @property
    def length(self) -> int:
        return len(self.context) + sum(len(c) for c in self.fed)

    @property
    def tail(self) -> int:
        """Positions whose logits are needed: the last context token and all fed tokens."""
        return 1 + sum(len(c) for c in self.fed)


def _pack(encoded: Sequence[tuple[list[int], list[int]]], max_length: int | None) -> list[_Row]:
    """Group requests by identical context ids into rows (first-seen order).

    With `max_length`, a context is left-truncated as lm-eval does: the model sees at
    most `max_length` tokens of context + continuation minus its last token.
    """
    rows: dict[tuple[int, ...], _Row] = {}
    for index, (context, continuation) in enumerate(encoded):
        if not context or not continuation:
            raise ValueError("each request needs a non-empty context and continuation")
        if max_length is not None and len(context) + len(continuation) > max_length + 1:
            context = context[-max(1, max_length + 1 - len(continuation)) :]
        row = rows.setdefault(tuple(context), _Row(list(context), [], []))
        row.continuations.append(list(continuation))
        row.request_ids.append(index)
    return list(rows.values())


def _batch_inputs(
    rows: Sequence[_Row], device: torch.device | str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Left-padded ids [B, T], position ids [B, T] and which key each query sees [B, T, T]."""
    width = max(row.length for row in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    positions = torch.zeros(len(rows), width, dtype=torch.long)
    segments = torch.full((len(rows), width), PAD_SEGMENT, dtype=torch.long)
    for r, row in enumerate(rows):
        start = width - row.length
        n = len(row.context)
        ids[r, start : start + n] = torch.tensor(row.context)
        positions[r, start : start + n] = torch.arange(n)
        segments[r, start : start + n] = CONTEXT_SEGMENT
        cursor = start + n
        for s, fed in enumerate(row.fed, start=1):
            m = len(fed)
            ids[r, cursor : cursor + m] = torch.tensor(fed, dtype=torch.long)
            positions[r, cursor : cursor + m] = torch.arange(n, n + m)
            segments[r, cursor : cursor + m] = s
            cursor += m
    query, key = segments[:, :, None], segments[:, None, :]
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    visible = causal & (key != PAD_SEGMENT) & ((key == CONTEXT_SEGMENT) | (key == query))
    visible |= torch.eye(width, dtype=torch.bool)  # padding attends to itself: no empty rows
    return ids.to(device), positions.to(device), visible


def _attention_masks(
    config: object, visible: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor | dict[str, torch.Tensor]:
    """Additive 4D masks [B, 1, T, T] for the model, honouring sliding-window layers.

    A model with `layer_types` takes one mask per layer type; one with only a
    `sliding_window` applies it in every layer. A custom mask bypasses the model's own
    mask building, so the window (in position-id distance) is applied here.
    """

    def additive(allowed: torch.Tensor) -> torch.Tensor:
        mask = torch.zeros(allowed.shape, dtype=dtype, device=positions.device)
        return mask.masked_fill(~allowed.to(positions.device), torch.finfo(dtype).min)[:, None]

    window = getattr(config, "sliding_window", None)
    sliding = visible
    if window:
        distance = positions[:, :, None] - positions[:, None, :]
        sliding = visible & (distance.cpu() < window)
    layer_types = getattr(config, "layer_types", None)
    if layer_types:
        full_mask, sliding_mask = additive(visible), additive(sliding)
        return {t: sliding_mask if "sliding" in t else full_mask for t in set(layer_types)}
    return additive(sliding)


def _score_row(logits: torch.Tensor, row: _Row) -> list[Score]:
    """Scores of a row's continuations from its tail logits [row.tail, V]."""
    logprobs = F.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)
    scores, cursor = [], 1  # tail index 0 is the last context token
    for continuation in row.continuations:
        m = len(continuation)
        predictors = torch.tensor([0, *range(cursor, cursor + m - 1)], dtype=torch.long)
        targets = torch.tensor(continuation)
        chosen = logprobs[predictors]
        token_lp = chosen.gather(1, targets[:, None]).squeeze(1)
        greedy = bool((chosen.argmax(dim=-1) == targets).all())
        scores.append(Score(float(token_lp.sum()), greedy, m))
        cursor += m - 1
    return scores


@torch.no_grad()
def loglikelihoods(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    requests: Sequence[tuple[str, str]],
    batch_size: int = 16,
    desc: str | None = "loglikelihood",
) -> list[Score]:
    """`Score` of each `(context, continuation)` request, in request order.

    `batch_size` is the number of packed rows (distinct contexts) per forward pass.
    """
    encoded = [encode_pair(tokenizer, c, x) for c, x in requests]
    config = getattr(model, "config", None)
    max_length = getattr(config, "max_position_embeddings", None) or getattr(
        config, "n_positions", None
    )
    rows = sorted(_pack(encoded, max_length), key=lambda r: r.length, reverse=True)
    param = next(model.parameters())
    results: list[Score | None] = [None] * len(requests)
    starts = range(0, len(rows), batch_size)
    for start in tqdm(starts, desc=desc, leave=False, disable=desc is None):
        batch = rows[start : start + batch_size]
        ids, positions, visible = _batch_inputs(batch, param.device)
        masks = _attention_masks(config, visible, positions, param.dtype)
        keep = max(row.tail for row in batch)
        logits = model(
            input_ids=ids,
            attention_mask=masks,
            position_ids=positions,
            use_cache=False,
            logits_to_keep=keep,
        ).logits
        for r, row in enumerate(batch):
            tail = logits[r, keep - row.tail :]
            for request_id, score in zip(row.request_ids, _score_row(tail, row), strict=True):
                results[request_id] = score
    return results  # type: ignore[return-value]
