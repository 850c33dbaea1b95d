"""The results store: one SQLite row per cell, keyed by the cell's configuration hash.

A row is written (and committed) as soon as its cell finishes, so an interrupted sweep
loses at most the cells that were running. `status` is "done" or "failed"; a failed cell
is run again by the next sweep, a done cell never is. `attempts` counts its runs.
"""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from prunekit.bench.config import Cell
from prunekit.errors import PrunekitError

SCHEMA_VERSION = 1
SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS cells (
    key TEXT PRIMARY KEY,        -- sha256 of the cell's full configuration
    status TEXT NOT NULL,        -- done | failed
    model TEXT NOT NULL,
    method TEXT NOT NULL,        -- 'dense' for the baseline
    sparsity REAL,
    pattern TEXT,
    allocation TEXT,
    seed INTEGER,
    config TEXT NOT NULL,        -- the cell as JSON (what `key` hashes)
    metrics TEXT,                -- {task: result} as JSON
    prune TEXT,                  -- pruning facts as JSON (null for dense)
    timing TEXT,                 -- load/prune/eval/total seconds inside the worker
    data_hashes TEXT,            -- {name: sha256}
    versions TEXT,               -- package versions of the worker
    wall_time_s REAL,            -- whole cell, worker start-up included
    peak_rss_mb REAL,            -- peak resident memory of the cell's worker process
    error TEXT,
    attempts INTEGER NOT NULL,
    finished_at TEXT NOT NULL
);
"""


@dataclass
class Row:
    """A stored cell with its outcome; JSON columns decoded."""

    key: str
    status: str
    cell: Cell
    metrics: dict[str, dict]
    prune: dict[str, Any] | None
    timing: dict[str, float]
    data_hashes: dict[str, str]
    versions: dict[str, str]
    wall_time_s: float | None
    peak_rss_mb: float | None
    error: str | None
    attempts: int
    finished_at: str


def _loads(text: str | None) -> Any:
    return json.loads(text) if text else None


COLUMNS = {
    "key", "status", "model", "method", "sparsity", "pattern", "allocation", "seed", "config",
    "metrics", "prune", "timing", "data_hashes", "versions", "wall_time_s", "peak_rss_mb",
    "error", "attempts", "finished_at",
}  # fmt: skip


class ResultStore:
    """A results database file (created on first use unless `read_only`).

    Several processes may open (and create) one store at once; a read-only store is
    never written, and a file with another schema is refused in one line.
    """

    def __init__(self, path: str | Path, read_only: bool = False):
        self.path = Path(path)
        if read_only and not self.path.is_file():
            raise PrunekitError(f"results store not found: {self.path}")
        try:
            if read_only:
                self.db = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=30)
            else:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self.db = sqlite3.connect(self.path, timeout=30)
                self.db.executescript(SCHEMA)
                with self.db:
                    self.db.execute(
                        "INSERT OR IGNORE INTO meta VALUES ('schema', ?)", (str(SCHEMA_VERSION),)
                    )
            tables = {n for (n,) in self.db.execute("SELECT name FROM sqlite_master")}
            found = (
                self.db.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
                if "meta" in tables
                else None
            )
            columns = (
                {row[1] for row in self.db.execute("PRAGMA table_info(cells)")}
                if "cells" in tables
                else set()
            )
        except sqlite3.DatabaseError as err:
            raise PrunekitError(f"{self.path} is not a prunekit results store ({err})") from None
        if found is None or not columns >= COLUMNS:
            raise PrunekitError(f"{self.path} is not a prunekit results store (no cells table)")
        if int(found[0]) != SCHEMA_VERSION:
            raise PrunekitError(
                f"{self.path} has results schema {found[0]}; this prunekit reads {SCHEMA_VERSION}"
            )

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> ResultStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def done_keys(self) -> set[str]:
        return {k for (k,) in self.db.execute("SELECT key FROM cells WHERE status='done'")}

    def put(self, cell: Cell, outcome: dict[str, Any]) -> None:
        """Record a finished run of `cell`: `outcome` is `{"result": ...}` or `{"error": ...}`."""
        result = outcome.get("result") or {}
        previous = self.db.execute("SELECT attempts FROM cells WHERE key=?", (cell.key,)).fetchone()
        values = {
            "key": cell.key,
            "status": "done" if "result" in outcome else "failed",
            "model": cell.model,
            "method": cell.method,
            "sparsity": cell.sparsity,
            "pattern": cell.pattern,
            "allocation": cell.allocation,
            "seed": cell.seed,
            "config": json.dumps(cell.as_dict(), sort_keys=True),
            "metrics": json.dumps(result.get("metrics")),
            "prune": json.dumps(result.get("prune")),
            "timing": json.dumps(result.get("timing")),
            "data_hashes": json.dumps(result.get("data_hashes")),
            "versions": json.dumps(result.get("versions")),
            "wall_time_s": outcome.get("wall_time_s"),
            "peak_rss_mb": result.get("peak_rss_mb"),
            "error": outcome.get("error"),
            "attempts": (previous[0] if previous else 0) + 1,
            "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        columns = ", ".join(values)
        marks = ", ".join(f":{name}" for name in values)
        with self.db:
            self.db.execute(f"INSERT OR REPLACE INTO cells ({columns}) VALUES ({marks})", values)

    def rows(self, status: str | None = "done") -> list[Row]:
        """Stored rows (only `status` ones unless None), in insertion order."""
        query = "SELECT * FROM cells" + (" WHERE status=?" if status else "") + " ORDER BY rowid"
        cursor = self.db.execute(query, (status,) if status else ())
        names = [d[0] for d in cursor.description]
        rows = []
        for values in cursor.fetchall():
            raw = dict(zip(names, values, strict=True))
            rows.append(
                Row(
                    key=raw["key"],
                    status=raw["status"],
                    cell=Cell(**json.loads(raw["config"])),
                    metrics=_loads(raw["metrics"]) or {},
                    prune=_loads(raw["prune"]),
                    timing=_loads(raw["timing"]) or {},
                    data_hashes=_loads(raw["data_hashes"]) or {},
                    versions=_loads(raw["versions"]) or {},
                    wall_time_s=raw["wall_time_s"],
                    peak_rss_mb=raw["peak_rss_mb"],
                    error=raw["error"],
                    attempts=raw["attempts"],
                    finished_at=raw["finished_at"],
                )
            )
        return rows
