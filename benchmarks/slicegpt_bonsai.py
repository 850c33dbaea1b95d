"""SliceGPT and Bonsai on SmolLM2-135M at 20% and 40% of decoder-block parameters removed.

Per run: WikiText-2 test perplexity (first `--eval-limit` windows), parameter counts
(total and decoder blocks) and CPU prefill speed at batch 1 for a `--prompt`-token
prompt. Dense and pruned speeds are measured in the same process, interleaved and
repeated; medians and ratios are reported. Dense perplexity comes from the same run.

SliceGPT runs with `budget=parameters`, so its sparsity is the share of decoder-block
parameters removed like Bonsai's (its slicing ratio is reported beside it).

    python benchmarks/slicegpt_bonsai.py --eval-limit 16
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import prunekit
from prunekit.eval.speed import forward_seconds, interleaved, medians, prompt_ids
from prunekit.export.record import count_parameters
from prunekit.surgery.width import decoder_parameters

RESULTS = Path(__file__).resolve().parent / "results"


def prefill_speed(dense: torch.nn.Module, pruned: torch.nn.Module, ids, repeats: int) -> dict:
    """Interleaved scoring-style forward timings (`forward_seconds`: no KV cache, logits at
    every position) of dense and pruned over `ids` [1, L]: median tokens/s and the ratio."""
    samples = interleaved(
        {"dense": dense, "pruned": pruned},
        lambda model: {"prefill": forward_seconds(model, ids)},
        repeats,
        warmup=lambda model: forward_seconds(model, ids),
    )
    times = {name: s["prefill"] for name, s in samples.items()}
    tok_s = {name: ids.shape[1] / median for name, median in medians(times).items()}
    return {
        "dense_tok_s": tok_s["dense"],
        "pruned_tok_s": tok_s["pruned"],
        "speedup": tok_s["pruned"] / tok_s["dense"],
        "seconds": times,
    }


def prune_options(run: str, args: argparse.Namespace) -> tuple[str, dict, int, int]:
    """Method, options, calibration windows and window length of one benchmark run.

    `slicegpt` removes a share of decoder parameters; `slicegpt_width` slices a share of
    the hidden width (the paper's slicing ratio); `bonsai_ridge` is Bonsai with `fit=ridge`.
    """
    if run in ("slicegpt", "slicegpt_width"):
        budget = "parameters" if run == "slicegpt" else "width"
        return "slicegpt", {"budget": budget}, args.nsamples, args.seqlen
    options = {"samples": args.bonsai_samples, "prune_frac": args.bonsai_prune_frac}
    if run == "bonsai_ridge":
        options["fit"] = "ridge"
    return "bonsai", options, args.bonsai_nsamples, args.bonsai_seqlen


def markdown(payload: dict) -> str:
    a = payload["args"]
    methods = a["methods"].split(",")
    datasets = a.get("datasets", "wikitext2").split(",")
    calibration = []
    if {"slicegpt", "slicegpt_width"} & set(methods):
        calibration.append(f"SliceGPT {a['nsamples']} x {a['seqlen']} tokens")
    if {"bonsai", "bonsai_ridge"} & set(methods):
        calibration.append(
            f"Bonsai {a['bonsai_nsamples']} x {a['bonsai_seqlen']} tokens, "
            f"{a['bonsai_samples']} sub-models per round, "
            f"{a['bonsai_prune_frac']} of the parameters per round"
        )
    lines = [
        f"Model {a['model']}; test perplexity on the first "
        f"{a['eval_limit'] or 'all'} windows of {a['eval_seqlen']} tokens; calibration from "
        f"WikiText-2 valid ({'; '.join(calibration)}); prefill: batch 1, {a['prompt']} tokens, "
        f"{a['repeats']} interleaved repeats, medians, {a['threads']} threads.",
        "",
        "| method | target | decoder removed | params (total) | "
        + "".join(f"{name} ppl | " for name in datasets)
        + "prefill tok/s (x dense) | prune s | notes |",
        "|---|---|---|---|" + "---|" * len(datasets) + "---|---|---|",
    ]
    d = payload["dense"]
    lines.append(
        f"| dense | - | 0 | {d['parameters'] / 1e6:.2f}M | "
        + "".join(f"{d[name]:.2f} | " for name in datasets)
        + "- | - | - |"
    )
    for r in payload["runs"]:
        s = r["speed"]
        note = ""
        if r["method"].startswith("slicegpt"):
            width, hidden = r["details"]["sliced_hidden_size"], r["details"]["hidden_size"]
            note = f"width {width} of {hidden}; head untied"
        lines.append(
            f"| {r['method']} | {r['sparsity']} | {r['decoder_share_removed']:.3f} "
            f"| {r['parameters'] / 1e6:.2f}M | "
            + "".join(f"{r[name]:.2f} | " for name in datasets)
            + f"{s['pruned_tok_s']:.0f} ({s['speedup']:.2f}x) | {r['prune_s']:.0f} | {note} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--methods", default="slicegpt,bonsai")
    parser.add_argument("--sparsities", default="0.2,0.4")
    parser.add_argument("--nsamples", type=int, default=16, help="SliceGPT calibration windows")
    parser.add_argument("--seqlen", type=int, default=512, help="SliceGPT window length")
    parser.add_argument("--bonsai-nsamples", type=int, default=4)
    parser.add_argument("--bonsai-seqlen", type=int, default=128)
    parser.add_argument("--bonsai-samples", type=int, default=200)
    parser.add_argument("--bonsai-prune-frac", type=float, default=0.05)
    parser.add_argument("--eval-limit", type=int, default=None)
    parser.add_argument("--eval-seqlen", type=int, default=1024)
    parser.add_argument("--datasets", default="wikitext2,ptb", help="perplexity test sets")
    parser.add_argument("--prompt", type=int, default=512, help="prefill tokens")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--name", default="slicegpt_bonsai")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    datasets = args.datasets.split(",")
    dense = prunekit.load_model(args.model)
    ppl = prunekit.evaluate(dense, datasets, args.eval_seqlen, args.eval_limit)
    payload = {
        "args": vars(args),
        "dense": {
            "parameters": count_parameters(dense.model),
            "decoder_parameters": decoder_parameters(dense.adapter),
            **{name: ppl[name]["perplexity"] for name in datasets},
            "evaluation": ppl,
        },
        "runs": [],
    }
    prompt = prompt_ids(dense.tokenizer, args.prompt)
    for sparsity in (float(s) for s in args.sparsities.split(",")):
        for name in args.methods.split(","):
            print(f"== {name} at {sparsity}", flush=True)
            method, options, nsamples, seqlen = prune_options(name, args)
            lm = prunekit.load_model(args.model)
            start = time.perf_counter()
            record = prunekit.prune(
                lm, method, sparsity, nsamples=nsamples, seqlen=seqlen, options=options
            )
            prune_s = time.perf_counter() - start
            ppl = prunekit.evaluate(lm, datasets, args.eval_seqlen, args.eval_limit)
            details = {k: v for k, v in record.details.items() if k != "widths"}
            if "widths" in record.details:
                widths = record.details["widths"].values()
                details["kv_groups_per_block"] = [w["kv_groups"] for w in widths]
                details["channels_per_block"] = [w["channels"] for w in widths]
            run = {
                "method": name,
                "sparsity": sparsity,
                "config": record.config,
                "calibration": {"nsamples": nsamples, "seqlen": seqlen},
                "parameters": record.parameters_after,
                "parameters_before": record.parameters_before,
                "decoder_share_removed": record.details["decoder_share_removed"],
                "prune_s": prune_s,
                **{name: ppl[name]["perplexity"] for name in datasets},
                "evaluation": ppl,
                "details": details,
                "speed": prefill_speed(dense.model, lm.model, prompt, args.repeats),
            }
            payload["runs"].append(run)
            print(json.dumps({k: run[k] for k in ("method", "sparsity", *datasets)}), flush=True)
            RESULTS.mkdir(parents=True, exist_ok=True)
            (RESULTS / f"{args.name}.json").write_text(json.dumps(payload, indent=2) + "\n")
            (RESULTS / f"{args.name}.md").write_text(markdown(payload))
            del lm


if __name__ == "__main__":
    main()
