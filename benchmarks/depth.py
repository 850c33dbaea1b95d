"""Depth benchmark: ShortGPT, angular distance, SLEB, Shortened LLaMA (PPL and Taylor+) and
LaCo on SmolLM2-135M removing 10%, 20%, 30% of its 30 blocks, plus AdaInfer early exit.

Per pruned model: perplexity on WikiText-2 and PTB (test splits), zero-shot accuracy when
the zero-shot scorer is installed (`--tasks`), the blocks removed and the pruning time.
Speed: prefill tokens/s (one 512-token input, batch 1) and decode tokens/s (greedy, KV
cache) of the dense and pruned models, interleaved and repeated, medians and ratios.
Every method removing k blocks yields the same architecture, so speed is measured once
per ratio. ShortGPT, SLEB and Shortened LLaMA are prefix-consistent (their first k
removals do not depend on how many follow: one-shot rankings, and SLEB's greedy order), so
they run once at the largest ratio and the smaller ratios remove the first k blocks of
the recorded `removal_order`; angular distance and LaCo run once per ratio.

    python benchmarks/depth.py --eval-limit 8            # what produced results/depth.*
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch

import prunekit
from prunekit import api
from prunekit.data import calibration_windows, evaluation_windows, load_text
from prunekit.eval.speed import interleaved, medians, prompt_ids
from prunekit.eval.zeroshot import evaluate_tasks
from prunekit.export.record import count_parameters
from prunekit.inference import early_exit
from prunekit.surgery.depth import remove_blocks
from prunekit.surgery.masks import prune_count

RESULTS = Path(__file__).resolve().parent / "results"
ROWS = [  # (label, method, options), cheapest first; SLEB (O(n²) per removal) last
    ("ShortGPT", "shortgpt", {}),
    ("angular (last token)", "angular", {}),
    ("Shortened LLaMA (Taylor+)", "shortened_llama", {"criterion": "taylor"}),
    ("Shortened LLaMA (PPL)", "shortened_llama", {"criterion": "ppl"}),
    ("LaCo", "laco", {"scores": False}),
    ("SLEB", "sleb", {}),
]
PREFIX_CONSISTENT = ("shortgpt", "sleb", "shortened_llama")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--ratios", default="0.1,0.2,0.3", help="shares of blocks removed")
    p.add_argument("--methods", default="", help="comma-separated labels (default: all)")
    p.add_argument("--nsamples", type=int, default=8, help="calibration windows")
    p.add_argument("--seqlen", type=int, default=256, help="calibration window length")
    p.add_argument("--eval-windows", type=int, default=4, help="SLEB/PPL/LaCo windows")
    p.add_argument("--eval-seqlen", type=int, default=1024)
    p.add_argument("--eval-limit", type=int, default=None, help="first N evaluation windows")
    p.add_argument("--tasks", default="", help="zero-shot tasks (needs the zero-shot scorer)")
    p.add_argument("--task-limit", type=int, default=None, help="first N items per task")
    p.add_argument("--speed-repeats", type=int, default=5)
    p.add_argument("--prefill-tokens", type=int, default=512)
    p.add_argument("--decode-tokens", type=int, default=32)
    p.add_argument("--ee-calib", type=int, default=8, help="early-exit training windows")
    p.add_argument("--ee-eval", type=int, default=8, help="early-exit scoring windows")
    p.add_argument("--ee-seqlen", type=int, default=256)
    p.add_argument("--ee-thresholds", default="0.5,0.6,0.7,0.8,0.9")
    p.add_argument(
        "--ee-task-thresholds", default="0.6,0.7", help="early-exit thresholds scored on --tasks"
    )
    p.add_argument(
        "--early-exit-only", action="store_true", help="only redo the early-exit study in --out"
    )
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-speed", action="store_true", help="skip the speed measurement")
    p.add_argument(
        "--speed-only",
        action="store_true",
        help="only (re)measure speed, for the models of the first method in --out's report",
    )
    p.add_argument("--no-early-exit", action="store_true", help="skip the early-exit study")
    p.add_argument(
        "--combine", default="", help="only merge the runs of this report JSON into --out's"
    )
    p.add_argument("--out", default=str(RESULTS / "depth"))
    return p.parse_args()


def evaluate(lm, args) -> dict:
    results = api.evaluate(lm, ["wikitext2", "ptb"], args.eval_seqlen, args.eval_limit)
    out = {name: r["perplexity"] for name, r in results.items()}
    tasks = [t for t in args.tasks.split(",") if t]
    if tasks:
        scored = api.evaluate(lm, tasks, limit=args.task_limit)
        out.update({t: scored[t]["acc"] for t in tasks})
    return out


def prune_runs(args, ratios: list[float], num_blocks: int, rows, report: dict) -> None:
    """Prune and evaluate every (method, ratio); appends to report["runs"] and saves."""
    for label, method, options in rows:
        options = dict(options)
        if method in ("sleb", "shortened_llama", "laco"):
            options["eval_windows"] = args.eval_windows
        prefix = method in PREFIX_CONSISTENT
        for ratio in [max(ratios)] if prefix else ratios:
            lm = prunekit.load_model(args.model)
            start = time.perf_counter()
            record = prunekit.prune(
                lm, method, sparsity=ratio, nsamples=args.nsamples, seqlen=args.seqlen,
                options=options,
            )  # fmt: skip
            prune_s = time.perf_counter() - start
            add_run(
                report,
                args,
                finish_run(lm, args, label, method, options, ratio, record.details, prune_s),
            )
        if prefix:
            order = report["runs"][-1]["details"]["removal_order"]
            for ratio in sorted(r for r in ratios if r != max(ratios)):
                k = prune_count(num_blocks, ratio)
                lm = prunekit.load_model(args.model)
                remove_blocks(lm.adapter, order[:k])
                details = {"removed_blocks": sorted(order[:k]), "prefix_of_ratio": max(ratios)}
                add_run(
                    report, args, finish_run(lm, args, label, method, options, ratio, details, None)
                )


def add_run(report: dict, args, run: dict) -> None:
    report["runs"].append(run)
    print(json.dumps({key: v for key, v in run.items() if key != "details"}), flush=True)
    write(report, args)


def finish_run(lm, args, label, method, options, ratio, details, prune_s) -> dict:
    return {
        "label": label,
        "method": method,
        "options": options,
        "ratio": ratio,
        "blocks": lm.adapter.num_layers,
        "removed_blocks": details["removed_blocks"],
        "parameters": count_parameters(lm.model),
        "prune_s": prune_s,
        "metrics": evaluate(lm, args),
        "details": details,
    }


class Clock:
    """Wall-clock and process CPU seconds since creation."""

    def __init__(self):
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    def rates(self, tokens: int) -> tuple[float, float]:
        """Tokens per wall second and per CPU second."""
        wall, cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu
        return tokens / wall, tokens / cpu


@torch.no_grad()
def time_model(model, ids: torch.Tensor, decode_tokens: int) -> dict[str, float]:
    """Prefill and decode tokens/s (wall and CPU) for one input `ids` [1, T], greedy, KV cache."""
    clock = Clock()
    out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
    prefill_wall, prefill_cpu = clock.rates(ids.shape[1])
    cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
    clock = Clock()
    for _ in range(decode_tokens):
        out = model(input_ids=token, past_key_values=cache, use_cache=True)
        cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
    decode_wall, decode_cpu = clock.rates(decode_tokens)
    return {
        "prefill": prefill_wall,
        "decode": decode_wall,
        "prefill_cpu": prefill_cpu,
        "decode_cpu": decode_cpu,
    }


def speed(args, ratios: list[float], removed: dict[float, list[int]]) -> dict:
    """Dense and one pruned model per ratio, measured in turn each repeat; medians, ratios."""
    dense = prunekit.load_model(args.model)
    ids = prompt_ids(dense.tokenizer, args.prefill_tokens)
    models = {"dense": dense.model}
    for ratio in ratios:
        lm = prunekit.load_model(args.model)
        remove_blocks(lm.adapter, removed[ratio])
        models[f"{ratio:g}"] = lm.model
    kinds = ("prefill", "decode", "prefill_cpu", "decode_cpu")
    samples = interleaved(
        models,
        lambda model: time_model(model, ids, args.decode_tokens),
        args.speed_repeats,
        warmup=lambda model: time_model(model, ids, 4),
    )
    dense_med = medians(samples["dense"])
    result = {}
    for name, s in samples.items():
        med = medians(s)
        result[name] = {
            "blocks": models[name].config.num_hidden_layers,
            **{f"{k}_tok_s": med[k] for k in kinds},
            **{f"{k}_speedup": med[k] / dense_med[k] for k in kinds},
            "samples": s,
        }
    return result


def early_exit_study(args) -> dict:
    """Fit on WikiText-2 valid windows; score next-token prediction on test windows."""
    lm = prunekit.load_model(args.model)
    calib_text = load_text("wikitext2", purpose="calib").text
    calib = calibration_windows(lm.tokenizer, calib_text, args.ee_calib, args.ee_seqlen, 0)
    start = time.perf_counter()
    policy = early_exit.fit(lm, calib)
    fit_s = time.perf_counter() - start
    test = evaluation_windows(
        lm.tokenizer, load_text("wikitext2", purpose="eval").text, args.ee_seqlen, args.ee_eval
    )
    views = [early_exit.layer_view(lm, ids) for ids in test]
    rows = []
    for threshold in [float(t) for t in args.ee_thresholds.split(",")]:
        rows.append(dataclasses.replace(policy, threshold=threshold).score_views(views, test))
        print(json.dumps(rows[-1]), flush=True)
    return {
        "policy": policy.as_dict(),
        "fit_s": fit_s,
        "scores": rows,
        "zero_shot": early_exit_zero_shot(lm, policy, args),
    }


def early_exit_zero_shot(lm, policy, args) -> list[dict]:
    """Zero-shot accuracy with every scored position read at its exit block (`--tasks`)."""
    tasks = [t for t in args.tasks.split(",") if t]
    rows = []
    if not tasks:
        return rows
    for threshold in [float(t) for t in args.ee_task_thresholds.split(",") if t]:
        model = early_exit.ExitLogits(lm, dataclasses.replace(policy, threshold=threshold))
        scored = evaluate_tasks(model, lm.tokenizer, tasks, limit=args.task_limit, batch_size=1)
        rows.append(
            {
                "threshold": threshold,
                "mean_blocks_used": model.blocks_used / max(model.positions, 1),
                "blocks": policy.num_blocks,
                **{t: scored[t]["acc"] for t in tasks},
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    return rows


def early_exit_only(args) -> None:
    """Redo the early-exit study and put it into --out's report."""
    out = Path(args.out).with_suffix(".json")
    report = json.loads(out.read_text())
    report["early_exit"] = early_exit_study(args)
    report["early_exit_command"] = command(args)
    write(report, args)
    print(markdown(report))


