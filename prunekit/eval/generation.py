"""Closed-book question answering scored on generated text (LLM-Kick's knowledge tasks).

Each item is a prompt and the answers that count; the model continues the prompt by
greedy decoding (at most `max_new_tokens`, stopping at the first newline), and the item
is right when the normalised continuation equals a normalised answer (exact match, with
the normalisation of the TriviaQA / SQuAD evaluation scripts: lower case, punctuation
and the articles a / an / the removed, whitespace collapsed).
"""

from __future__ import annotations

import re
import string
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from prunekit.progress import progress

MAX_NEW_TOKENS = 24  # enough for any answer of these tasks
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


@dataclass(frozen=True)
class QAItem:
    """A prompt and every answer accepted for it (TriviaQA's aliases, or one answer)."""

    prompt: str
    answers: tuple[str, ...]


def normalize_answer(text: str) -> str:
    """Lower case, no punctuation, no articles, single spaces."""
    text = text.lower().translate(_PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, answers: Sequence[str]) -> bool:
    """The prediction equals one of the answers after normalisation."""
    predicted = normalize_answer(prediction)
    return any(predicted == normalize_answer(answer) for answer in answers)


@torch.no_grad()
def greedy_continuation(
    model: nn.Module, tokenizer: PreTrainedTokenizerBase, prompt: str, max_new_tokens: int
) -> str:
    """The greedy continuation of `prompt` (batch 1, KV cache), leading whitespace
    dropped and cut at its first newline; decoding stops at a newline that follows text,
    at EOS or after `max_new_tokens`."""
    ids = tokenizer(prompt, return_tensors="pt").input_ids.to(next(model.parameters()).device)
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        stopping_criteria=[_AnswerEnded(tokenizer, ids.shape[1])],
        pad_token_id=tokenizer.eos_token_id,
    )
    new = out[0, ids.shape[1] :].tolist()
    return tokenizer.decode(new, skip_special_tokens=True).lstrip().split("\n")[0]


class _AnswerEnded:
    """Stopping criterion: the generated text, leading whitespace dropped, has a newline."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, prompt_length: int):
        self.tokenizer, self.start = tokenizer, prompt_length

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        text = self.tokenizer.decode(input_ids[0, self.start :], skip_special_tokens=True)
        done = "\n" in text.lstrip()
        return torch.full((input_ids.shape[0],), done, dtype=torch.bool, device=input_ids.device)


def generate_answers(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    items: Sequence[QAItem],
    max_new_tokens: int = MAX_NEW_TOKENS,
    desc: str = "generate",
) -> list[str]:
    """The greedy answer to every item's prompt, in item order."""
    model.eval()
    return [
        greedy_continuation(model, tokenizer, item.prompt, max_new_tokens)
        for item in progress(items, desc=desc, unit="item", leave=False)
    ]
