"""Core benchmark: magnitude / Wanda / SparseGPT on SmolLM2-135M, 50% unstructured and 2:4.

Each run happens in a fresh subprocess so its peak RSS is its own. Per run it measures the
floor (one plain forward pass of the model over the calibration windows), the pruning wall
time, peak RSS, and WikiText-2 test perplexity; dense is evaluated in the same run.

    python benchmarks/core.py                      # the full protocol (slow on 2 cores)
    python benchmarks/core.py --eval-limit 40      # first 40 evaluation windows only
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
RUNS = [  # (method, pattern, propagation)
    ("dense", "unstructured", "pruned"),
    ("wanda", "unstructured", "pruned"),
    ("wanda", "unstructured", "dense"),
    ("sparsegpt", "unstructured", "pruned"),
    ("magnitude", "unstructured", "pruned"),
    ("wanda", "2:4", "pruned"),
    ("sparsegpt", "2:4", "pruned"),
    ("magnitude", "2:4", "pruned"),
]


def one_run(args: argparse.Namespace) -> dict:
    """Runs in a subprocess: prune, floor, evaluate; prints one JSON line.

    The floor is timed after pruning (zeros do not speed up dense kernels), so its logits
    buffer does not count in the pruning's peak RSS.
    """
    import torch
    import transformers.models.llama.modeling_llama  # noqa: F401  (the model's code)

    import prunekit
    import prunekit.api  # noqa: F401  (the package root imports lazily)
    from prunekit.data import calibration_windows, load_text
    from prunekit.export.record import count_parameters
    from prunekit.process_memory import peak_rss_mb

    torch.set_num_threads(args.threads)
    import_rss = peak_rss_mb()  # the interpreter, torch, transformers, prunekit: no model yet
    lm = prunekit.load_model(args.model)
    params = count_parameters(lm.model)
    result = {
        "method": args.method,
        "pattern": args.pattern,
        "propagate": args.propagate,
        "parameters": params,
        "float32_mb": params * 4 / 2**20,
        "import_rss_mb": import_rss,
    }
    if args.method != "dense":
        cpu_start = time.process_time()
        record = prunekit.prune(
            lm,
            args.method,
            sparsity=0.5 if args.pattern == "unstructured" else None,
            pattern=args.pattern,
            calib="wikitext2",
            nsamples=args.nsamples,
            seqlen=args.seqlen,
            seed=0,
            propagate=args.propagate,
        )
        result.update(
            prune_cpu_s=time.process_time() - cpu_start,
            prune_s=record.wall_time_s,
            sparsity=record.overall_sparsity,
            peak_rss_mb=record.peak_rss_mb,
        )
    else:
        result["peak_rss_mb"] = peak_rss_mb()
    source = load_text("wikitext2", purpose="calib")
    windows = calibration_windows(lm.tokenizer, source.text, args.nsamples, args.seqlen, 0)
    floors, floor_cpu = [], []
    for _ in range(args.floor_repeats):
        start, cpu_start = time.perf_counter(), time.process_time()
        with torch.no_grad():
            for i in range(0, windows.shape[0], 8):
                lm.model(input_ids=windows[i : i + 8], use_cache=False)
        floors.append(time.perf_counter() - start)
        floor_cpu.append(time.process_time() - cpu_start)
    result["floor_s"] = statistics.median(floors)
    result["floor_cpu_s"] = statistics.median(floor_cpu)
    ppl = prunekit.evaluate(lm, ["wikitext2"], seqlen=args.eval_seqlen, limit=args.eval_limit)
    result["wikitext2"] = ppl["wikitext2"]
    return result


def run_all(args: argparse.Namespace) -> None:
    rows = []
    for method, pattern, propagate in RUNS:
        if args.methods and method not in args.methods and method != "dense":
            continue
        cmd = [sys.executable, __file__, "--one", method, pattern, propagate, *passthrough(args)]
        print(f"== {method} {pattern} ({propagate} propagation)", flush=True)
        out = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=True).stdout
        row = json.loads(out.strip().splitlines()[-1])
        rows.append(row)
        print(json.dumps(row), flush=True)
    report = {
        "benchmark": "core",
        "model": args.model,
        "calibration": {
            "dataset": "wikitext2 valid",
            "nsamples": args.nsamples,
            "seqlen": args.seqlen,
            "seed": 0,
        },
        "evaluation": {
            "dataset": "wikitext2 test",
            "seqlen": args.eval_seqlen,
            "limit_windows": args.eval_limit,
        },
        "threads": args.threads,
        "runs": rows,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "core.json").write_text(json.dumps(report, indent=2) + "\n")
    table = markdown(report)
    (RESULTS / "core.md").write_text(table)
    print(table)


def markdown(report: dict) -> str:
    ev = report["evaluation"]
    limit = f"first {ev['limit_windows']} windows" if ev["limit_windows"] else "all windows"
    cal = report["calibration"]
    lines = [
        f"SmolLM2-135M, calibration {cal['nsamples']} x {cal['seqlen']} tokens of WikiText-2 "
        f"valid (seed 0); WikiText-2 test perplexity (the tokenized wiki.test.tokens), "
        f"{ev['seqlen']}-token windows, {limit}, the field's protocol (no BOS added); "
        f"{report['threads']} threads.",
        "",
        "| method | pattern | propagation | sparsity | WikiText-2 ppl | prune wall (s) "
        "| x floor (wall) | x floor (CPU time) | peak RSS (MiB) | x fp32 size "
        "| peak over imports (MiB) | x fp32 size |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["runs"]:
        prune_s = r.get("prune_s")
        pattern = r["pattern"] if r["method"] != "dense" else "-"
        timing = "- | - | -"
        if prune_s:
            cpu_ratio = r["prune_cpu_s"] / r["floor_cpu_s"]
            timing = f"{prune_s:.1f} | {prune_s / r['floor_s']:.2f} | {cpu_ratio:.2f}"
        lines.append(
            f"| {r['method']} | {pattern} | {r['propagate'] if prune_s else '-'} "
            f"| {r.get('sparsity', 0):.3f} "
            f"| {r['wikitext2']['perplexity']:.2f} | {timing} "
            f"| {r['peak_rss_mb']:.0f} | {r['peak_rss_mb'] / r['float32_mb']:.2f} "
            f"| {r['peak_rss_mb'] - r['import_rss_mb']:.0f} "
            f"| {(r['peak_rss_mb'] - r['import_rss_mb']) / r['float32_mb']:.2f} |"
        )
    floor = statistics.median(r["floor_s"] for r in report["runs"])
    lines += [
        "",
        f"Floor (one plain forward pass over the calibration windows): {floor:.1f} s "
        "(median over runs; each run's ratio uses the floor timed in its own process, "
        "wall clock and process CPU time, the latter robust to other load on the machine); "
        "float32 model size "
        f"{report['runs'][0]['float32_mb']:.0f} MiB. 'Peak over imports' subtracts the "
        "resident memory of the process after importing torch, transformers and prunekit "
        f"(median {statistics.median(r['import_rss_mb'] for r in report['runs']):.0f} MiB, "
        "before any model is loaded): what pruning itself costs.",
        "",
    ]
    return "\n".join(lines)


def passthrough(args: argparse.Namespace) -> list[str]:
    out = [
        "--model",
        args.model,
        "--nsamples",
        str(args.nsamples),
        "--seqlen",
        str(args.seqlen),
        "--eval-seqlen",
        str(args.eval_seqlen),
        "--threads",
        str(args.threads),
        "--floor-repeats",
        str(args.floor_repeats),
    ]
    if args.eval_limit:
        out += ["--eval-limit", str(args.eval_limit)]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--nsamples", type=int, default=64)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--eval-seqlen", type=int, default=1024)
    parser.add_argument("--eval-limit", type=int, default=None)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--floor-repeats", type=int, default=1)
    parser.add_argument("--methods", nargs="*", default=None)
    parser.add_argument("--one", nargs=3, metavar=("METHOD", "PATTERN", "PROPAGATE"))
    args = parser.parse_args()
    if args.one:
        args.method, args.pattern, args.propagate = args.one
        print(json.dumps(one_run(args)))
    else:
        run_all(args)


if __name__ == "__main__":
    main()
