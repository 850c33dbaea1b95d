"""Weight-update benchmark on SmolLM2-135M: layer reconstruction error on a few real layers,
and WikiText-2 perplexity, for Wanda, Wanda+ADMM, SparseGPT, ALPS, BESA, gradual ADMM at
50% unstructured and 2:4 (BESA learns unstructured sparsity, so it has no 2:4 row).

Parts run as separate processes (shards) and are merged by `--report`:

    python benchmarks/weight_update.py --part layers
    python benchmarks/weight_update.py --part ppl --pattern unstructured --eval-limit 4
    python benchmarks/weight_update.py --part ppl --pattern 2:4 --eval-limit 4
    python benchmarks/weight_update.py --report

`layers`: the dense model is run block by block on the calibration windows; on chosen
blocks the inputs X of q_proj, o_proj and down_proj are kept, and each method prunes a
copy of the layer; the relative error ‖WX − ŴX‖ / ‖WX‖ is reported (same X for all).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
PPL_METHODS = ["wanda", "wanda+admm", "sparsegpt", "alps", "admm_gradual", "besa"]
LAYER_METHODS = [
    "magnitude",
    "wanda",
    "wanda+sparsegpt",
    "wanda+admm",
    "wanda+alps",
    "sparsegpt",
    "admm_gradual",
    "alps",
]
ROLES = ("q", "o", "down")


def method_options(name: str, args: argparse.Namespace) -> dict:
    """Options that bound the run time; recorded in the JSON."""
    if name == "alps":
        return {"max_iterations": args.alps_iterations, "min_iterations": args.alps_iterations // 2}
    if name == "besa":
        return {"epochs": args.besa_epochs}
    return {}


def update_options(update: str, args: argparse.Namespace) -> dict:
    return {"iterations": args.admm_iterations} if update == "admm" else {}


def calibration(lm, args: argparse.Namespace):
    from prunekit.data import calibration_windows, load_text

    text = load_text("wikitext2", purpose="calib").text
    return calibration_windows(lm.tokenizer, text, args.nsamples, args.seqlen, args.seed)


def layer_part(args: argparse.Namespace) -> dict:
    """Relative reconstruction error of each method on real layers of the dense model."""
    import torch

    import prunekit
    from prunekit.engine import SequentialRunner
    from prunekit.methods import get_method
    from prunekit.methods.unstructured.updates import get_update
    from prunekit.methods.unstructured.wanda import Wanda
    from prunekit.surgery.masks import Pattern, Target, make_mask

    lm = prunekit.load_model(args.model)
    windows = calibration(lm, args)
    runner = SequentialRunner(
        lm.adapter, windows, propagate="dense", collect=("input_norm", "hessian")
    )
    rows = []
    for ctx in runner:
        if ctx.index not in args.blocks:
            continue
        for role in ROLES:
            layer = lm.adapter.linear(ctx.block, role)
            path = next(p for p, m in ctx.linears().items() if m is layer)
            stats = ctx.stats[path]
            captured: list[torch.Tensor] = []
            handle = layer.register_forward_hook(lambda m, a, o, keep=captured: keep.append(a[0]))
            ctx.forward()
            handle.remove()
            x = torch.cat([c.reshape(-1, layer.in_features) for c in captured])
            dense = layer.weight.data.clone()
            reference = torch.linalg.norm(x @ dense.t()).item()
            for pattern in ("unstructured", "2:4"):
                target = Target(0.5, Pattern.parse(pattern))
                for spec in LAYER_METHODS:
                    start = time.perf_counter()
                    name, _, update = spec.partition("+")
                    if update:
                        mask = make_mask(Wanda().score(dense, stats), target)
                        pruned = get_update(update)().solve(dense, mask, stats) * mask
                    else:
                        method = get_method(name)
                        config = method.Config.from_options(method_options(name, args))
                        module = copy.deepcopy(layer)
                        method(config).prune_linear(module, stats, target, path)
                        pruned = module.weight.data
                    error = torch.linalg.norm(x @ dense.t() - x @ pruned.t()).item()
                    rows.append(
                        {
                            "block": ctx.index,
                            "layer": path,
                            "pattern": pattern,
                            "method": spec,
                            "relative_error": error / reference,
                            "seconds": time.perf_counter() - start,
                        }
                    )
                    print(json.dumps(rows[-1]), flush=True)
        if ctx.index >= max(args.blocks):
            break
    return {"layers": rows}


def ppl_part(args: argparse.Namespace) -> dict:
    """WikiText-2 perplexity of dense and each method at one pattern."""
    import prunekit
    from prunekit.methods import get_method

    rows = []
    if args.dense:
        lm = prunekit.load_model(args.model)
        dense = prunekit.evaluate(lm, ["wikitext2"], args.eval_seqlen, args.eval_limit)
        ppl = dense["wikitext2"]["perplexity"]
        rows.append({"method": "dense", "pattern": "-", "perplexity": ppl})
        print(json.dumps(rows[-1]), flush=True)
    for spec in args.methods:
        name, _, update = spec.partition("+")
        if args.pattern != "unstructured" and not get_method(name).supports_nm:
            continue
        lm = prunekit.load_model(args.model)
        options = method_options(name, args)
        extra = update_options(update, args)
        record = prunekit.prune(
            lm,
            spec,
            sparsity=0.5 if args.pattern == "unstructured" else None,
            pattern=args.pattern,
            calib="wikitext2",
            nsamples=args.nsamples,
            seqlen=args.seqlen,
            seed=args.seed,
            options=options,
            update_options=extra,
        )
        result = prunekit.evaluate(lm, ["wikitext2"], args.eval_seqlen, args.eval_limit)
        rows.append(
            {
                "method": spec,
                "pattern": args.pattern,
                "nsamples": args.nsamples,
                "seqlen": args.seqlen,
                "options": options,
                "update_options": extra,
                "sparsity": record.overall_sparsity,
                "prune_s": record.wall_time_s,
                "perplexity": result["wikitext2"]["perplexity"],
                "eval_windows": result["wikitext2"]["windows"],
                "details": record.details,
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    return {"ppl": rows}


def salvage(log: Path, part: str) -> dict:
    """The rows a run printed before it was stopped (marked partial)."""
    text = log.read_text().replace("\r", "\n")
    rows = [json.loads(line[line.index("{") :]) for line in text.splitlines() if '{"' in line]
    key = "layers" if part == "layers" else "ppl"
    return {key: rows, "partial": f"stopped for time; {len(rows)} rows finished"}


def report() -> None:
    """Merge the shards into weight_update.json and weight_update.md."""
    shards = sorted(RESULTS.glob("weight_update_*.json"))
    merged = {"shards": [json.loads(p.read_text()) for p in shards]}
    (RESULTS / "weight_update.json").write_text(json.dumps(merged, indent=2) + "\n")
    lines = ["# Weight updates", ""]
    for shard in merged["shards"]:
        partial = f"; **partial: {shard['partial']}**" if "partial" in shard else ""
        lines.append(f"- `{shard['command']}` ({shard['protocol']}{partial})")
    ppl = {}
    for shard in merged["shards"]:
        for row in shard.get("ppl", []):
            ppl[(row["method"], row["pattern"])] = row
    if ppl:
        lines += ["", "## WikiText-2 perplexity", ""]
        lines += ["| method | 50% unstructured | 2:4 | prune s (50% / 2:4) |", "|---|---|---|---|"]
        dense = next((r for (m, _), r in ppl.items() if m == "dense"), None)
        if dense:
            lines.append(f"| dense | {dense['perplexity']:.2f} | {dense['perplexity']:.2f} | - |")
        for method in PPL_METHODS:
            cells, times = [], []
            for pattern in ("unstructured", "2:4"):
                row = ppl.get((method, pattern))
                cells.append(f"{row['perplexity']:.2f}" if row else "n/a")
                times.append(f"{row['prune_s']:.0f}" if row else "-")
            lines.append(f"| {method} | {cells[0]} | {cells[1]} | {' / '.join(times)} |")
    layers = [row for shard in merged["shards"] for row in shard.get("layers", [])]
    if layers:
        lines += ["", "## Layer reconstruction error ‖WX − ŴX‖ / ‖WX‖ (same X, dense model)", ""]
        done = {(r["block"], r["layer"], r["pattern"], r["method"]) for r in layers}
        keys = sorted(
            {
                (r["block"], r["layer"])
                for r in layers
                if all(
                    (r["block"], r["layer"], p, m) in done
                    for p in ("unstructured", "2:4")
                    for m in LAYER_METHODS
                )
            }
        )
        for pattern in ("unstructured", "2:4"):
            lines += [f"### 50% {pattern}" if pattern == "unstructured" else "### 2:4", ""]
            header = "| method | " + " | ".join(f"{b}.{p}" for b, p in keys) + " | mean |"
            lines += [header, "|---" * (len(keys) + 2) + "|"]
            for method in LAYER_METHODS:
                values = [
                    next(
                        r["relative_error"]
                        for r in layers
                        if (r["block"], r["layer"]) == key
                        and r["method"] == method
                        and r["pattern"] == pattern
                    )
                    for key in keys
                ]
                mean = sum(values) / len(values)
                lines.append(
                    f"| {method} | " + " | ".join(f"{v:.4f}" for v in values) + f" | {mean:.4f} |"
                )
            lines.append("")
    (RESULTS / "weight_update.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("layers", "ppl"))
    parser.add_argument("--report", action="store_true", help="merge the shards")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--pattern", default="unstructured")
    parser.add_argument("--methods", default=",".join(PPL_METHODS))
    parser.add_argument("--nsamples", type=int, default=16)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-limit", type=int, default=None)
    parser.add_argument("--eval-seqlen", type=int, default=1024)
    parser.add_argument("--blocks", default="3,15,27", help="blocks for --part layers")
    parser.add_argument("--alps-iterations", type=int, default=60, help="ALPS max iterations")
    parser.add_argument("--admm-iterations", type=int, default=20, help="ADMM update iterations")
    parser.add_argument("--no-dense", dest="dense", action="store_false", help="skip dense")
    parser.add_argument(
        "--salvage", type=Path, help="rebuild a stopped run's shard from the rows in its log"
    )
    parser.add_argument("--besa-epochs", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    if args.report:
        report()
        return
    if args.part is None:
        parser.error("give --part layers|ppl, or --report")
    import torch

    torch.set_num_threads(args.threads)
    args.methods = [m for m in args.methods.split(",") if m]
    args.blocks = [int(b) for b in args.blocks.split(",")]
    start = time.perf_counter()
    command = sys.argv[1:]
    if args.salvage:
        result = salvage(args.salvage, args.part)
        i = command.index("--salvage")
        command = command[:i] + command[i + 2 :]
    else:
        result = layer_part(args) if args.part == "layers" else ppl_part(args)
    protocol = (
        f"{args.model}; {args.nsamples} calibration windows x {args.seqlen} tokens of "
        f"WikiText-2 (calibration split), seed {args.seed}"
    )
    if args.part == "ppl":
        limit = f"first {args.eval_limit}" if args.eval_limit else "all"
        protocol += (
            f"; WikiText-2 test (tokenized wiki.test.tokens), {limit} windows of "
            f"{args.eval_seqlen} tokens, reference protocol (no BOS per window)"
        )
    result.update(
        command="python benchmarks/weight_update.py " + " ".join(command),
        protocol=protocol,
        wall_s=time.perf_counter() - start,
    )
    shard = args.part
    if args.part == "ppl":
        shard = f"ppl_{args.pattern.replace(':', 'of')}_{'_'.join(args.methods).replace('+', '-')}"
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"weight_update_{shard}.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