def markdown(report: dict) -> str:
    args = report["settings"]
    dense = report["dense"]
    metric_names = list(dense["metrics"])
    head = "| method | removed | blocks | params (M) | " + " | ".join(
        f"{m} ppl" if m in ("wikitext2", "ptb") else f"{m} acc" for m in metric_names
    )
    lines = [
        f"{args['model']} depth pruning. Command: `{report['command']}`",
        "",
        f"Calibration: WikiText-2 valid, {args['nsamples']} x {args['seqlen']} tokens "
        f"(SLEB / Shortened-LLaMA / LaCo search on the first {args['eval_windows']}). "
        f"Perplexity: first {args['eval_limit'] or 'all'} windows of {args['eval_seqlen']} "
        "tokens of each test split.",
        "",
        head + " | prune s |",
        "|" + "---|" * (5 + len(metric_names)),
    ]

    def row(label, run, prune_s):
        values = " | ".join(
            f"{run['metrics'][m]:.2f}" if m in ("wikitext2", "ptb") else f"{run['metrics'][m]:.3f}"
            for m in metric_names
        )
        removed = run.get("removed_blocks", [])
        removed = ",".join(map(str, removed)) if removed else "-"
        return (
            f"| {label} | {removed} | {run['blocks']} | {run['parameters'] / 1e6:.1f} | "
            f"{values} | {prune_s} |"
        )

    lines.append(row("dense", dense, "-"))
    for run in sorted(report["runs"], key=lambda r: (r["ratio"], r["label"])):
        prune_s = f"{run['prune_s']:.0f}" if run["prune_s"] is not None else "(prefix)"
        lines.append(row(f"{run['label']} {run['ratio']:.0%}", run, prune_s))
    if report["speed"]:
        sp = report.get("speed_settings", args)
        lines += [
            "",
            f"CPU speed ({report.get('speed_models', '')}), batch 1, {sp['threads']} thread(s): "
            f"prefill of {sp['prefill_tokens']} tokens and greedy decode of "
            f"{sp['decode_tokens']} tokens with KV cache; medians of {sp['speed_repeats']} "
            "interleaved repeats. Tokens per wall-clock second, and per CPU second of this "
            "process (robust to the other jobs sharing the machine). Command: "
            f"`{report.get('speed_command', report['command'])}`",
            "",
            "| model | blocks | prefill tok/s wall | prefill tok/CPU-s | decode tok/s wall | "
            "decode tok/CPU-s | prefill speedup wall / CPU | decode speedup wall / CPU |",
            "|---|---|---|---|---|---|---|---|",
        ]
    for name, s in report["speed"].items():
        lines.append(
            f"| {name} | {s['blocks']} | {s['prefill_tok_s']:.0f} | "
            f"{s.get('prefill_cpu_tok_s', float('nan')):.0f} | {s['decode_tok_s']:.2f} | "
            f"{s.get('decode_cpu_tok_s', float('nan')):.1f} | {s['prefill_speedup']:.2f}x / "
            f"{s.get('prefill_cpu_speedup', float('nan')):.2f}x | {s['decode_speedup']:.2f}x / "
            f"{s.get('decode_cpu_speedup', float('nan')):.2f}x |"
        )
    ee = report.get("early_exit")
    if ee:
        lines += [
            "",
            f"Early exit (AdaInfer features, class-balanced logistic regression) fitted on "
            f"{args['ee_calib']} WikiText-2 valid windows of {args['ee_seqlen']} tokens, scored "
            f"on the first {args['ee_eval']} test windows: every position is an input whose "
            "next token is predicted at its exit block.",
            "",
            "| threshold | mean blocks used | agreement with full | next-token acc (full) | "
            "ppl (full) |",
            "|---|---|---|---|---|",
        ]
        for s in ee["scores"]:
            lines.append(
                f"| {s['threshold']:g} | {s['mean_blocks_used']:.2f} / {s['blocks']} | "
                f"{s['agreement_with_full']:.3f} | {s['accuracy']:.3f} ({s['full_accuracy']:.3f})"
                f" | {s['perplexity']:.1f} ({s['full_perplexity']:.1f}) |"
            )
        if ee.get("zero_shot"):
            tasks = [
                k
                for k in ee["zero_shot"][0]
                if k not in ("threshold", "mean_blocks_used", "blocks")
            ]
            dense = report["dense"]["metrics"]
            lines += [
                "",
                "Zero-shot accuracy with early exit (each scored token read at its exit "
                f"block; first {args['task_limit']} items per task, batch 1):",
                "",
                "| threshold | mean blocks used | " + " | ".join(f"{t} acc" for t in tasks) + " |",
                "|---|---|" + "---|" * len(tasks),
                f"| full model | {report['dense']['blocks']} | "
                + " | ".join(f"{dense[t]:.3f}" for t in tasks)
                + " |",
            ]
            for z in ee["zero_shot"]:
                lines.append(
                    f"| {z['threshold']:g} | {z['mean_blocks_used']:.2f} / {z['blocks']} | "
                    + " | ".join(f"{z[t]:.3f}" for t in tasks)
                    + " |"
                )
    return "\n".join(lines) + "\n"


