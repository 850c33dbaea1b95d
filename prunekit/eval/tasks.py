"""Zero-shot task files (`$PRUNEKIT_DATA_DIR/data/tasks/*.jsonl`) turned into scoring requests.

Each task's prompt follows lm-evaluation-harness's task definition: a context, then each
choice after a one-space target delimiter. The files come in three formats: `{query,
choices, gold}` (most), the schema format `{context_options, continuation, gold}`
(WinoGrande, WSC: partial scoring, the continuation is scored after each option) and
HellaSwag's original `{ctx_a, ctx_b, activity_label, endings, label}`; LAMBADA is
`{context, continuation}`. The closed-book QA tasks (TriviaQA, Jeopardy, BIG-bench
qa_wikidata) are prompts answered by generation (`QAItem`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from prunekit import settings
from prunekit.errors import PrunekitError, choice_error, read_text
from prunekit.eval.generation import QAItem

DELIMITER = " "


@dataclass(frozen=True)
class Item:
    """One task item: a `(context, continuation)` request per choice, the gold index, and
    the choice texts whose UTF-8 byte lengths normalise `acc_norm`."""

    requests: tuple[tuple[str, str], ...]
    gold: int
    choices: tuple[str, ...]


def _choices_item(context: str, choices: list[str], gold: int) -> Item:
    requests = tuple((context, DELIMITER + choice) for choice in choices)
    return Item(requests, int(gold), tuple(choices))


def _partial_item(row: dict) -> Item:
    """Schema format: the shared continuation scored after each context option."""
    continuation = row["continuation"]
    requests = tuple((option, DELIMITER + continuation) for option in row["context_options"])
    return Item(requests, int(row["gold"]), (continuation,) * len(requests))


def _question_answer(row: dict) -> Item:
    """ARC: `Question: ...` + `\\nAnswer:`."""
    return _choices_item(row["query"].rstrip() + "\nAnswer:", row["choices"], row["gold"])


def _query_as_is(row: dict) -> Item:
    """OpenBookQA (question stem) and CommonsenseQA (letters after `Answer:`)."""
    return _choices_item(row["query"], row["choices"], row["gold"])


def _boolq(row: dict) -> Item:
    """`{passage}\\nQuestion: {question}?\\nAnswer:` with choices no/yes."""
    passage = row["query"].removeprefix("Passage: ")
    return _choices_item(passage + "\nAnswer:", row["choices"], row["gold"])


def _copa(row: dict) -> Item:
    """`{premise without its period} because|therefore`, then the lower-cased choice."""
    context = re.sub(r",\s*(because|therefore)$", r" \1", row["query"].rstrip())
    choices = [c[:1].lower() + c[1:] for c in row["choices"]]
    return _choices_item(context, choices, row["gold"])


_SIQA = re.compile(r"Context: (.*)\nQuestion: (.*)\nChoices:\n((?:[A-Z]\. .*\n)+)Answer:\Z", re.S)


def _siqa(row: dict) -> Item:
    """Letter-format file turned back into lm-eval's `Q: {context} {question}\\nA:` cloze."""
    match = _SIQA.match(row["query"])
    if match is None:
        raise ValueError("SIQA query is not 'Context/Question/Choices/Answer' formatted")
    context, question, listing = match.groups()
    choices = [line[3:] for line in listing.splitlines()]
    return _choices_item(f"Q: {context} {question}\nA:", choices, row["gold"])


def _hellaswag_clean(text: str) -> str:
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def _hellaswag(row: dict) -> Item:
    """lm-eval's preprocessing: `{activity}: {ctx_a} {Ctx_b}` and cleaned endings."""
    context = _hellaswag_clean(
        row["activity_label"] + ": " + row["ctx_a"] + " " + row["ctx_b"].capitalize()
    )
    choices = [_hellaswag_clean(ending) for ending in row["endings"]]
    return _choices_item(context, choices, row["label"])


def _piqa(row: dict) -> Item:
    """`Question: {goal}\\nAnswer:`."""
    return _choices_item(row["query"].rstrip() + "\nAnswer:", row["choices"], row["gold"])


def _lambada(row: dict) -> Item:
    """The passage without its last word; the last word (after a space) is the target."""
    word = row["continuation"]
    return Item(((row["context"], DELIMITER + word),), 0, (word,))


