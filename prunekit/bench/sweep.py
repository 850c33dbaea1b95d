"""Run a sweep: every cell not yet done in the store, dense baselines first."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

from prunekit.bench.config import Cell, SweepConfig
from prunekit.bench.store import ResultStore
from prunekit.errors import PrunekitError
from prunekit.progress import progress as tqdm


@dataclass
class SweepSummary:
    """What a sweep did: `ran` cells executed now, `skipped` already done in the store."""

    total: int
    skipped: int
    ran: int = 0
    failed: list[str] = field(default_factory=list)  # "label: error" per failed cell


def check_cells(config: SweepConfig) -> None:
    """Fail in one line, before any cell runs, on what would fail every cell of a model:
    a model that cannot be resolved, or windows longer than its context."""
    from prunekit.models.loading import inspect_model

    facts = {model: inspect_model(model) for model in {c.model for c in config.cells}}
    for cell in config.cells:
        limit = facts[cell.model].max_context
        windows = {"evaluation.seqlen": cell.evaluation["seqlen"]}
        if cell.calibration:
            windows["calibration.seqlen"] = cell.calibration["seqlen"]
        for where, seqlen in windows.items():
            if limit is not None and seqlen > limit:
                raise PrunekitError(
                    f"sweep config {where}: {seqlen} exceeds the context of model "
                    f"{cell.model!r} ({limit} tokens)"
                )


def run_sweep(config: SweepConfig, store: ResultStore, executor) -> SweepSummary:
    """Execute the cells of `config` missing from `store`, recording each as it finishes.

    Cells are de-duplicated by key, so a dense baseline shared by many rows runs once.
    Several sweeps may share a store: a cell another one finished is skipped.
    """
    unique = {cell.key: cell for cell in config.cells}
    done = store.done_keys()
    pending = [cell for key, cell in unique.items() if key not in done]
    summary = SweepSummary(total=len(unique), skipped=len(unique) - len(pending))
    if not pending:
        return summary
    bar = tqdm(total=len(pending), desc="bench", unit="cell")

    def show_start(cell: Cell | None) -> None:
        bar.set_postfix_str(f"running {cell.label}" if cell else f"{len(pending)} tasks submitted")

    def still_pending() -> Iterator[Cell]:
        """The pending cells, each re-checked just before it starts: another `bench`
        sharing the store may have finished it meanwhile."""
        for cell in pending:
            if cell.key in store.done_keys():
                summary.skipped += 1
                bar.write(f"skipped: {cell.label} (finished by another run)")
                bar.update()
                continue
            yield cell

    for cell, outcome in executor.run(still_pending(), config.execution, on_start=show_start):
        store.put(cell, outcome)
        summary.ran += 1
        line = f"{cell.label} ({outcome['wall_time_s']:.1f} s)"
        if "error" in outcome:
            summary.failed.append(f"{cell.label}: {outcome['error']}")
            line += f": {outcome['error']}"
        bar.write(("failed: " if "error" in outcome else "done: ") + line)
        bar.update()
    bar.close()
    return summary
