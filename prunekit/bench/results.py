"""Results as the report sees them: stored rows grouped by model and evaluation protocol,
each pruned row beside its dense baseline, and the curves drawn from them."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

from prunekit.bench.config import series_name
from prunekit.bench.store import Row


def is_accuracy(result: dict) -> bool:
    """A zero-shot result carries `acc`; a perplexity dataset only `perplexity`."""
    return "acc" in result


def accuracy(result: dict) -> float:
    """The accuracy the report shows for a task: `acc` (share of items right)."""
    return float(result["acc"])


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

    def retained(self, row: Row, tasks: list[str]) -> float | None:
        """Mean over `tasks` of pruned accuracy / dense accuracy (None if any is missing)."""
        if self.dense is None:
            return None
        ratios = []
        for task in tasks:
            dense, pruned = self.dense.metrics.get(task), row.metrics.get(task)
            if not dense or not pruned or accuracy(dense) == 0:
                return None
            ratios.append(accuracy(pruned) / accuracy(dense))
        return sum(ratios) / len(ratios) if ratios else None

    def ppl_curve(self, rows: list[Row], task: str) -> tuple[list[float], list[float]]:
        """(sparsities, log(ppl / dense ppl)) with the dense point (0, 0) first."""
        xs, ys = [0.0], [0.0]
        for row in rows:
            ratio = self.perplexity_ratio(row, task)
            if ratio is not None:
                xs.append(row.cell.sparsity)
                ys.append(math.log(ratio))
        return xs, ys

    def retained_curve(self, rows: list[Row], tasks: list[str]) -> tuple[list[float], list[float]]:
        """(sparsities, retained accuracy) with the dense point (0, 1) first."""
        xs, ys = [0.0], [1.0]
        for row in rows:
            value = self.retained(row, tasks)
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
