"""NAS structural pruning of SmolLM2-135M: the Pareto front of decoder parameters against
held-out calibration NLL after sandwich-rule fine-tuning, the exported point's WikiText-2 /
PTB perplexity, and FLAP at the same share of decoder parameters for comparison.

Writes `results/<name>.json`, `.md` and the front as `<name>.png`.

    python benchmarks/nas.py --steps 20 --samples 64 --nsamples 20 --seqlen 256
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from results_io import RESULTS, write

import prunekit


def plot(details: dict, dense: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    searched = details["searched"]
    front = details["pareto_front"]
    chosen = front[details["chosen"]]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.scatter([p / dense for p, _ in searched], [n for _, n in searched], s=10, c="0.6",
               label="searched sub-networks")  # fmt: skip
    ax.plot([p["parameters"] / dense for p in front], [p["nll"] for p in front], "o-",
            label="Pareto front")  # fmt: skip
    ax.scatter([chosen["parameters"] / dense], [chosen["nll"]], s=80, marker="*", c="red",
               zorder=3, label="exported")  # fmt: skip
    ax.set_xlabel("decoder parameters kept (share of dense)")
    ax.set_ylabel("held-out NLL (nats/token)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--sparsity", type=float, default=0.3)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--space", default="small")
    parser.add_argument("--kinds", default="kv,intermediate,layers", help="what may shrink")
    parser.add_argument("--order", default="wanda_sp", help="ranking of groups and channels")
    parser.add_argument("--nsamples", type=int, default=20, help="calibration windows (4 held out)")
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--eval-limit", type=int, default=16)
    parser.add_argument("--eval-seqlen", type=int, default=512)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--name", default="nas_smollm2")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    datasets = ["wikitext2", "ptb"]

    def ppl(lm) -> dict:
        result = prunekit.evaluate(lm, datasets, args.eval_seqlen, args.eval_limit)
        return {d: result[d]["perplexity"] for d in datasets}

    calib = {"calib": "wikitext2", "nsamples": args.nsamples, "seqlen": args.seqlen}
    dense = prunekit.load_model(args.model, dtype="float32")
    rows = [{"method": "dense", "removed": 0.0, **ppl(dense)}]
    del dense
    lm = prunekit.load_model(args.model, dtype="float32")
    start = time.perf_counter()
    options = {"steps": args.steps, "samples": args.samples, "space": args.space}
    options |= {"kinds": args.kinds, "order": args.order}
    record = prunekit.prune(lm, "nas", sparsity=args.sparsity, batch_size=args.batch_size,
                            options=options, **calib)  # fmt: skip
    details = record.details
    rows.append({"method": f"nas ({args.steps} steps)", "removed": details["decoder_share_removed"],
                 "seconds": time.perf_counter() - start, **ppl(lm)})  # fmt: skip
    del lm
    flap = prunekit.load_model(args.model, dtype="float32")
    start = time.perf_counter()
    share = details["decoder_share_removed"]
    flap_record = prunekit.prune(flap, "flap", sparsity=share, **calib)
    rows.append({"method": "flap", "removed": flap_record.details["decoder_share_removed"],
                 "seconds": time.perf_counter() - start, **ppl(flap)})  # fmt: skip
    before = details["decoder_parameters_before"]
    command = "python benchmarks/nas.py " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k != "name"
    )
    payload = {"args": vars(args), "command": command, "rows": rows, "nas": details}
    lines = [
        f"Command: `{command}`. Calibration: WikiText-2 valid, {args.nsamples} x {args.seqlen} "
        f"tokens (the last 4 held out to score sub-networks); {args.space} search space over "
        f"{args.kinds}, ranked by {args.order}; "
        f"{len(details['searched'])} sub-networks scored; perplexity on the first "
        f"{args.eval_limit} windows of {args.eval_seqlen} tokens (reference protocol); "
        f"{args.threads} thread(s).",
        "",
        "| method | decoder removed | wikitext2 | ptb | s |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        seconds = f"{r['seconds']:.0f}" if "seconds" in r else "-"
        lines.append(f"| {r['method']} | {r['removed']:.3f} | {r['wikitext2']:.2f} | "
                     f"{r['ptb']:.2f} | {seconds} |")  # fmt: skip
    lines += [
        "",
        "Pareto front (held-out NLL, nats/token):",
        "",
        "| decoder kept | NLL | KV groups | MLP channels | blocks |",
        "|---|---|---|---|---|",
    ]
    for p in details["pareto_front"]:
        mark = " (exported)" if p == details["pareto_front"][details["chosen"]] else ""
        lines.append(f"| {p['parameters'] / before:.3f}{mark} | {p['nll']:.3f} | "
                     f"{p['kv'][0]} | {p['intermediate'][0]} | {p['layers'][0]} |")  # fmt: skip
    markdown = "\n".join(lines) + "\n"
    write(payload, args.name, lambda _: markdown)
    plot(details, before, RESULTS / f"{args.name}.png")
    print(markdown)


if __name__ == "__main__":
    main()
