"""Learned masks against one-shot scores at equal training: Sheared LLaMA, Compresso and
NutePrune (each trained `--steps` steps on the calibration windows) next to FLAP followed
by the same number of distillation steps, all at `--sparsity` of the KV groups and MLP
channels. Every method sees each training window once: the learned methods calibrate on
`--steps` x `--batch-size` windows (on `--nsamples` windows they would cycle through the
same few thousand tokens and overfit them), as many as the distillation trains on; FLAP
scores on `--nsamples` windows. Reports WikiText-2 / PTB perplexity, zero-shot accuracy
(`--tasks`), decoder parameters, training tokens and wall time per run.

`compresso+prompt` trains Compresso with the paper's collaborative prompt prepended; both
Compresso rows are also measured with the prompt before every window (its tokens not
scored; the windows are shortened by the prompt so the same tokens are scored).

    python benchmarks/learned.py --sparsity 0.3 --steps 100 --nsamples 32 --seqlen 256
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch
import torch.nn.functional as F
from results_io import merge, write

import prunekit
from prunekit.data import evaluation_windows, load_text
from prunekit.methods.learned.compresso import COLLABORATIVE_PROMPT
from prunekit.recovery import heal_model, make_config
from prunekit.surgery.width import decoder_parameters

LEARNED = ("sheared_llama", "compresso", "nuteprune")


@torch.no_grad()
def prompted_perplexity(lm, dataset: str, seqlen: int, limit: int | None) -> float:
    """Perplexity of the windows' tokens 2..L with `COLLABORATIVE_PROMPT` before each
    window of L = `seqlen` − prompt tokens (the same targets the plain protocol scores
    in windows of that length)."""
    prompt = lm.tokenizer(COLLABORATIVE_PROMPT, add_special_tokens=False).input_ids
    text = load_text(dataset, purpose="eval").text
    windows = evaluation_windows(lm.tokenizer, text, seqlen - len(prompt), limit)
    total, count = 0.0, 0
    for window in windows:
        ids = torch.cat([torch.tensor(prompt), window]).unsqueeze(0)
        logits = lm.model(input_ids=ids, use_cache=False).logits[0, len(prompt) : -1].float()
        total += F.cross_entropy(logits, window[1:], reduction="sum").item()
        count += window.numel() - 1
    return math.exp(total / count)


def markdown(payload: dict) -> str:
    """The results table of a run (or of merged runs with the same settings)."""
    args = argparse.Namespace(**payload["args"])
    datasets = args.datasets.split(",")
    tasks = [t for t in args.tasks.split(",") if t]
    command = " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in payload["args"].items() if v not in ("", None)
    )
    lines = [
        f"Model {args.model}; {args.sparsity:.0%} of KV groups and MLP channels; "
        f"{args.steps} training steps of {args.batch_size} x {args.seqlen} tokens for "
        f"every method, on {args.steps * args.batch_size} seeded WikiText-2 valid windows "
        f"seen once each (FLAP scores on {args.nsamples}); perplexity on the "
        f"first {args.eval_limit} windows of "
        f"{args.eval_seqlen} tokens (reference protocol; WikiText-2 is the tokenized "
        f"wiki.test.tokens)"
        + (f"; zero-shot accuracy on the first {args.task_limit} items" if tasks else "")
        + f"; {args.threads} thread(s) per run. Command: `python benchmarks/learned.py "
        + command
        + "`"
        + (
            f" (run as {len(payload['shards'])} processes over --methods, combined with --merge)"
            if "shards" in payload
            else ""
        )
        + ".",
        "",
        "| method | decoder removed | "
        + " | ".join([*datasets, *tasks, "mean acc"] if tasks else datasets)
        + " | training tokens | s |",
        "|---|---|" + "---|" * (len(datasets) + len(tasks) + bool(tasks)) + "---|---|",
    ]

    def cells(r: dict) -> str:
        out = [f"{r[d]:.2f}" for d in datasets]
        if tasks:
            accs = [r["tasks"][t] for t in tasks]
            out += [f"{a:.3f}" for a in accs] + [f"{sum(accs) / len(accs):.3f}"]
        return " | ".join(out)

    lines.append(f"| dense | 0 | {cells(payload['dense'])} | - | - |")
    for r in payload["runs"]:
        lines.append(
            f"| {r['method']} | {r['decoder_share_removed']:.3f} | {cells(r)}"
            f" | {r['training_tokens']:,} | {r['seconds']:.0f} |"
        )
    for r in payload["runs"]:
        if "with_prompt" in r:
            lines.append("")
            lines.append(
                f"{r['method']} evaluated with the prompt before every window: "
                + ", ".join(f"{d} {r['with_prompt'][d]:.2f}" for d in datasets)
                + " (windows shortened by the prompt's tokens; same scored tokens)."
            )
    return "\n".join(lines) + "\n"


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
    parser.add_argument("--tasks", default="", help="zero-shot tasks too, e.g. piqa,arc_easy")
    parser.add_argument("--task-limit", type=int, default=200, help="items per task")
    parser.add_argument("--name", default="learned_smollm2")
    parser.add_argument("--merge", default="", help="combine these result names into --name")
    args = parser.parse_args()
    if args.merge:
        merge(args.merge.split(","), args.name, "methods", markdown)
        return
    torch.set_num_threads(args.threads)
    datasets = args.datasets.split(",")
    tasks = [t for t in args.tasks.split(",") if t]

    def ppl(lm) -> dict:
        result = prunekit.evaluate(lm, datasets, args.eval_seqlen, args.eval_limit)
        scores = {name: result[name]["perplexity"] for name in datasets}
        if tasks:
            zero_shot = prunekit.evaluate(lm, tasks, limit=args.task_limit)
            scores["tasks"] = {t: zero_shot[t]["acc"] for t in tasks}
        return scores

    dense = prunekit.load_model(args.model, dtype="float32")
    before = decoder_parameters(dense.adapter)
    payload = {"args": vars(args), "dense": {"decoder_parameters": before, **ppl(dense)}}
    payload["runs"] = []
    tokens = args.steps * args.batch_size * args.seqlen
    for name in args.methods.split(","):
        lm = prunekit.load_model(args.model, dtype="float32")
        start = time.perf_counter()
        method, _, variant = name.partition("+")
        if method in LEARNED:
            options = {"steps": args.steps} | ({"prompt": "default"} if variant else {})
            prunekit.prune(
                lm, method, sparsity=args.sparsity, nsamples=args.steps * args.batch_size,
                seqlen=args.seqlen, batch_size=args.batch_size, options=options,
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
        if method == "compresso":
            run["with_prompt"] = {
                d: prompted_perplexity(lm, d, args.eval_seqlen, args.eval_limit) for d in datasets
            }
        payload["runs"].append(run)
        print(json.dumps(run), flush=True)
        write(payload, args.name, markdown)


if __name__ == "__main__":
    main()
