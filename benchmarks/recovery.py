"""Healing after pruning on SmolLM2-135M: perplexity before and after each healing method,
at an equal step budget, for Wanda 2:4, FLAP 20% and ShortGPT 30%; plus a two-stage
composition (ShortGPT then FLAP, healed) against FLAP alone at the same parameter count.

Per row: WikiText-2 / PTB test perplexity (first `--eval-limit` windows of
`--eval-seqlen` tokens), sparsity of the prunable linears before and after healing,
trainable parameters, seconds per step and peak RSS of the healing (VmHWM reset per row).
Training windows come from WikiText-2 valid (never its test split).

    python benchmarks/recovery.py --steps 40 --batch-size 4 --seqlen 256 --eval-limit 8
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path

import torch

import prunekit
from prunekit.export.record import count_parameters, overall_sparsity
from prunekit.process_memory import reset_peak_rss, step_peak_rss_mb
from prunekit.recovery import heal_model, make_config

RESULTS = Path(__file__).resolve().parent / "results"
PRUNINGS = {
    "wanda 2:4": [("wanda", {"pattern": "2:4"})],
    "flap 20%": [("flap", {"sparsity": 0.2})],
    "shortgpt 30%": [("shortgpt", {"sparsity": 0.3})],
    "flap 30%": [("flap", {"sparsity": 0.3})],
    "shortgpt 10% + flap": [("shortgpt", {"sparsity": 0.1}), ("flap", {"sparsity": 0.2})],
}
HEALS = {
    "none": None,
    "lora": {"method": "lora"},
    "masked_lora": {"method": "masked_lora"},
    "perp norms": {"method": "perp", "perp": ["norms"]},
    "distill": {"method": "distill"},
}


def prune(model: str, stages: list, args: argparse.Namespace) -> prunekit.LoadedModel:
    lm = prunekit.load_model(model, dtype="float32")
    for method, options in stages:
        prunekit.prune(lm, method, nsamples=args.nsamples, seqlen=args.calib_seqlen, **options)
    return lm


def markdown(payload: dict) -> str:
    a = payload["args"]
    tasks = [t for t in a.get("tasks", "").split(",") if t]

    def accuracies(row: dict) -> str:
        return "".join(f"| {row['tasks'][t]:.3f} " for t in tasks)

    lines = [
        f"Model {a['model']}; healing {a['steps']} steps of {a['batch_size']} x {a['seqlen']} "
        f"tokens of WikiText-2 valid (lr {a['lr']}, cosine, LoRA rank 8 on every linear); "
        f"perplexity on the first {a['eval_limit']} windows of {a['eval_seqlen']} tokens of "
        f"WikiText-2 (tokenized wiki.*.tokens) and PTB test; {a['threads']} threads.",
        "",
        "| pruned | heal | params | sparsity before -> after | trainable | wikitext2 | ptb "
        + "".join(f"| {t} acc " for t in tasks)
        + "| wikitext2 log-ppl recovered per M trainable | s/step | peak RSS MiB |",
        "|---|---|---|---|---|---|---|" + "---|" * len(tasks) + "---|---|---|",
    ]
    unhealed = {r["pruned"]: r for r in payload["rows"] if r["heal"] == "none"}
    d = payload["dense"]
    lines.append(
        f"| dense | - | {d['parameters'] / 1e6:.2f}M | - | - | {d['wikitext2']:.2f} "
        f"| {d['ptb']:.2f} {accuracies(d)}| - | - | - |"
    )
    for r in payload["rows"]:
        lines.append(
            f"| {r['pruned']} | {r['heal']} | {r['parameters'] / 1e6:.2f}M "
            f"| {r['sparsity_before']:.4f} -> {r['sparsity_after']:.4f} "
            f"| {r['trainable']:,} | {r['wikitext2']:.2f} | {r['ptb']:.2f} {accuracies(r)}"
            f"| {recovered(r, unhealed.get(r['pruned']))} "
            f"| {r['seconds_per_step'] or '-'} | {r['peak_rss_mb'] or '-'} |"
        )
    return "\n".join(lines) + "\n"


def recovered(row: dict, unhealed: dict | None) -> str:
    """log(ppl before healing / after) per million trainable parameters (PERP's view)."""
    if unhealed is None or not row["trainable"]:
        return "-"
    gain = math.log(unhealed["wikitext2"] / row["wikitext2"])
    return f"{gain / (row['trainable'] / 1e6):.4f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument(
        "--plan",
        default=";".join(f"{p}={','.join(HEALS)}" for p in PRUNINGS),
        help="PRUNING=HEAL,HEAL;... (names from PRUNINGS and HEALS)",
    )
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--nsamples", type=int, default=32, help="calibration windows")
    parser.add_argument("--calib-seqlen", type=int, default=256)
    parser.add_argument("--eval-limit", type=int, default=8)
    parser.add_argument("--eval-seqlen", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tasks", default="", help="zero-shot tasks too, e.g. piqa,arc_easy")
    parser.add_argument("--task-limit", type=int, default=200, help="items per task")
    parser.add_argument("--name", default="recovery_smollm2")
    parser.add_argument("--render", action="store_true", help="rewrite the table from the JSON")
    args = parser.parse_args()
    if args.render:
        payload = json.loads((RESULTS / f"{args.name}.json").read_text())
        (RESULTS / f"{args.name}.md").write_text(markdown(payload))
        return
    torch.set_num_threads(args.threads)

    tasks = [t for t in args.tasks.split(",") if t]

    def ppl(lm) -> dict:
        result = prunekit.evaluate(lm, ["wikitext2", "ptb"], args.eval_seqlen, args.eval_limit)
        scores = {name: result[name]["perplexity"] for name in ("wikitext2", "ptb")}
        if tasks:
            zero_shot = prunekit.evaluate(lm, tasks, limit=args.task_limit)
            scores["tasks"] = {t: zero_shot[t]["acc"] for t in tasks}
        return scores

    dense = prunekit.load_model(args.model, dtype="float32")
    payload = {
        "args": vars(args),
        "dense": {"parameters": count_parameters(dense.model), **ppl(dense)},
        "rows": [],
    }
    teacher = dense.source
    del dense
    for entry in args.plan.split(";"):
        pruning, _, heals = entry.partition("=")
        pruned = prune(args.model, PRUNINGS[pruning], args)
        for heal in heals.split(","):
            print(f"== {pruning} / {heal}", flush=True)
            lm = copy.deepcopy(pruned)
            before = overall_sparsity(lm.adapter)
            row = {"pruned": pruning, "heal": heal, "sparsity_before": before}
            options = HEALS[heal]
            stage = {}
            if options is not None:
                if options["method"] == "distill":
                    options = {**options, "teacher": teacher}
                config = make_config(
                    steps=args.steps,
                    batch_size=args.batch_size,
                    seqlen=args.seqlen,
                    lr=args.lr,
                    save_every=0,
                    **options,
                )
                reset_peak_rss()
                start = time.perf_counter()
                stage = heal_model(lm, config).record
                stage["peak_rss_mb"] = round(step_peak_rss_mb(), 1)
                stage["heal_s"] = time.perf_counter() - start
            row |= {
                "sparsity_after": overall_sparsity(lm.adapter),
                "parameters": count_parameters(lm.model),
                "trainable": stage.get("trainable_parameters", 0),
                "seconds_per_step": stage.get("seconds_per_step"),
                "peak_rss_mb": stage.get("peak_rss_mb"),
                "stage": stage,
                **ppl(lm),
            }
            payload["rows"].append(row)
            print(json.dumps({k: row[k] for k in ("pruned", "heal", "wikitext2", "ptb")}))
            RESULTS.mkdir(parents=True, exist_ok=True)
            (RESULTS / f"{args.name}.json").write_text(json.dumps(payload, indent=2) + "\n")
            (RESULTS / f"{args.name}.md").write_text(markdown(payload))
            del lm


if __name__ == "__main__":
    main()
