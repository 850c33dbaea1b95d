"""Zero-shot scoring throughput on PIQA: prunekit's packed scorer versus lm-eval's HFLM
(when importable) and a naive one-request-at-a-time loop, on the same items and model.

    python benchmarks/eval_speed.py --items 200 --repeats 3

Runs are interleaved (the order rotates each repeat) and medians reported, since the
machine is shared. Also records how far each scorer's log-likelihoods are from prunekit's.
Writes benchmarks/results/eval_speed.json and .md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def naive_loglikelihoods(model, tokenizer, requests, batch_size=1, desc=None):
    """One plain forward per request over context + continuation (no batching, no sharing)."""
    import torch
    import torch.nn.functional as F

    from prunekit.eval.loglik import Score, encode_pair

    scores = []
    with torch.no_grad():
        for context, continuation in requests:
            context_ids, continuation_ids = encode_pair(tokenizer, context, continuation)
            ids = torch.tensor([(context_ids + continuation_ids)[:-1]])
            logprobs = F.log_softmax(model(input_ids=ids).logits[0].float(), dim=-1)
            predicted = logprobs[len(context_ids) - 1 :]
            targets = torch.tensor(continuation_ids)
            total = predicted.gather(1, targets[:, None]).sum().item()
            greedy = bool((predicted.argmax(-1) == targets).all())
            scores.append(Score(total, greedy, len(continuation_ids)))
    return scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--task", default="piqa")
    parser.add_argument("--items", type=int, default=200, help="first N items of the task")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--name", default="eval_speed")
    args = parser.parse_args()

    import torch

    import prunekit
    from prunekit.eval.loglik import loglikelihoods
    from prunekit.eval.tasks import load_task
    from prunekit.eval.zeroshot import multiple_choice_metrics
    from prunekit.export.record import versions

    torch.set_num_threads(args.threads)
    lm = prunekit.load_model(args.model)
    items = load_task(args.task, args.items)
    requests = [r for item in items for r in item.requests]
    scorers = {"prunekit": loglikelihoods}
    try:
        import lm_eval  # noqa: F401

        from prunekit.eval.lmeval import lmeval_loglikelihoods

        scorers["lm-eval HFLM"] = lmeval_loglikelihoods
    except ImportError:
        print("lm-eval not importable: comparing with the naive loop only", flush=True)
    scorers["naive loop"] = naive_loglikelihoods

    names = list(scorers)
    seconds: dict[str, list[float]] = {name: [] for name in names}
    scores = {}
    for repeat in range(args.repeats):
        order = names[repeat % len(names) :] + names[: repeat % len(names)]
        for name in order:
            start = time.perf_counter()
            scores[name] = scorers[name](
                lm.model, lm.tokenizer, requests, batch_size=args.batch_size, desc=None
            )
            seconds[name].append(time.perf_counter() - start)
            print(f"repeat {repeat} {name}: {seconds[name][-1]:.1f} s", flush=True)

    reference = scores["prunekit"]
    rows = {}
    for name in names:
        median = statistics.median(seconds[name])
        metrics = multiple_choice_metrics(items, scores[name])
        rows[name] = {
            "seconds": seconds[name],
            "median_s": median,
            "items_per_s": len(items) / median,
            "speedup_of_prunekit": median / statistics.median(seconds["prunekit"]),
            "max_abs_loglik_diff": max(
                abs(a.logprob - b.logprob) for a, b in zip(scores[name], reference, strict=True)
            ),
            "acc": metrics["acc"],
            "acc_norm": metrics["acc_norm"],
        }
    command = "python benchmarks/eval_speed.py " + " ".join(sys.argv[1:])
    payload = {
        "model": args.model,
        "task": args.task,
        "items": len(items),
        "requests": len(requests),
        "repeats": args.repeats,
        "batch_size": args.batch_size,
        "threads": args.threads,
        "command": command.strip(),
        "results": rows,
        "versions": versions(),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(payload, indent=2) + "\n")
    lines = [
        f"{args.model}, {len(items)} {args.task} items ({len(requests)} requests), batch size "
        f"{args.batch_size}, {args.threads} threads, median of {args.repeats} interleaved "
        f"repeats (`{payload['command']}`).",
        "",
        "| scorer | median s | items/s | prunekit faster by | max abs Δ loglik | acc | acc_norm |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in rows.items():
        lines.append(
            f"| {name} | {r['median_s']:.1f} | {r['items_per_s']:.2f} | "
            f"{r['speedup_of_prunekit']:.2f}x | {r['max_abs_loglik_diff']:.2e} | "
            f"{r['acc']:.4f} | {r['acc_norm']:.4f} |"
        )
    (RESULTS / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
