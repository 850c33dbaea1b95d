"""Token windows for calibration (seeded random crops) and evaluation (non-overlapping).

Two protocols (`PROTOCOLS`):
- "reference" (default), the field's: the whole text tokenized once without special
  tokens, windows cut from the token stream with nothing added (GPTQ/SparseGPT
  `datautils.py`, locuslab/wanda `lib/eval.py`, FLAP, SliceGPT, SLEB, LLM-Pruner);
- "bos": the same windows one token shorter, each prefixed with BOS where the tokenizer
  defines one (every window then starts as a document does).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

from prunekit.errors import PrunekitError, choice_error
from prunekit.settings import cache_dir

PROTOCOLS = ("reference", "bos")
CACHE_MIN_CHARS = 1_000_000  # texts at least this long keep their token ids on disk


def check_protocol(protocol: str) -> str:
    if protocol not in PROTOCOLS:
        raise choice_error("perplexity protocol", protocol, PROTOCOLS)
    return protocol


def tokenize(tokenizer: PreTrainedTokenizerBase, text: str) -> torch.Tensor:
    """The whole text as one 1-D LongTensor of token ids, without special tokens.

    Long texts (calibration and test splits) are tokenized once per tokenizer and text:
    the ids are kept as int32 in `<cache>/tokens/`, keyed by the SHA-256 of the text and
    of the tokenizer's definition, so later runs skip the tokenizer (and its transient
    memory, ~60 bytes per token) and read 4 bytes per token.
    """
    path = _token_cache(tokenizer, text)
    if path is not None and path.is_file():
        return torch.load(path, weights_only=True).long()
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    ids = torch.tensor(ids, dtype=torch.int32)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        torch.save(ids, partial)
        partial.replace(path)
    return ids.long()


def _token_cache(tokenizer: PreTrainedTokenizerBase, text: str) -> Path | None:
    """Where the ids of `text` under `tokenizer` are cached, or None (short text, or a
    tokenizer without a serialisable definition)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if len(text) < CACHE_MIN_CHARS or backend is None:
        return None
    digest = hashlib.sha256(backend.to_str().encode())
    digest.update(text.encode())
    return cache_dir() / "tokens" / f"{digest.hexdigest()[:32]}.pt"


def _prefix(tokenizer: PreTrainedTokenizerBase, body: torch.Tensor, protocol: str) -> torch.Tensor:
    """Prefix each row of `body` [n, L'] with BOS under the "bos" protocol."""
    bos = tokenizer.bos_token_id
    if protocol != "bos" or bos is None:
        return body
    return torch.cat([torch.full((body.shape[0], 1), bos, dtype=body.dtype), body], dim=1)


def body_length(
    tokenizer: PreTrainedTokenizerBase, seqlen: int, protocol: str = "reference"
) -> int:
    """Text tokens per window: seqlen, minus one when a BOS token is prepended."""
    return seqlen - (check_protocol(protocol) == "bos" and tokenizer.bos_token_id is not None)


def calibration_windows(
    tokenizer: PreTrainedTokenizerBase,
    text: str,
    nsamples: int,
    seqlen: int,
    seed: int,
    protocol: str = "reference",
) -> torch.Tensor:
    """`nsamples` windows of `seqlen` tokens at seeded random offsets: [nsamples, seqlen]."""
    if nsamples < 1 or seqlen < 2:
        raise PrunekitError(f"nsamples must be >= 1 and seqlen >= 2, got {nsamples}, {seqlen}")
    ids = tokenize(tokenizer, text)
    body = body_length(tokenizer, seqlen, protocol)
    if ids.numel() <= body:
        raise PrunekitError(
            f"calibration text has {ids.numel()} tokens, fewer than one window of {seqlen}"
        )
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - body, (nsamples,), generator=generator)
    rows = torch.stack([ids[s : s + body] for s in starts.tolist()])
    return _prefix(tokenizer, rows, protocol)


def evaluation_windows(
    tokenizer: PreTrainedTokenizerBase,
    text: str,
    seqlen: int,
    limit: int | None = None,
    protocol: str = "reference",
) -> torch.Tensor:
    """The text cut into consecutive non-overlapping windows: [n, seqlen].

    The tail shorter than a window is dropped; `limit` keeps the first `limit` windows.
    """
    ids = tokenize(tokenizer, text)
    body = body_length(tokenizer, seqlen, protocol)
    n = ids.numel() // body
    if n == 0:
        raise PrunekitError(f"evaluation text has {ids.numel()} tokens, fewer than {seqlen}")
    if limit is not None:
        n = min(n, limit)
    return _prefix(tokenizer, ids[: n * body].view(n, body), protocol)
