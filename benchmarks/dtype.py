"""Models in their own dtype: SmolLM2-135M pruned in bfloat16 against float32.

Wanda and SparseGPT (50% unstructured), FLAP (20% of decoder parameters) and ShortGPT
(20% of blocks), each in a fresh process with the weights loaded as float32 or bfloat16
(`--dtype`): the pruned model's WikiText-2 perplexity evaluated in the same dtype, the
pruning wall time, and the process's peak RSS while pruning (the model loaded; the
counter is restarted after loading, which converts the float32 checkpoint).

    python benchmarks/dtype.py --eval-limit 40
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
RUNS = [  # (method, sparsity)
    ("wanda", 0.5),
    ("sparsegpt", 0.5),
    ("flap", 0.2),
    ("shortgpt", 0.2),
]
DTYPES = ("float32", "bfloat16")


def reset_peak() -> None:
    """Restart the kernel's peak-resident counter of this process (Linux)."""
    Path("/proc/self/clear_refs").write_text("5")


def peak_resident_mb() -> float:
    """Peak resident memory since `reset_peak` (VmHWM), MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def one_run(method: str, sparsity: float, dtype: str, args: argparse.Namespace) -> dict:
    import torch

    import prunekit
    import prunekit.api  # noqa: F401  (the package root imports lazily)

    torch.set_num_threads(args.threads)
    lm = prunekit.load_model("smollm2-135m", dtype=dtype)
    reset_peak()  # loading converts the float32 checkpoint: not part of pruning
    start = time.perf_counter()
    record = prunekit.prune(
        lm, method, sparsity=sparsity, calib="wikitext2", nsamples=args.nsamples,
        seqlen=args.seqlen, seed=0,
    )  # fmt: skip
    wall = time.perf_counter() - start
    peak = peak_resident_mb()
    ppl = prunekit.evaluate(lm, ["wikitext2"], limit=args.eval_limit)["wikitext2"]
    return {
        "method": method,
        "sparsity": sparsity,
        "dtype": dtype,
        "prune_wall_s": wall,
        "peak_rss_mb": peak,
        "wikitext2": ppl["perplexity"],
        "outcome": record.outcome,
    }


def table(rows: list[dict]) -> list[str]:
    """The Markdown table: float32 against bfloat16 per method."""
    lines = [
        "| method | sparsity | float32 ppl | bfloat16 ppl | ppl ratio | prune s fp32 / bf16 "
        "| speed-up | peak RSS while pruning MiB fp32 / bf16 | memory ratio |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for method, sparsity in RUNS:
        f, b = (next(r for r in rows if r["method"] == method and r["dtype"] == d)
                for d in DTYPES)  # fmt: skip
        lines.append(
            f"| {method} | {sparsity} | {f['wikitext2']:.2f} | {b['wikitext2']:.2f} | "
            f"{b['wikitext2'] / f['wikitext2']:.4f} | {f['prune_wall_s']:.1f} / "
            f"{b['prune_wall_s']:.1f} | {f['prune_wall_s'] / b['prune_wall_s']:.2f}x | "
            f"{f['peak_rss_mb']:.0f} / {b['peak_rss_mb']:.0f} | "
            f"{b['peak_rss_mb'] / f['peak_rss_mb']:.2f} |"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--nsamples", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--eval-limit", type=int, default=40)
    parser.add_argument("--one", nargs=3, metavar=("METHOD", "SPARSITY", "DTYPE"))
    parser.add_argument("--markdown-only", action="store_true", help="rewrite dtype.md")
    args = parser.parse_args()
    if args.markdown_only:
        data = json.loads((RESULTS / "dtype.json").read_text())
        text = data["note"] + "\n\n" + "\n".join(table(data["rows"])) + "\n"
        (RESULTS / "dtype.md").write_text(text)
        return
    if args.one:
        method, sparsity, dtype = args.one
        print(json.dumps(one_run(method, float(sparsity), dtype, args)))
        return
    rows = []
    for method, sparsity in RUNS:
        for dtype in DTYPES:
            cmd = [sys.executable, __file__, "--one", method, str(sparsity), dtype]
            cmd += ["--threads", str(args.threads), "--nsamples", str(args.nsamples)]
            cmd += ["--seqlen", str(args.seqlen), "--eval-limit", str(args.eval_limit)]
            done = subprocess.run(cmd, check=True, capture_output=True, text=True)
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(json.dumps(rows[-1]), flush=True)
    lines = table(rows)
    command = "python benchmarks/dtype.py " + " ".join(sys.argv[1:])
    note = (
        f"SmolLM2-135M; calibration {args.nsamples} x {args.seqlen} WikiText-2 windows "
        f"(seed 0); WikiText-2 test perplexity (tokenized wiki.test.tokens, reference protocol) "
        f"on the first {args.eval_limit} windows of 1024, evaluated in the model's dtype; "
        f"{args.threads} threads. Command: `{command}`"
    )
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "dtype.json").write_text(json.dumps({"note": note, "rows": rows}, indent=2))
    (RESULTS / "dtype.md").write_text(note + "\n\n" + "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
