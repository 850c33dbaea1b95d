"""Zero-shot scorer: hand-computed log-likelihoods, acc_norm by bytes, packing = one at a
time, every task file parses, lm-eval agreement, LLM-Kick ratios, API and CLI dispatch."""

from __future__ import annotations

import json
import math
import re
import string

import pytest
import torch
import torch.nn.functional as F
from tiny_models import CONFIGS, tiny_model
from typer.testing import CliRunner

import prunekit
from prunekit.cli import app
from prunekit.eval.generation import MAX_NEW_TOKENS, exact_match
from prunekit.eval.llmkick import GROUPS, format_llmkick, llmkick_view
from prunekit.eval.loglik import Score, encode_pair, loglikelihoods
from prunekit.eval.tasks import TASKS, Item, load_task, task_path
from prunekit.eval.zeroshot import evaluate_tasks, lambada_metrics, multiple_choice_metrics


def plain_loglikelihood(model, context_ids: list[int], continuation_ids: list[int]):
    """Sum of log-softmax of the continuation tokens from one plain forward (and greedy).

    The last token is not fed (it predicts nothing), as in lm-eval."""
    ids = torch.tensor([(context_ids + continuation_ids)[:-1]])
    logprobs = F.log_softmax(model(input_ids=ids).logits[0].double(), dim=-1)
    n = len(context_ids)
    targets = torch.tensor(continuation_ids)
    predicted = logprobs[n - 1 : n - 1 + len(continuation_ids)]
    total = predicted.gather(1, targets[:, None]).sum().item()
    return total, bool((predicted.argmax(-1) == targets).all())


class CharTokenizer:
    """A BOS plus one id per character: enough to drive the tiny random models."""

    def encode(self, text: str) -> list[int]:
        return [1] + [3 + ord(ch) % 100 for ch in text]


@torch.no_grad()
def test_two_choice_item_equals_hand_computed_loglikelihood(stories):
    context = "Lily went to the park."
    choices = [" She saw a big dog.", " The sun was hot and"]
    scores = loglikelihoods(stories.model, stories.tokenizer, [(context, c) for c in choices])
    for choice, score in zip(choices, scores, strict=True):
        context_ids = stories.tokenizer.encode(context)
        whole = stories.tokenizer.encode(context + choice)
        assert whole[: len(context_ids)] == context_ids
        expected, greedy = plain_loglikelihood(
            stories.model, context_ids, whole[len(context_ids) :]
        )
        assert score.logprob == pytest.approx(expected, abs=1e-4)
        assert score.greedy == greedy
        assert score.tokens == len(whole) - len(context_ids)
    assert scores[0].logprob != pytest.approx(scores[1].logprob, abs=1e-3)


def test_trailing_context_space_moves_to_the_continuation(stories):
    tok = stories.tokenizer
    assert encode_pair(tok, "Once upon a time ", "there") == encode_pair(
        tok, "Once upon a time", " there"
    )


def test_acc_norm_divides_by_byte_length_not_characters():
    scores = [Score(-6.0, False, 1), Score(-5.0, False, 1)]
    item = Item((("q", " a"), ("q", " b")), 0, ("x" * 30, "short"))
    metrics = multiple_choice_metrics([item], scores)
    assert (metrics["acc"], metrics["acc_norm"]) == (0.0, 1.0)  # -6/30 beats -5/5
    # "ééé" is 3 characters but 6 bytes: per byte choice 0 wins, per character choice 1
    scores = [Score(-3.3, False, 1), Score(-2.5, False, 1)]
    item = Item((("q", " ééé"), ("q", " abcd")), 0, ("ééé", "abcd"))
    assert multiple_choice_metrics([item], scores)["acc_norm"] == 1.0
    assert multiple_choice_metrics([item], scores)["acc"] == 0.0


def test_lambada_metrics_are_greedy_accuracy_and_perplexity():
    scores = [Score(-1.0, True, 1), Score(-3.0, False, 2)]
    metrics = lambada_metrics(scores)
    assert metrics["acc"] == 0.5
    assert metrics["perplexity"] == pytest.approx(math.exp(2.0))


@torch.no_grad()
def test_packed_batches_equal_one_request_at_a_time(stories):
    stories.model.double()
    items = load_task("copa", 3) + load_task("arc_easy", 1) + load_task("winogrande", 2)
    requests = [r for item in items for r in item.requests]
    packed = loglikelihoods(stories.model, stories.tokenizer, requests, batch_size=16)
    for request, score in zip(requests, packed, strict=True):
        (alone,) = loglikelihoods(stories.model, stories.tokenizer, [request], batch_size=1)
        assert score.logprob == pytest.approx(alone.logprob, abs=1e-9)
        assert (score.greedy, score.tokens) == (alone.greedy, alone.tokens)


