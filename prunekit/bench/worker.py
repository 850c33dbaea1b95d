"""`python -m prunekit.bench.worker JOB.json OUT.json`: run one cell in a fresh process.

JOB holds `{"cell": ..., "execution": ...}`; OUT receives `{"result": ...}` or, when the
cell fails, `{"error": "one line"}`. Progress bars go to this process's stderr.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from prunekit.bench.cell import error_line, run_cell
from prunekit.bench.config import Cell, Execution


def main(job_path: str, out_path: str) -> int:
    job = json.loads(Path(job_path).read_text())
    cell, execution = Cell(**job["cell"]), Execution(**job["execution"])
    try:
        outcome = {"result": run_cell(cell, execution)}
    except Exception as err:  # noqa: BLE001 - any failure is recorded against the cell
        outcome = {"error": error_line(err)}
    Path(out_path).write_text(json.dumps(outcome))
    return 0 if "result" in outcome else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
