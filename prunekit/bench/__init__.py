"""Bench: sweeps over models x methods x sparsities x patterns x allocations, a SQLite
results store keyed by configuration hash, and Markdown/HTML reports with plots.

The top of the flow: may import the API and every layer below it, never the CLI.
"""

from prunekit.bench.config import Cell, Execution, SweepConfig, load_config, parse_config
from prunekit.bench.executors import LocalExecutor, RayExecutor, make_executor
from prunekit.bench.store import ResultStore, Row
from prunekit.bench.sweep import SweepSummary, run_sweep

__all__ = [
    "Cell",
    "Execution",
    "LocalExecutor",
    "RayExecutor",
    "ResultStore",
    "Row",
    "SweepConfig",
    "SweepSummary",
    "load_config",
    "make_executor",
    "parse_config",
    "run_sweep",
]
