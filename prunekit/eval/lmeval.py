"""Optional backend: score requests with lm-evaluation-harness's `HFLM` on the same model.

Needs the `lmeval` extra (`pip install prunekit[lmeval]`); the model object is handed to
`HFLM(pretrained=model, tokenizer=tokenizer)` as it is (pruned or not), so its numbers
cross-check prunekit's scorer on identical prompts.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn
from transformers import PreTrainedTokenizerBase

from prunekit.errors import PrunekitError
from prunekit.eval.loglik import Score, encode_pair


def hflm(model: nn.Module, tokenizer: PreTrainedTokenizerBase, batch_size: int = 16):
    """lm-eval's `HFLM` wrapping `model` (no copy)."""
    try:
        from lm_eval.models.huggingface import HFLM
    except ImportError as err:
        raise PrunekitError(
            "backend 'lm-eval' needs lm-evaluation-harness: pip install 'prunekit[lmeval]'"
        ) from err
    return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)


def lmeval_loglikelihoods(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    requests: Sequence[tuple[str, str]],
    batch_size: int = 16,
    desc: str | None = None,
) -> list[Score]:
    """`Score` of each `(context, continuation)` by `HFLM.loglikelihood`, in request order."""
    from lm_eval.api.instance import Instance

    lm = hflm(model, tokenizer, batch_size)
    instances = [
        Instance(request_type="loglikelihood", doc={}, arguments=pair, idx=i)
        for i, pair in enumerate(requests)
    ]
    outputs = lm.loglikelihood(instances, disable_tqdm=desc is None)
    return [
        Score(float(ll), bool(greedy), len(encode_pair(tokenizer, *pair)[1]))
        for (ll, greedy), pair in zip(outputs, requests, strict=True)
    ]