def write(report: dict, args) -> None:
    """Save the report so far (JSON and Markdown); called after every stage."""
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(report))


def combine(args) -> None:
    """Add the pruning runs of another report (e.g. SLEB run in its own process) to --out."""
    out = Path(args.out).with_suffix(".json")
    report = json.loads(out.read_text())
    other = json.loads(Path(args.combine).read_text())
    known = {(r["label"], r["ratio"]) for r in report["runs"]}
    report["runs"] += [r for r in other["runs"] if (r["label"], r["ratio"]) not in known]
    report.setdefault("combined_commands", []).append(other["command"])
    if "speed_command" in other:  # a --speed-only report
        for key in ("speed", "speed_models", "speed_command", "speed_settings"):
            report[key] = other[key]
    write(report, args)
    print(markdown(report))


def speed_only(args) -> None:
    """Re-measure speed for the first method's models recorded in --out's report."""
    out = Path(args.out).with_suffix(".json")
    report = json.loads(out.read_text())
    first = report["runs"][0]["label"]
    removed = {r["ratio"]: r["removed_blocks"] for r in report["runs"] if r["label"] == first}
    ratios = sorted(removed)
    report["speed"] = speed(args, ratios, removed)
    report["speed_models"] = f"dense and {first}'s pruned models"
    report["speed_command"] = command(args)
    report["speed_settings"] = vars(args)
    write(report, args)
    print(markdown(report))


