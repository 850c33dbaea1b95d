"""Writing a benchmark's JSON and Markdown under `benchmarks/results/`, and merging
shards: runs of one benchmark with the same settings, split over processes by one
argument (methods, sparsities)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def write(payload: dict, name: str, markdown: Callable[[dict], str]) -> None:
    """`results/<name>.json` (the payload) and `results/<name>.md` (its table)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(payload, indent=2) + "\n")
    (RESULTS / f"{name}.md").write_text(markdown(payload))


def merge(names: list[str], name: str, split_by: str, markdown: Callable[[dict], str]) -> None:
    """One result `name` from shards `names` whose args differ only in `split_by` (their
    values joined by commas); dense and the other args come from the first shard."""
    shards = [json.loads((RESULTS / f"{n}.json").read_text()) for n in names]
    payload = {**shards[0], "runs": [r for s in shards for r in s["runs"]], "shards": names}
    joined = ",".join(s["args"][split_by] for s in shards)
    payload["args"] = {**shards[0]["args"], split_by: joined, "name": name}
    write(payload, name, markdown)
