"""One process against two (torchrun, gloo) pruning SmolLM2-135M, one thread each.

Wanda and SparseGPT at 50%, 64 x 512 WikiText-2 calibration windows: wall time of the
whole job and each rank's peak RSS. With two processes each rank runs every block on half
of the windows; statistics are all-reduced; the per-layer solves (SparseGPT's) run on
every rank.

    python benchmarks/distributed.py
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def run(method: str, processes: int, work: Path, nsamples: int) -> dict:
    out = work / f"{method}-{processes}"
    json_path = work / f"{method}-{processes}.json"
    prune = ["-m", "prunekit", "prune", "smollm2-135m", "--method", method, "--calib",
             "wikitext2", "--nsamples", str(nsamples), "--seqlen", "512", "--threads", "1",
             "--out", str(out), "--overwrite", "--json", str(json_path)]  # fmt: skip
    if processes == 1:
        cmd = [sys.executable, *prune]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc-per-node", str(processes), *prune]  # fmt: skip
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - start
    if done.returncode:
        raise SystemExit(done.stderr[-3000:])
    record = json.loads(json_path.read_text())
    peak = re.search(r"peak RSS (\d+) MiB", done.stdout)
    return {
        "method": method,
        "processes": processes,
        "wall_s": wall,
        "prune_s": record["wall_time_s"],
        "rank0_peak_rss_mb": float(peak.group(1)) if peak else None,
        "sparsity": record["overall_sparsity"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", type=Path, default=ROOT / "out" / "distributed")
    parser.add_argument("--nsamples", type=int, default=64)
    parser.add_argument("--methods", default="wanda,sparsegpt")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    rows = []
    for method in args.methods.split(","):
        for processes in (1, 2):
            rows.append(run(method, processes, args.work, args.nsamples))
            print(json.dumps(rows[-1]), flush=True)
    lines = [
        "| method | processes | job wall (s) | pruning (s) | speed-up | rank-0 peak RSS (MiB) |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        base = next(b for b in rows if b["method"] == r["method"] and b["processes"] == 1)
        lines.append(
            f"| {r['method']} | {r['processes']} | {r['wall_s']:.1f} | {r['prune_s']:.1f} | "
            f"{base['prune_s'] / r['prune_s']:.2f}x | {r['rank0_peak_rss_mb']:.0f} |"
        )
    command = "python benchmarks/distributed.py " + " ".join(sys.argv[1:])
    note = (
        f"SmolLM2-135M, {args.nsamples} x 512 WikiText-2 calibration windows, one thread per "
        f"process, gloo on CPU, 2 cores. Command: `{command}`"
    )
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "distributed.json").write_text(json.dumps({"note": note, "rows": rows}, indent=2))
    (RESULTS / "distributed.md").write_text(note + "\n\n" + "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