def command(args) -> str:
    def option(key: str, value) -> str:
        flag = f"--{key.replace('_', '-')}"
        if value is True:
            return flag
        return f"{flag} '{value}'" if " " in str(value) else f"{flag} {value}"

    return "python benchmarks/depth.py " + " ".join(
        option(k, v) for k, v in vars(args).items() if v not in (None, "", False) and k != "out"
    )


def main() -> None:
    args = parse_args()
    if args.combine:
        return combine(args)
    if args.speed_only:
        torch.set_num_threads(args.threads)
        return speed_only(args)
    if args.early_exit_only:
        torch.set_num_threads(args.threads)
        return early_exit_only(args)
    torch.set_num_threads(args.threads)
    ratios = [float(r) for r in args.ratios.split(",")]
    labels = [x for x in args.methods.split(",") if x]
    rows = [r for r in ROWS if not labels or r[0] in labels]
    start = time.perf_counter()
    dense = prunekit.load_model(args.model)
    num_blocks = dense.adapter.num_layers
    report = {
        "command": command(args),
        "settings": vars(args),
        "dense": {
            "blocks": num_blocks,
            "parameters": count_parameters(dense.model),
            "metrics": evaluate(dense, args),
        },
        "runs": [],
        "speed": {},
    }
    print(json.dumps(report["dense"]), flush=True)
    del dense
    prune_runs(args, ratios, num_blocks, rows[:1], report)
    if not args.no_speed:
        removed = {r["ratio"]: r["removed_blocks"] for r in report["runs"]}
        report["speed"] = speed(args, ratios, removed)
        report["speed_models"] = f"dense and {rows[0][0]}'s pruned models"
        speedups = {k: v["prefill_speedup"] for k, v in report["speed"].items()}
        print(json.dumps(speedups), flush=True)
        write(report, args)
    if not args.no_early_exit:
        report["early_exit"] = early_exit_study(args)
        write(report, args)
    prune_runs(args, ratios, num_blocks, rows[1:], report)
    report["total_s"] = time.perf_counter() - start
    write(report, args)
    print(markdown(report))


if __name__ == "__main__":
    main()
