"""Dense SmolLM2-135M zero-shot accuracy on all twelve task files.

    python benchmarks/zeroshot_smollm2.py --limit 200    # first 200 items of each task

Writes benchmarks/results/zeroshot_smollm2.json and .md (the limit is recorded in both)
after every task, so an interrupted run keeps the tasks it finished; `--order cheap`
runs the shortest prompts first.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--limit", type=int, default=200, help="first N items of each task")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--name", default="zeroshot_smollm2")
    parser.add_argument("--order", choices=["listed", "cheap"], default="listed")
    args = parser.parse_args()

    import torch

    import prunekit
    from prunekit.eval.tasks import TASKS
    from prunekit.eval.zeroshot import evaluate_tasks
    from prunekit.export.record import versions

    torch.set_num_threads(args.threads)
    lm = prunekit.load_model(args.model)
    order = list(TASKS)
    if args.order == "cheap":
        order = sorted(order, key=lambda t: _prompt_chars(t, args.limit))
    command = "python benchmarks/zeroshot_smollm2.py " + " ".join(sys.argv[1:])
    rows = {}
    for task in order:
        start = time.perf_counter()
        result = evaluate_tasks(lm.model, lm.tokenizer, [task], args.limit, args.batch_size)[task]
        result["seconds"] = time.perf_counter() - start
        rows[task] = result
        print(f"{task}: {json.dumps(result)}", flush=True)
        _write(args, command.strip(), {t: rows[t] for t in TASKS if t in rows}, versions())


def _prompt_chars(task: str, limit: int) -> int:
    """Characters of all requests of the task's first `limit` items (a cost proxy)."""
    from prunekit.eval.tasks import load_task

    return sum(len(c) + len(x) for item in load_task(task, limit) for c, x in item.requests)


def _write(args: argparse.Namespace, command: str, rows: dict, versions: dict) -> None:
    from prunekit.eval.tasks import TASKS

    payload = {
        "model": args.model,
        "limit": args.limit,
        "batch_size": args.batch_size,
        "threads": args.threads,
        "command": command,
        "results": rows,
        "missing": [t for t in TASKS if t not in rows],
        "versions": versions,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(payload, indent=2) + "\n")
    lines = [
        f"Dense {args.model}, zero-shot, first {args.limit} items per task "
        f"(`{command}`). acc_norm divides by the choice's UTF-8 byte length; "
        "for LAMBADA the second column is the perplexity of the last word.",
        "",
        "| task | n | acc | ± | acc_norm / ppl | s |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for task, r in rows.items():
        second = r.get("acc_norm", r.get("perplexity"))
        lines.append(
            f"| {task} | {r['n']} | {r['acc']:.4f} | {r['acc_stderr']:.4f} | "
            f"{second:.4f} | {r['seconds']:.0f} |"
        )
    if payload["missing"]:
        lines += ["", f"Not run in the time available: {', '.join(payload['missing'])}."]
    (RESULTS / f"{args.name}.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
