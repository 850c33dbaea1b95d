"""Learned masks against one-shot scores at equal training: Sheared LLaMA, Compresso and
NutePrune (each trained `--steps` steps on the calibration windows) next to FLAP followed
by the same number of distillation steps, all at `--sparsity` of the KV groups and MLP
channels. Reports WikiText-2 / PTB perplexity, decoder parameters, training tokens and
wall time per run.

    python benchmarks/learned.py --sparsity 0.3 --steps 100 --nsamples 32 --seqlen 256
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import prunekit
from prunekit.recovery import heal_model, make_config
from prunekit.surgery.width import decoder_parameters

RESULTS = Path(__file__).resolve().parent / "results"
LEARNED = ("sheared_llama", "compresso", "nuteprune")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--sparsity", type=float, default=0.3)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--nsamples", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--eval-limit", type=int, default=8)
    parser.add_argument("--eval-seqlen", type=int, default=1024)
    parser.add_argument("--datasets", default="wikitext2,ptb")
    parser.add_argument("--methods", default=",".join((*LEARNED, "flap+distill")))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--name", default="learned_smollm2")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    datasets = args.datasets.split(",")

    def ppl(lm) -> dict:
        result = prunekit.evaluate(lm, datasets, args.eval_seqlen, args.eval_limit)
        return {name: result[name]["perplexity"] for name in datasets}

    dense = prunekit.load_model(args.model, dtype="float32")
    before = decoder_parameters(dense.adapter)
    payload = {"args": vars(args), "dense": {"decoder_parameters": before, **ppl(dense)}}
    payload["runs"] = []
    tokens = args.steps * args.batch_size * args.seqlen
    for name in args.methods.split(","):
        lm = prunekit.load_model(args.model, dtype="float32")
        start = time.perf_counter()
        if name in LEARNED:
            prunekit.prune(
                lm, name, sparsity=args.sparsity, nsamples=args.nsamples, seqlen=args.seqlen,
                batch_size=args.batch_size, options={"steps": args.steps},
            )  # fmt: skip
        else:
            prunekit.prune(lm, "flap", sparsity=args.sparsity, nsamples=args.nsamples,
                           seqlen=args.seqlen)  # fmt: skip
            config = make_config(
                method="distill", teacher=dense.source, steps=args.steps,
                batch_size=args.batch_size, seqlen=args.seqlen, save_every=0,
            )  # fmt: skip
            heal_model(lm, config)
        seconds = time.perf_counter() - start
        run = {
            "method": name,
            "decoder_share_removed": 1 - decoder_parameters(lm.adapter) / before,
            "training_tokens": tokens,
            "seconds": seconds,
            **ppl(lm),
        }
        payload["runs"].append(run)
        print(json.dumps(run), flush=True)
        lines = [
            f"Model {args.model}; {args.sparsity:.0%} of KV groups and MLP channels; "
            f"{args.steps} training steps of {args.batch_size} x {args.seqlen} tokens for "
            f"every method; perplexity on the first {args.eval_limit} windows of "
            f"{args.eval_seqlen} tokens; {args.threads} threads.",
            "",
            "| method | decoder removed | " + " | ".join(datasets) + " | training tokens | s |",
            "|---|---|" + "---|" * len(datasets) + "---|---|",
            "| dense | 0 | "
            + " | ".join(f"{payload['dense'][d]:.2f}" for d in datasets)
            + " | - | - |",
        ]
        for r in payload["runs"]:
            lines.append(
                f"| {r['method']} | {r['decoder_share_removed']:.3f} | "
                + " | ".join(f"{r[d]:.2f}" for d in datasets)
                + f" | {r['training_tokens']:,} | {r['seconds']:.0f} |"
            )
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / f"{args.name}.json").write_text(json.dumps(payload, indent=2) + "\n")
        (RESULTS / f"{args.name}.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
