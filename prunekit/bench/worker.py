"""`python -m prunekit.bench.worker JOB.json OUT.json`: run one cell in a fresh process.

JOB holds `{"cell": ..., "execution": ...}`; OUT receives `{"result": ...}` or, when the
cell fails, `{"error": "one line"}`. Progress bars go to this process's stderr.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from prunekit.bench.cell import run_outcome_from_dicts


def main(job_path: str, out_path: str) -> int:
    job = json.loads(Path(job_path).read_text())
    outcome = run_outcome_from_dicts(job["cell"], job["execution"])
    Path(out_path).write_text(json.dumps(outcome))
    return 0 if "result" in outcome else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