@pytest.mark.parametrize("family", sorted(CONFIGS))
@torch.no_grad()
def test_packed_scores_match_plain_forward_in_every_family(family):
    """Includes sliding-window layers (gemma2/3, window 16) and left truncation (max 256)."""
    model = tiny_model(family).double()
    tok = CharTokenizer()
    long_context = "a long story about many things " * 9  # 279 tokens > 256 positions
    requests = [
        ("The cat sat on the mat and", " looked at the dog for a while."),
        ("The cat sat on the mat and", " slept."),
        ("Tom", " ran home"),
        (long_context, " and then it ended."),
    ]
    scores = loglikelihoods(model, tok, requests, batch_size=3)
    for (context, continuation), score in zip(requests, scores, strict=True):
        context_ids, continuation_ids = encode_pair(tok, context, continuation)
        context_ids = context_ids[-(257 - len(continuation_ids)) :]  # lm-eval's truncation
        expected, greedy = plain_loglikelihood(model, context_ids, continuation_ids)
        assert score.logprob == pytest.approx(expected, abs=1e-6)
        assert score.greedy == greedy


@pytest.mark.parametrize("task", sorted(TASKS))
def test_task_file_parses_completely(task):
    """Every non-empty line is one item (JSON lines split on newlines only: TriviaQA has
    U+2028 inside its strings, which str.splitlines would cut at)."""
    items = load_task(task)
    with task_path(task).open(encoding="utf-8") as lines:
        assert len(items) == sum(1 for line in lines if line.strip())
    if TASKS[task].kind == "generation":  # a prompt and its accepted answers
        assert all(item.prompt and item.answers and all(item.answers) for item in items)
        return
    for item in items:
        assert 0 <= item.gold < len(item.requests) == len(item.choices)
        assert all(
            context and continuation.startswith(" ") for context, continuation in item.requests
        )
    if TASKS[task].kind == "multiple_choice":
        assert all(len(item.requests) >= 2 for item in items)


def test_prompts_follow_lm_eval_task_definitions():
    copa = load_task("copa", 1)[0]
    assert copa.requests[0] == (
        "The man turned on the faucet therefore",
        " the toilet filled with water.",
    )
    boolq = load_task("boolq", 1)[0]
    assert not boolq.requests[0][0].startswith("Passage:")
    assert boolq.requests[0][0].endswith("?\nAnswer:") and boolq.choices == ("no", "yes")
    piqa = load_task("piqa", 1)[0]
    assert (
        piqa.requests[0][0]
        == "Question: How do I ready a guinea pig cage for it's new occupants?\nAnswer:"
    )
    siqa = load_task("siqa", 1)[0]
    assert siqa.requests[0][0].startswith("Q: Tracy didn't go home that evening")
    assert siqa.requests[0][0].endswith("\nA:") and siqa.choices == (
        "make a new plan",
        "Find somewhere to go",
    )
    hellaswag = load_task("hellaswag", 1)[0]
    assert hellaswag.requests[0][0] == (
        "Pole vault: Pole vault is a sport where you run with a pole and stop and swing your body. A few women"
    )
    wino = load_task("winogrande", 1)[0]
    assert [r[0] for r in wino.requests] == [
        "Sarah was a much better surgeon than Maria so Sarah",
        "Sarah was a much better surgeon than Maria so Maria",
    ]
    assert {r[1] for r in wino.requests} == {" always got the easier cases."}
    lambada = load_task("lambada", 1)[0]
    assert lambada.requests[0][1] == " signs"


def test_hellaswag_preprocessing_removes_wikihow_artifacts(tmp_path, monkeypatch):
    row = {
        "activity_label": "Home",
        "ctx_a": "[header] How to clean a sink [title] Rinse it.",
        "ctx_b": "then",
        "endings": ["scrub  it [step] well.", "leave it."],
        "label": 1,
    }
    (tmp_path / "data" / "tasks").mkdir(parents=True)
    (tmp_path / "data" / "tasks" / "hellaswag_1k.jsonl").write_text(json.dumps(row) + "\n")
    monkeypatch.setenv("PRUNEKIT_DATA_DIR", str(tmp_path))
    (item,) = load_task("hellaswag")
    assert item.requests[0][0] == "Home: How to clean a sink. Rinse it. Then"
    assert item.choices == ("scrub it well.", "leave it.")


def test_bad_task_names_and_limits_are_one_line_errors(stories):
    with pytest.raises(prunekit.PrunekitError, match="unknown task 'piqaa'; valid: .*piqa"):
        load_task("piqaa")
    with pytest.raises(prunekit.PrunekitError, match="limit must be at least 1"):
        load_task("piqa", 0)
    with pytest.raises(prunekit.PrunekitError, match="unknown task 'nope'.*wikitext2.*piqa"):
        prunekit.evaluate(stories, ["piqa", "nope"], limit=1)
    with pytest.raises(prunekit.PrunekitError, match="unknown backend"):
        evaluate_tasks(stories.model, stories.tokenizer, ["piqa"], limit=1, backend="vllm")