def _triviaqa(row: dict) -> QAItem:
    """Closed-book TriviaQA: `Question: ...\nAnswer:`; the answer or any alias counts."""
    return QAItem(row["context"], tuple(dict.fromkeys([row["answer"], *row["aliases"]])))


def _jeopardy(row: dict) -> QAItem:
    """`CATEGORY: clue\nAnswer:`; the continuation is the answer."""
    return QAItem(row["context"].rstrip() + "\nAnswer:", (row["continuation"],))


def _completion(row: dict) -> QAItem:
    """BIG-bench qa_wikidata: a factoid sentence the model completes."""
    return QAItem(row["context"], (row["continuation"],))


@dataclass(frozen=True)
class TaskSpec:
    """A named task: its file under data/tasks, how a row becomes an `Item`, its kind."""

    name: str
    filename: str
    build: Callable[[dict], Item | QAItem]
    # "multiple_choice"; "lambada": last-word accuracy and perplexity; "generation":
    # exact match of a greedy answer (prunekit.eval.generation)
    kind: str = "multiple_choice"


TASKS: dict[str, TaskSpec] = {
    spec.name: spec
    for spec in (
        TaskSpec("arc_easy", "arc_easy.jsonl", _question_answer),
        TaskSpec("arc_challenge", "arc_challenge.jsonl", _question_answer),
        TaskSpec("boolq", "boolq.jsonl", _boolq),
        TaskSpec("commonsense_qa", "commonsense_qa.jsonl", _query_as_is),
        TaskSpec("copa", "copa.jsonl", _copa),
        TaskSpec("hellaswag", "hellaswag_1k.jsonl", _hellaswag),
        TaskSpec("lambada_openai", "lambada_openai.jsonl", _lambada, kind="lambada"),
        TaskSpec("openbook_qa", "openbook_qa.jsonl", _query_as_is),
        TaskSpec("piqa", "piqa.jsonl", _piqa),
        TaskSpec("siqa", "siqa.jsonl", _siqa),
        TaskSpec("winograd_wsc", "winograd_wsc.jsonl", _partial_item),
        TaskSpec("winogrande", "winogrande.jsonl", _partial_item),
        TaskSpec("triviaqa", "triviaqa_sm_sub.jsonl", _triviaqa, kind="generation"),
        TaskSpec("jeopardy", "jeopardy_all.jsonl", _jeopardy, kind="generation"),
        TaskSpec(
            "bigbench_qa_wikidata", "bigbench_qa_wikidata.jsonl", _completion, kind="generation"
        ),
    )
}
ALIASES = {
    "hellaswag_1k": "hellaswag",
    "lambada": "lambada_openai",
    "openbookqa": "openbook_qa",
    "qa_wikidata": "bigbench_qa_wikidata",
    "triviaqa_sm_sub": "triviaqa",
    "social_iqa": "siqa",
    "wsc": "winograd_wsc",
    "wsc273": "winograd_wsc",
}


def canonical_task(name: str) -> str | None:
    """The registered name of a task name or alias, else None."""
    name = name.strip().lower()
    name = ALIASES.get(name, name)
    return name if name in TASKS else None


def task_path(name: str) -> Path:
    """Where task `name`'s file lives: `$PRUNEKIT_DATA_DIR/data/tasks/<file>`."""
    spec = TASKS[name]
    root = settings.data_dir()
    path = root / "data" / "tasks" / spec.filename if root else None
    if path is None or not path.is_file():
        raise PrunekitError(
            f"task {name!r} reads data/tasks/{spec.filename} under $PRUNEKIT_DATA_DIR; "
            "set PRUNEKIT_DATA_DIR to the folder that holds data/tasks"
        )
    return path


def load_task(name: str, limit: int | None = None) -> list[Item] | list[QAItem]:
    """The first `limit` items (all when None) of task `name` (a name or alias)."""
    canonical = canonical_task(name)
    if canonical is None:
        raise choice_error("task", name, sorted(TASKS))
    if limit is not None and limit < 1:
        raise PrunekitError(f"limit must be at least 1, got {limit}")
    spec, path = TASKS[canonical], task_path(canonical)
    items = []
    for number, line in enumerate(read_text(path, "task file").split("\n"), start=1):
        if limit is not None and len(items) >= limit:
            break
        if not line.strip():
            continue
        try:
            items.append(spec.build(json.loads(line)))
        except (KeyError, ValueError, TypeError) as err:
            raise PrunekitError(f"{path}:{number}: not a {canonical} item ({err})") from err
    return items
