"""LLM-Kick on SmolLM2-135M: closed-book QA (generation, exact match) and multiple-choice
tasks next to WikiText-2 perplexity, for Wanda and SparseGPT at 50% and 2:4.

    python benchmarks/llmkick.py --qa-limit 100 --mc-limit 100 --eval-limit 4

Retention is chance-corrected, (pruned − chance) / (dense − chance), per task and per
LLM-Kick group. Writes benchmarks/results/llmkick.json and .md after every model, so an
interrupted run keeps what it finished.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
CONFIGS = [("wanda", "unstructured"), ("sparsegpt", "unstructured"), ("wanda", "2:4"),
           ("sparsegpt", "2:4")]  # fmt: skip


def table(report: dict) -> str:
    """Markdown: one row per model, perplexity, accuracy and retention per group."""
    args = report["args"]
    dense = report["runs"][0]
    groups = [g for g in dense["llmkick"]["groups"]]
    lines = [
        f"{args['model']}; calibration {args['nsamples']} x {args['seqlen']} tokens of "
        f"WikiText-2 valid (seed 0); WikiText-2 test perplexity on the first "
        f"{args['eval_limit']} windows of 1024 tokens (the tokenized wiki.test.tokens, no "
        f"BOS); closed-book QA on the first {args['qa_limit']} items (greedy answer, exact "
        f"match), multiple choice on the first {args['mc_limit']} items; {args['threads']} "
        "thread(s). Command: `python benchmarks/llmkick.py "
        + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in args.items() if k != "model")
        + "`",
        "",
        "| model | WikiText-2 ppl | "
        + " | ".join(f"{g} acc | {g} retained above chance" for g in groups)
        + " |",
        "|---|---:|" + "---:|---:|" * len(groups),
    ]
    for run in report["runs"]:
        cells = [run["label"], f"{run['ppl']:.2f}"]
        for g in groups:
            row = run["llmkick"]["groups"].get(g, {})
            cells.append(f"{row.get('pruned', float('nan')):.3f}")
            kept = row.get("retained_above_chance")
            cells.append("-" if run is dense else f"{100 * kept:.1f}%")
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Per task (accuracy; chance in brackets):", ""]
    tasks = list(dense["results"])
    lines.append("| model | " + " | ".join(tasks) + " |")
    lines.append("|---|" + "---:|" * len(tasks))
    for run in report["runs"]:
        accs = [f"{run['results'][t]['acc']:.3f}" for t in tasks]
        lines.append(f"| {run['label']} | " + " | ".join(accs) + " |")
    chance = [f"{dense['results'][t].get('chance', 0):.2f}" for t in tasks]
    lines.append("| (chance) | " + " | ".join(chance) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--nsamples", type=int, default=16)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--eval-limit", type=int, default=4)
    parser.add_argument("--qa-limit", type=int, default=100)
    parser.add_argument("--mc-limit", type=int, default=100)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()

    import torch

    import prunekit
    from prunekit.eval.llmkick import llmkick_view

    torch.set_num_threads(args.threads)
    qa = ["triviaqa", "jeopardy", "bigbench_qa_wikidata"]
    mc = ["arc_easy", "arc_challenge", "piqa", "hellaswag"]
    report = {"args": vars(args), "runs": []}

    def evaluate(lm) -> dict:
        results = prunekit.evaluate(lm, ["wikitext2"], seqlen=1024, limit=args.eval_limit)
        results |= prunekit.evaluate(lm, qa, limit=args.qa_limit)
        results |= prunekit.evaluate(lm, mc, limit=args.mc_limit)
        return results

    dense_results = evaluate(prunekit.load_model(args.model))
    for label, method, pattern in [("dense", None, None)] + [
        (f"{m} {p}", m, p) for m, p in CONFIGS
    ]:
        print(f"== {label}", flush=True)
        start = time.perf_counter()
        if method is None:
            results = dense_results
        else:
            lm = prunekit.load_model(args.model)
            prunekit.prune(lm, method, pattern=pattern, nsamples=args.nsamples, seqlen=args.seqlen)
            results = evaluate(lm)
        scores = {k: v for k, v in results.items() if k != "wikitext2"}
        report["runs"].append(
            {
                "label": label,
                "ppl": results["wikitext2"]["perplexity"],
                "results": scores,
                "llmkick": llmkick_view(dense_results, results),
                "seconds": time.perf_counter() - start,
            }
        )
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "llmkick.json").write_text(json.dumps(report, indent=1))
        (RESULTS / "llmkick.md").write_text(table(report))
        print(table(report), flush=True)


if __name__ == "__main__":
    main()