def test_missing_task_file_names_the_setting(monkeypatch, tmp_path):
    monkeypatch.setenv("PRUNEKIT_DATA_DIR", str(tmp_path))
    with pytest.raises(prunekit.PrunekitError, match="PRUNEKIT_DATA_DIR"):
        load_task("piqa")


def test_evaluate_dispatches_perplexity_and_zeroshot(stories):
    results = prunekit.evaluate(
        stories, ["tinyshakespeare", "copa", "lambada", "hellaswag_1k"], seqlen=64, limit=2
    )
    assert list(results) == ["tinyshakespeare", "copa", "lambada", "hellaswag_1k"]
    assert (
        results["tinyshakespeare"]["windows"] == 2 and results["tinyshakespeare"]["perplexity"] > 1
    )
    assert (
        results["copa"]["n"] == 2
        and 0 <= results["copa"]["acc"] <= 1
        and "acc_norm" in results["copa"]
    )
    assert results["lambada"]["task"] == "lambada_openai" and results["lambada"]["perplexity"] > 1
    assert results["hellaswag_1k"]["task"] == "hellaswag" and results["hellaswag_1k"]["limit"] == 2


def test_lm_eval_hflm_loglikelihoods_agree(stories):
    pytest.importorskip("lm_eval")
    from prunekit.eval.lmeval import lmeval_loglikelihoods

    stories.model.double()
    requests = [r for item in load_task("piqa", 3) for r in item.requests]
    ours = loglikelihoods(stories.model, stories.tokenizer, requests, batch_size=4)
    theirs = lmeval_loglikelihoods(stories.model, stories.tokenizer, requests, batch_size=4)
    for a, b in zip(ours, theirs, strict=True):
        assert a.logprob == pytest.approx(b.logprob, abs=1e-4)
        assert a.greedy == b.greedy
    via_backend = evaluate_tasks(stories.model, stories.tokenizer, ["copa"], 4, 4, "lm-eval")
    direct = evaluate_tasks(stories.model, stories.tokenizer, ["copa"], 4, 4)
    assert via_backend["copa"]["backend"] == "lm-eval"
    assert via_backend["copa"]["acc"] == direct["copa"]["acc"]
    assert via_backend["copa"]["acc_norm"] == direct["copa"]["acc_norm"]


def test_llmkick_view_ratios():
    dense = {
        "wikitext2": {"perplexity": 20.0},
        "arc_easy": {"acc": 0.6},
        "openbook_qa": {"acc": 0.4},
        "piqa": {"acc": 0.7},
        "hellaswag_1k": {"acc": 0.5},
    }
    pruned = {
        "wikitext2": {"perplexity": 30.0},
        "arc_easy": {"acc": 0.3},
        "openbook_qa": {"acc": 0.3},
        "piqa": {"acc": 0.7},
        "hellaswag_1k": {"acc": 0.4},
    }
    view = llmkick_view(dense, pruned)
    assert view["perplexity_ratio"] == {"wikitext2": pytest.approx(1.5)}
    knowledge = view["groups"]["knowledge"]
    assert knowledge["tasks"] == ["arc_easy", "openbook_qa"]
    assert knowledge["retained"] == pytest.approx((0.5 + 0.75) / 2)
    assert knowledge["dense"] == pytest.approx(0.5) and knowledge["pruned"] == pytest.approx(0.3)
    language = view["groups"]["commonsense/language"]
    assert language["tasks"] == ["piqa", "hellaswag"]
    assert language["retained"] == pytest.approx((1.0 + 0.8) / 2)
    table = format_llmkick(view)
    assert "| knowledge | arc_easy, openbook_qa | 0.5000 | 0.3000 | 0.625 |" in table
    assert "| perplexity ratio | wikitext2 | | | 1.500 | |" in table
    assert set().union(*GROUPS.values()) == set(TASKS)


