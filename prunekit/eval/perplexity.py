"""Perplexity under the field's protocol: the whole text tokenized once, non-overlapping
windows of `seqlen` tokens with nothing added (or BOS first: protocol "bos"), mean token
NLL over every predicted token of every window, exp."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedTokenizerBase

from prunekit.data import evaluation_windows, load_text
from prunekit.progress import progress as tqdm


@dataclass
class PerplexityResult:
    dataset: str
    perplexity: float
    nll: float  # mean token negative log-likelihood (nats)
    tokens: int  # predicted tokens
    windows: int
    seqlen: int
    text_sha256: str
    protocol: str = "reference"

    def as_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def window_nll(
    model: nn.Module,
    windows: torch.Tensor,
    batch_size: int = 1,
    desc: str = "ppl",
    progress: bool = True,
):
    """Sum of token NLL (nats) and token count over `windows` [n, L] (next-token targets)."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    starts = range(0, windows.shape[0], batch_size)
    for start in tqdm(starts, desc=desc, leave=False, disable=not progress):
        batch = windows[start : start + batch_size].to(device)
        logits = model(input_ids=batch, use_cache=False).logits[:, :-1].float()
        targets = batch[:, 1:]
        total += F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum").item()
        count += targets.numel()
    return total, count


def next_token_loss(logits: torch.Tensor, batch: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of logits [B, L, V] on the next tokens of batch [B, L]."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), batch[:, 1:].flatten())


def mean_nll(model: nn.Module, windows: torch.Tensor, batch_size: int = 1) -> float:
    """Mean next-token NLL (nats per token) over `windows` [n, L], without a progress bar."""
    total, count = window_nll(model, windows, batch_size, progress=False)
    return total / count


def perplexity(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    dataset: str = "wikitext2",
    seqlen: int = 1024,
    limit: int | None = None,
    batch_size: int = 1,
    protocol: str = "reference",
) -> PerplexityResult:
    """Perplexity of `model` on a dataset's evaluation split (or a text file path).

    `limit` evaluates only the first `limit` windows (quick runs; recorded); `protocol` is
    "reference" or "bos" (see `prunekit.data.windows`).
    """
    source = load_text(dataset, purpose="eval")
    windows = evaluation_windows(tokenizer, source.text, seqlen, limit, protocol)
    total, count = window_nll(model, windows, batch_size, desc=f"ppl {dataset}")
    nll = total / count
    return PerplexityResult(
        dataset=dataset,
        perplexity=math.exp(nll),
        nll=nll,
        tokens=count,
        windows=windows.shape[0],
        seqlen=seqlen,
        text_sha256=source.sha256,
        protocol=protocol,
    )
