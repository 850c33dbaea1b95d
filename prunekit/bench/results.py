"""Results as the report sees them: stored rows grouped by model and evaluation protocol,
each pruned row beside its dense baseline, and the curves drawn from them."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

from prunekit.bench.config import series_name
from prunekit.bench.store import Row
from prunekit.eval.llmkick import llmkick_view

ACCURACY = "acc"  # the metric shown and used for retained accuracy (share of items right)


def is_accuracy(result: dict) -> bool:
    """A zero-shot result carries `acc`; a perplexity dataset only `perplexity`."""
    return ACCURACY in result


def accuracy(result: dict) -> float:
    return float(result[ACCURACY])


def series_of(row: Row) -> str:
    cell = row.cell
    return (
        "dense"
        if cell.is_dense
        else series_name(cell.method, cell.options, cell.pattern, cell.allocation)
    )


@dataclass
class Group:
    """The rows of one model under one evaluation protocol; `dense` is their baseline."""

    model: str
    evaluation: dict
    dense: Row | None
    pruned: list[Row] = field(default_factory=list)

    @property
    def rows(self) -> list[Row]:
        """Dense first, then by series and sparsity."""
        return ([self.dense] if self.dense else []) + self.pruned

    @property
    def perplexity_tasks(self) -> list[str]:
        return [t for t in self.evaluation["tasks"] if not self._any(t, is_accuracy)]

    @property
    def accuracy_tasks(self) -> list[str]:
        return [t for t in self.evaluation["tasks"] if self._any(t, is_accuracy)]

    def _any(self, task: str, test) -> bool:
        return any(task in r.metrics and test(r.metrics[task]) for r in self.rows)

    def series(self) -> dict[str, list[Row]]:
        """Pruned rows by curve name, each sorted by sparsity."""
        curves: dict[str, list[Row]] = {}
        for row in self.pruned:
            curves.setdefault(series_of(row), []).append(row)
        return curves

    def perplexity_ratio(self, row: Row, task: str) -> float | None:
        if self.dense is None or task not in self.dense.metrics or task not in row.metrics:
            return None
        return row.metrics[task]["perplexity"] / self.dense.metrics[task]["perplexity"]

    def kick(self, row: Row) -> dict:
        """The LLM-Kick view of `row` against the dense baseline ({} without one)."""
        if self.dense is None:
            return {}
        return llmkick_view(self.dense.metrics, row.metrics, metric=ACCURACY)

    def task_groups(self) -> dict[str, list[str]]:
        """LLM-Kick groups with the tasks of this protocol in them."""
        if self.dense is None:
            return {}
        return {g: v["tasks"] for g, v in self.kick(self.dense)["groups"].items()}

    def retained(self, row: Row, group: str) -> float | None:
        """Mean over the group's tasks of pruned accuracy / dense accuracy."""
        found = self.kick(row).get("groups", {}).get(group)
        return None if found is None or math.isnan(found["retained"]) else found["retained"]

    def chance_floor(self, task: str) -> tuple[float, bool]:
        """(chance accuracy of `task`, whether the dense model is at or below it).

        "At chance": dense accuracy within one standard error of guessing,
        sqrt(c (1 - c) / n) for chance c on n items (20 items of 4-way ARC at 15% is).
        Results stored without `chance` count it as 0."""
        result = self.dense.metrics[task]
        chance = float(result.get("chance", 0.0))
        margin = math.sqrt(chance * (1 - chance) / max(int(result.get("n", 1)), 1))
        return chance, accuracy(result) <= chance + margin

    def above_chance(self, group: str) -> tuple[list[str], list[str]]:
        """The group's tasks split into (dense above chance, dense at or below chance)."""
        tasks = self.task_groups().get(group, [])
        low = [t for t in tasks if self.chance_floor(t)[1]]
        return [t for t in tasks if t not in low], low

    def corrected_retained(self, row: Row, group: str) -> float | None:
        """Chance-corrected retention, mean over the group's tasks whose dense accuracy is
        above chance: (pruned - chance) / (dense - chance); 1 = dense, 0 = guessing."""
        tasks, _ = self.above_chance(group)
        values = []
        for task in tasks:
            if task not in row.metrics:
                continue
            chance, _ = self.chance_floor(task)
            dense = accuracy(self.dense.metrics[task])
            values.append((accuracy(row.metrics[task]) - chance) / (dense - chance))
        return sum(values) / len(values) if values else None

    def ppl_curve(self, rows: list[Row], task: str) -> tuple[list[float], list[float]]:
        """(sparsities, log(ppl / dense ppl)) with the dense point (0, 0) first."""
        xs, ys = [0.0], [0.0]
        for row in rows:
            ratio = self.perplexity_ratio(row, task)
            if ratio is not None:
                xs.append(row.cell.sparsity)
                ys.append(math.log(ratio))
        return xs, ys

    def retained_curve(
        self, rows: list[Row], group: str, corrected: bool = False
    ) -> tuple[list[float], list[float]]:
        """(sparsities, retained accuracy of `group`, chance-corrected when asked) with
        the dense point (0, 1) first."""
        xs, ys = [0.0], [1.0]
        for row in rows:
            value = self.corrected_retained(row, group) if corrected else self.retained(row, group)
            if value is not None:
                xs.append(row.cell.sparsity)
                ys.append(value)
        return xs, ys


def group_rows(rows: list[Row]) -> list[Group]:
    """Rows grouped by (model, evaluation protocol), dense baseline attached."""
    groups: dict[tuple[str, str], Group] = {}
    for row in rows:
        cell = row.cell
        key = (cell.model, json.dumps(cell.evaluation, sort_keys=True))
        group = groups.setdefault(key, Group(cell.model, cell.evaluation, None))
        if cell.is_dense:
            group.dense = row
        else:
            group.pruned.append(row)
    for group in groups.values():
        group.pruned.sort(key=lambda r: (series_of(r), r.cell.sparsity or 0.0))
    return list(groups.values())
