"""Structured width pruning on SmolLM2-135M: magnitude-SP, Wanda-SP, FLAP, LLM-Pruner at
20% and 40% of decoder-block parameters removed.

Per run: perplexity (WikiText-2 and PTB test), parameter counts, and CPU speed at batch 1
(prefill tokens/s for a 512-token prompt, decode tokens/s for 64 new tokens with a KV
cache). Dense and pruned speeds are measured in the same process, interleaved, repeated;
medians and ratios are reported. Dense perplexity comes from the same run.

    python benchmarks/structured.py                     # full evaluation (slow on 2 cores)
    python benchmarks/structured.py --eval-limit 32     # first 32 windows per dataset
    python benchmarks/structured.py --sparsities 0.2 --name s20 &   # shards, then
    python benchmarks/structured.py --merge s20,s40     # -> results/structured.{json,md}
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from results_io import merge, write

import prunekit
from prunekit.eval.speed import (
    decode_seconds,
    interleaved,
    medians,
    prefill_seconds,
    prompt_ids,
)
from prunekit.export.record import count_parameters
from prunekit.surgery.width import decoder_parameters

METHODS = ("magnitude_sp", "wanda_sp", "flap", "llm_pruner")


def speed(dense, pruned, ids: torch.Tensor, new_tokens: int, repeats: int) -> dict:
    """Interleaved prefill/decode timings of dense and pruned; medians and ratios."""
    samples = interleaved(
        {"dense": dense, "pruned": pruned},
        lambda model: {
            "prefill": prefill_seconds(model, ids),
            "decode": decode_seconds(model, ids, new_tokens),
        },
        repeats,
        warmup=lambda model: prefill_seconds(model, ids),
    )
    result = {}
    for name, times in samples.items():
        median = medians(times)
        result[name] = {
            "prefill_tok_s": ids.shape[1] / median["prefill"],
            "decode_tok_s": new_tokens / median["decode"],
        }
    result["prefill_speedup"] = result["pruned"]["prefill_tok_s"] / result["dense"]["prefill_tok_s"]
    result["decode_speedup"] = result["pruned"]["decode_tok_s"] / result["dense"]["decode_tok_s"]
    return result


def markdown(payload: dict) -> str:
    a = payload["args"]
    datasets = a["datasets"].split(",")
    timed = not a.get("no_speed")
    speed_note = (
        f"speed: batch 1, {a['prompt']}-token prefill, {a['new_tokens']} decode tokens with KV "
        f"cache, {a['repeats']} interleaved repeats, medians"
        if timed
        else "no speed columns (see the speed benchmark)"
    )
    lines = [
        f"Model {a['model']}; calibration {a['nsamples']} x {a['seqlen']} tokens of WikiText-2 "
        f"valid; perplexity on the first {a['eval_limit'] or 'all'} windows of "
        f"{a['eval_seqlen']} tokens of each test set (reference protocol); {speed_note}; "
        f"{a['threads']} threads.",
        "",
        "| method | removed (decoder) | params | "
        + " | ".join(f"{d} ppl" for d in datasets)
        + (" | prefill tok/s (x dense) | decode tok/s (x dense)" if timed else "")
        + " | prune s |",
        "|---|---|---|" + "---|" * len(datasets) + ("---|---|" if timed else "") + "---|",
    ]
    d = payload["dense"]
    ppl = " | ".join(f"{d[name]:.2f}" if name in d else "-" for name in datasets)
    dashes = "- | - | - |" if timed else "- |"
    lines.append(f"| dense | 0 | {d['parameters'] / 1e6:.3f}M | {ppl} | {dashes}")
    for r in payload["runs"]:
        ppl = " | ".join(f"{r[name]:.2f}" for name in datasets)
        speeds = ""
        if timed:
            s = r["speed"]
            speeds = (
                f"| {s['pruned']['prefill_tok_s']:.0f} ({s['prefill_speedup']:.2f}x) "
                f"| {s['pruned']['decode_tok_s']:.1f} ({s['decode_speedup']:.2f}x) "
            )
        lines.append(
            f"| {r['method']} | {r['decoder_share_removed']:.3f} (target {r['sparsity']}) "
            f"| {r['parameters'] / 1e6:.3f}M | {ppl} {speeds}| {r['prune_s']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--sparsities", default="0.2,0.4")
    parser.add_argument("--nsamples", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--eval-limit", type=int, default=None)
    parser.add_argument("--eval-seqlen", type=int, default=1024)
    parser.add_argument("--datasets", default="wikitext2,ptb")
    parser.add_argument("--prompt", type=int, default=512, help="prefill tokens")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--name", default="structured")
    parser.add_argument("--no-dense-eval", action="store_true", help="shards after the first")
    parser.add_argument("--merge", default="", help="combine these result names into --name")
    parser.add_argument(
        "--no-speed", action="store_true", help="perplexity only (speed needs an idle machine)"
    )
    args = parser.parse_args()
    if args.merge:
        merge(args.merge.split(","), args.name)
        return
    torch.set_num_threads(args.threads)
    datasets = args.datasets.split(",")

    dense = prunekit.load_model(args.model)
    ppl = (
        {}
        if args.no_dense_eval
        else prunekit.evaluate(dense, datasets, args.eval_seqlen, args.eval_limit)
    )
    payload = {
        "args": vars(args),
        "dense": {
            "parameters": count_parameters(dense.model),
            "decoder_parameters": decoder_parameters(dense.adapter),
            **{name: ppl[name]["perplexity"] for name in ppl},
            "evaluation": ppl,
        },
        "runs": [],
    }
    prompt = prompt_ids(dense.tokenizer, args.prompt)
    for sparsity in (float(s) for s in args.sparsities.split(",")):
        for method in args.methods.split(","):
            print(f"== {method} at {sparsity}", flush=True)
            lm = prunekit.load_model(args.model)
            start = time.perf_counter()
            record = prunekit.prune(
                lm, method, sparsity, calib="wikitext2", nsamples=args.nsamples, seqlen=args.seqlen
            )
            prune_s = time.perf_counter() - start
            ppl = prunekit.evaluate(lm, datasets, args.eval_seqlen, args.eval_limit)
            run = {
                "method": method,
                "sparsity": sparsity,
                "config": record.config,
                "parameters": record.parameters_after,
                "parameters_before": record.parameters_before,
                "decoder_parameters": record.details["decoder_parameters_after"],
                "decoder_share_removed": record.details["decoder_share_removed"],
                "kv_groups_per_block": [
                    len(k["kv_groups"]) for k in record.details["kept"].values()
                ],
                "channels_per_block": [len(k["channels"]) for k in record.details["kept"].values()],
                "prune_s": prune_s,
                **{name: ppl[name]["perplexity"] for name in datasets},
                "evaluation": ppl,
            }
            if not args.no_speed:
                run["speed"] = speed(dense.model, lm.model, prompt, args.new_tokens, args.repeats)
            payload["runs"].append(run)
            print(json.dumps({k: v for k, v in run.items() if k != "evaluation"}), flush=True)
            write(payload, args.name, markdown)
            del lm


if __name__ == "__main__":
    main()
