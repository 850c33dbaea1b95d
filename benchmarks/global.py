"""Global and search-based pruning on SmolLM2-135M: LLM Surgeon, SparseLLM (AdaGP) and the
accuracy-predictor allocation next to SparseGPT and Wanda with OWL, at 50/60/70% and 2:4.

Every row prunes a fresh copy from the same WikiText-2 calibration windows and is scored
on WikiText-2 and PTB (test splits, reference protocol: no BOS per window), with its
pruning wall time. Rows are merged into the JSON as they finish (a rerun of a row
replaces it; a stopped run keeps the finished ones); `--report` rewrites the markdown.

    python benchmarks/global.py --sparsities 0.5 --eval-limit 16 \
        --surgeon-options shots=4,max_correlate=1
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
ROWS = {  # label: (method, allocation, options)
    "sparsegpt": ("sparsegpt", "uniform", {}),
    "wanda+owl": ("wanda", "owl", {}),
    "wanda+predictor": ("wanda", "predictor", {}),
    "llm_surgeon": ("llm_surgeon", "uniform", {}),
    "sparsellm": ("sparsellm", "uniform", {}),
}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated: {', '.join(ROWS)}")
    p.add_argument("--sparsities", default="0.5,0.6,0.7,2:4", help="ratios and/or N:M")
    p.add_argument("--nsamples", type=int, default=8)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--eval-seqlen", type=int, default=512)
    p.add_argument("--eval-limit", type=int, default=16, help="first N windows per dataset")
    p.add_argument("--surgeon-options", default="", help="llm_surgeon key=value,...")
    p.add_argument("--sparsellm-options", default="", help="sparsellm key=value,...")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--name", default="global_smollm2")
    p.add_argument("--report", action="store_true", help="only rewrite the markdown")
    return p.parse_args()


def options_of(text: str) -> dict[str, str]:
    return dict(item.split("=", 1) for item in text.split(",") if item)


def run_row(args: argparse.Namespace, label: str, target: str) -> dict:
    import prunekit

    method, allocation, options = ROWS[label]
    if method == "llm_surgeon":
        options = {**options, **options_of(args.surgeon_options)}
    if method == "sparsellm":
        options = {**options, **options_of(args.sparsellm_options)}
    nm = ":" in target
    lm = prunekit.load_model(args.model)
    start = time.perf_counter()
    record = prunekit.prune(
        lm,
        method,
        sparsity=None if nm else float(target),
        pattern=target if nm else "unstructured",
        calib="wikitext2",
        nsamples=args.nsamples,
        seqlen=args.seqlen,
        allocation=allocation,
        options=options,
    )
    prune_s = time.perf_counter() - start
    scores = prunekit.evaluate(lm, ["wikitext2", "ptb"], args.eval_seqlen, args.eval_limit)
    return {
        "row": label,
        "target": target,
        "method": method,
        "allocation": allocation,
        "options": options,
        "sparsity": record.overall_sparsity,
        "prune_s": prune_s,
        "wikitext2": scores["wikitext2"]["perplexity"],
        "ptb": scores["ptb"]["perplexity"],
    }


def markdown(report: dict) -> str:
    lines = [
        "# Global and search-based pruning (SmolLM2-135M)",
        "",
        *[f"- `{c}`" for c in report["commands"]],
        "",
        f"{report['protocol']}",
        "",
        "| method | target | sparsity | WikiText-2 | PTB | prune s |",
        "|---|---|---|---|---|---|",
    ]
    dense = report.get("dense")
    if dense:
        lines.append(f"| dense | - | 0 | {dense['wikitext2']:.2f} | {dense['ptb']:.2f} | - |")
    order = {label: i for i, label in enumerate(ROWS)}
    targets = ["0.5", "0.6", "0.7", "2:4"]
    rows = sorted(report["rows"], key=lambda r: (targets.index(r["target"]), order[r["row"]]))
    for r in rows:
        label = r["row"] + (f" ({_short(r['options'])})" if r["options"] else "")
        lines.append(
            f"| {label} | {r['target']} | {r['sparsity']:.3f} | {_ppl(r['wikitext2'])} "
            f"| {_ppl(r['ptb'])} | {r['prune_s']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def _ppl(value: float) -> str:
    return f"{value:.2f}" if value < 1e5 else f"{value:.1e} (diverged)"


def _short(options: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in options.items())


def main() -> None:
    args = parse_args()
    path = RESULTS / f"{args.name}.json"
    if args.report:
        (RESULTS / f"{args.name}.md").write_text(markdown(json.loads(path.read_text())))
        return
    import torch

    import prunekit

    torch.set_num_threads(args.threads)
    command = "python benchmarks/global.py " + " ".join(sys.argv[1:])
    report = json.loads(path.read_text()) if path.is_file() else {"commands": [], "rows": []}
    report["commands"] = [*[c for c in report["commands"] if c != command], command]
    report["protocol"] = (
        f"{args.model}; {args.nsamples} calibration windows x {args.seqlen} tokens of "
        f"WikiText-2 valid (tokenized wiki.valid.tokens), seed 0; WikiText-2 and PTB test, "
        f"first {args.eval_limit} windows of {args.eval_seqlen} tokens, reference "
        f"protocol (no BOS per window); {args.threads} thread(s) per run"
    )
    if "dense" not in report:
        lm = prunekit.load_model(args.model)
        scores = prunekit.evaluate(lm, ["wikitext2", "ptb"], args.eval_seqlen, args.eval_limit)
        report["dense"] = {k: v["perplexity"] for k, v in scores.items()}
        del lm
    for target in args.sparsities.split(","):
        for label in args.rows.split(","):
            if ":" in target and ROWS[label][1] != "uniform":
                print(f"{label}: skipped at {target} (N:M fixes every block's sparsity)")
                continue
            row = run_row(args, label, target)
            print(json.dumps(row), flush=True)
            same = (row["row"], row["target"], row["options"])
            report["rows"] = [
                r for r in report["rows"] if (r["row"], r["target"], r["options"]) != same
            ]
            report["rows"].append(row)
            RESULTS.mkdir(exist_ok=True)
            path.write_text(json.dumps(report, indent=2) + "\n")
            (RESULTS / f"{args.name}.md").write_text(markdown(report))


if __name__ == "__main__":
    main()
