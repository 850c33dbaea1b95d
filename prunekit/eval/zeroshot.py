"""Zero-shot accuracy on the task files, with lm-evaluation-harness's metrics.

`acc`: the choice with the highest log-likelihood is the gold one. `acc_norm`: the same
after dividing each log-likelihood by its choice text's UTF-8 byte length. LAMBADA: `acc`
is last-word accuracy (every continuation token is the greedy argmax) and `perplexity`
is exp of minus the mean continuation log-likelihood per item. Closed-book QA
(TriviaQA, Jeopardy, qa_wikidata): `acc` is the exact match of the greedy answer
(`prunekit.eval.generation`).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Sequence

from torch import nn
from transformers import PreTrainedTokenizerBase

from prunekit.errors import choice_error
from prunekit.eval.generation import MAX_NEW_TOKENS, QAItem, exact_match, generate_answers
from prunekit.eval.loglik import Score, loglikelihoods
from prunekit.eval.tasks import TASKS, Item, canonical_task, load_task, task_path
from prunekit.progress import progress as tqdm

Scorer = Callable[..., list[Score]]
BACKENDS = ("prunekit", "lm-eval")


def _stderr(values: Sequence[float]) -> float:
    """Standard error of the mean (sample standard deviation / sqrt(n))."""
    n = len(values)
    if n < 2:
        return float("nan")
    mean = sum(values) / n
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n)


def _argmax(values: Sequence[float]) -> int:
    return max(range(len(values)), key=values.__getitem__)


def multiple_choice_metrics(items: Sequence[Item], scores: Sequence[Score]) -> dict[str, float]:
    """`acc`, `acc_norm` (by byte length), their standard errors and `chance` (the accuracy
    of guessing: mean over items of 1 / choices); `scores` flat, in item order."""
    correct, correct_norm, cursor = [], [], 0
    for item in items:
        lls = [s.logprob for s in scores[cursor : cursor + len(item.requests)]]
        cursor += len(item.requests)
        lengths = [max(len(c.encode("utf-8")), 1) for c in item.choices]
        correct.append(float(_argmax(lls) == item.gold))
        normalised = [ll / b for ll, b in zip(lls, lengths, strict=True)]
        correct_norm.append(float(_argmax(normalised) == item.gold))
    return {
        "acc": sum(correct) / len(correct),
        "acc_stderr": _stderr(correct),
        "acc_norm": sum(correct_norm) / len(correct_norm),
        "acc_norm_stderr": _stderr(correct_norm),
        "chance": sum(1 / len(item.choices) for item in items) / len(items),
    }


def lambada_metrics(scores: Sequence[Score]) -> dict[str, float]:
    """Last-word `acc` (all tokens greedy), `perplexity` = exp(-mean log-likelihood) and
    `chance` 0 (an open-vocabulary word is not guessed)."""
    correct = [float(s.greedy) for s in scores]
    mean_ll = sum(s.logprob for s in scores) / len(scores)
    return {
        "acc": sum(correct) / len(correct),
        "acc_stderr": _stderr(correct),
        "perplexity": math.exp(-mean_ll),
        "chance": 0.0,
    }


def generation_metrics(items: Sequence[QAItem], predictions: Sequence[str]) -> dict:
    """`acc` (exact match of the greedy answers), its standard error, `chance` 0 and the
    first five predictions (to read what the model said)."""
    correct = [
        float(exact_match(p, item.answers)) for p, item in zip(predictions, items, strict=True)
    ]
    return {
        "acc": sum(correct) / len(correct),
        "acc_stderr": _stderr(correct),
        "chance": 0.0,
        "max_new_tokens": MAX_NEW_TOKENS,
        "examples": list(predictions[:5]),
    }


def _file_sha256(task: str) -> str:
    return hashlib.sha256(task_path(task).read_bytes()).hexdigest()


def _scorer(backend: str) -> Scorer:
    if backend == "prunekit":
        return loglikelihoods
    if backend == "lm-eval":
        from prunekit.eval.lmeval import lmeval_loglikelihoods

        return lmeval_loglikelihoods
    raise choice_error("backend", backend, BACKENDS)


def evaluate_tasks(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    tasks: list[str],
    limit: int | None = None,
    batch_size: int = 16,
    backend: str = "prunekit",
) -> dict[str, dict]:
    """Zero-shot results per task, keyed as given: `{task: {"acc", "acc_norm", "n", ...}}`.

    `limit` scores only the first `limit` items of each task (quick runs; recorded).
    `backend="lm-eval"` scores the same requests with lm-evaluation-harness's `HFLM`
    (needs the `lmeval` extra). LAMBADA gives `acc` and `perplexity` instead of `acc_norm`.
    """
    scorer = _scorer(backend)
    names = {}
    for task in tasks:
        name = canonical_task(task)
        if name is None:
            raise choice_error("task", task, sorted(TASKS))
        names[task] = name
    results = {}
    for task, name in tqdm(names.items(), desc="zero-shot tasks", disable=len(names) < 2):
        items = load_task(name, limit)
        if TASKS[name].kind == "generation":
            predictions = generate_answers(model, tokenizer, items, desc=name)
            results[task] = {
                "task": name,
                **generation_metrics(items, predictions),
                "n": len(items),
                "limit": limit,
                "backend": "prunekit",  # generation is scored by prunekit's greedy decoder
                "file_sha256": _file_sha256(name),
            }
            continue
        requests = [request for item in items for request in item.requests]
        model.eval()
        scores = scorer(model, tokenizer, requests, batch_size=batch_size, desc=name)
        if TASKS[name].kind == "lambada":
            metrics = lambada_metrics(scores)
        else:
            metrics = multiple_choice_metrics(items, scores)
        results[task] = {
            "task": name,
            **metrics,
            "n": len(items),
            "limit": limit,
            "backend": backend,
            "file_sha256": _file_sha256(name),
        }
    return results