def test_llmkick_retention_above_chance():
    """(pruned − chance) / (dense − chance); a task whose dense score is at chance is left
    out of its group's mean (ARC at 0.25 on 4 choices)."""
    dense = {"piqa": {"acc": 0.7, "chance": 0.5}, "hellaswag": {"acc": 0.5, "chance": 0.25}}
    pruned = {"piqa": {"acc": 0.6, "chance": 0.5}, "hellaswag": {"acc": 0.3, "chance": 0.25}}
    dense |= {"arc_easy": {"acc": 0.25, "chance": 0.25}, "triviaqa": {"acc": 0.2, "chance": 0.0}}
    pruned |= {"arc_easy": {"acc": 0.3, "chance": 0.25}, "triviaqa": {"acc": 0.05, "chance": 0.0}}
    view = llmkick_view(dense, pruned)
    assert view["tasks"]["piqa"]["retained_above_chance"] == pytest.approx(0.5)
    assert view["tasks"]["hellaswag"]["retained_above_chance"] == pytest.approx(0.2)
    assert math.isnan(view["tasks"]["arc_easy"]["retained_above_chance"])
    language = view["groups"]["commonsense/language"]
    assert language["retained_above_chance"] == pytest.approx(0.35)
    assert view["groups"]["closed-book QA"]["retained_above_chance"] == pytest.approx(0.25)
    assert math.isnan(view["groups"]["knowledge"]["retained_above_chance"])


# -- closed-book QA scored on generated answers -----------------------------------------


def reference_normalize(text: str) -> str:
    """The TriviaQA / SQuAD evaluation scripts' normalisation, written out here."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


@pytest.mark.parametrize(
    ("prediction", "answers", "right"),
    [
        ("The Onion", ["Onion"], True),
        ("onions.", ["Onion", "Onions"], True),
        ("  Admiral Richard  Byrd!", ["Admiral Richard Byrd"], True),
        ("Richard Byrd", ["Admiral Richard Byrd"], False),
        ("an apple", ["Apple"], True),
        ("theatre", ["atre"], False),  # articles only as whole words
        ("", ["x"], False),
    ],
)
def test_exact_match_normalises_as_the_triviaqa_script(prediction, answers, right):
    assert exact_match(prediction, answers) is right
    assert right == any(reference_normalize(prediction) == reference_normalize(a) for a in answers)


def test_closed_book_items_keep_every_alias_and_prompt():
    trivia = load_task("triviaqa", limit=1)[0]
    assert trivia.prompt.startswith("Question: ") and trivia.prompt.endswith("\nAnswer:")
    assert trivia.answers[0] == "Onion" and "Allium cepa" in trivia.answers
    jeopardy = load_task("jeopardy", limit=1)[0]
    assert jeopardy.prompt.endswith("\nAnswer:") and jeopardy.answers == ("Admiral Richard Byrd",)
    wikidata = load_task("qa_wikidata", limit=1)[0]
    assert wikidata.prompt == "The native language of Daniel Schneidermann is"


def _greedy_without_cache(model, tokenizer, prompt: str, steps: int) -> str:
    """Argmax decoding by full forwards (no KV cache, no generate), cut at a newline."""
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    new = []
    with torch.no_grad():
        for _ in range(steps):
            token = int(
                model(torch.cat([ids, torch.tensor([new], dtype=ids.dtype)], 1))
                .logits[0, -1]
                .argmax()
            )
            if token == tokenizer.eos_token_id:
                break
            new.append(token)
            if "\n" in tokenizer.decode(new, skip_special_tokens=True).lstrip():
                break
    return tokenizer.decode(new, skip_special_tokens=True).lstrip().split("\n")[0]


@pytest.mark.parametrize("task", ["triviaqa", "jeopardy", "bigbench_qa_wikidata"])
def test_generation_tasks_score_the_greedy_answer(stories, task):
    result = evaluate_tasks(stories.model, stories.tokenizer, [task], limit=3)[task]
    items = load_task(task, limit=3)
    answers = [
        _greedy_without_cache(stories.model, stories.tokenizer, item.prompt, MAX_NEW_TOKENS)
        for item in items
    ]
    assert result["examples"] == answers
    right = [
        any(reference_normalize(a) == reference_normalize(g) for g in i.answers)
        for a, i in zip(answers, items, strict=True)
    ]
    assert result["acc"] == pytest.approx(sum(right) / 3)
    assert result["n"] == 3 and result["chance"] == 0.0


def test_cli_eval_and_prune_report_zeroshot_tasks(tmp_path):
    runner = CliRunner()
    out = tmp_path / "eval.json"
    result = runner.invoke(
        app, ["eval", "stories260k", "--tasks", "copa,arc_easy", "--limit", "2", "--json", str(out)]
    )
    assert result.exit_code == 0, result.output
    assert "copa" in result.output and "arc_easy" in result.output
    assert json.loads(out.read_text())["results"]["copa"]["n"] == 2
    result = runner.invoke(
        app,
        [
            "prune",
            "stories260k",
            "--method",
            "magnitude",
            "--sparsity",
            "0.5",
            "--eval",
            "copa,piqa",
            "--eval-limit",
            "2",
        ],
    )
    assert result.exit_code == 0, result.output
    assert (
        "LLM-Kick view" in result.output
        and "| commonsense/language | piqa, copa |" in result.output
    )
