"""GGUF export checked in llama.cpp (llama-cpp-python): SmolLM2-135M dense, ShortGPT-pruned
and FLAP-pruned (per-block widths and biases: llama.cpp's `deci`), exported at f32 / f16 /
q8_0, against the Hugging Face model: greedy
continuation (tokens identical to the HF model's) and perplexity on the first
`--windows` windows of `--seqlen` tokens of WikiText-2 test, both computed on the same
token windows.

    pip install llama-cpp-python   # builds llama.cpp from source
    python benchmarks/gguf_llamacpp.py --windows 4 --seqlen 256
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
from pathlib import Path

import numpy as np
import torch

import prunekit
from prunekit.data import evaluation_windows, load_text
from prunekit.export.gguf import export_gguf

RESULTS = Path(__file__).resolve().parent / "results"
PROMPT = "The history of the city begins in"


def hf_greedy(lm, ids: list[int], new: int) -> list[int]:
    out = lm.model.generate(
        torch.tensor([ids]), max_new_tokens=new, do_sample=False, pad_token_id=0
    )
    return out[0, len(ids) :].tolist()


def hf_nll(lm, windows: torch.Tensor) -> float:
    total, count = 0.0, 0
    with torch.no_grad():
        for window in windows:
            logits = lm.model(window[None]).logits[0, :-1].float()
            total += float(torch.nn.functional.cross_entropy(logits, window[1:], reduction="sum"))
            count += window.numel() - 1
    return total / count


def cpp_greedy(llm, ids: list[int], new: int) -> list[int]:
    llm.reset()
    out = []
    for token in llm.generate(ids, temp=0.0, top_k=1, reset=True):
        out.append(int(token))
        if len(out) == new:
            break
    return out


def cpp_nll(llm, windows: torch.Tensor) -> float:
    total, count = 0.0, 0
    for window in windows:
        ids = window.tolist()
        llm.reset()
        llm.eval(ids)
        logits = np.asarray(llm.scores[: len(ids) - 1], dtype=np.float64)
        logits -= logits.max(axis=1, keepdims=True)
        logp = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
        total -= float(logp[np.arange(len(ids) - 1), ids[1:]].sum())
        count += len(ids) - 1
    return total / count


# FLAP (global selection) leaves per-block widths and o / down biases: llama.cpp's deci
VARIANTS = {"dense": None, "shortgpt 30%": ("shortgpt", 0.3), "flap 20%": ("flap", 0.2)}


def main() -> None:
    from llama_cpp import Llama

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--windows", type=int, default=4)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--new-tokens", type=int, default=24)
    parser.add_argument("--quants", default="f32,f16,q8_0")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--name", default="gguf_llamacpp_smollm2")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="rows to run")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for variant in args.variants.split(","):
        lm = prunekit.load_model(args.model, dtype="float32")
        if VARIANTS[variant] is not None:
            method, sparsity = VARIANTS[variant]
            prunekit.prune(lm, method, sparsity=sparsity, nsamples=16, seqlen=256)
        text = load_text("wikitext2", purpose="eval").text
        windows = evaluation_windows(lm.tokenizer, text, args.seqlen, limit=args.windows)
        prompt = lm.tokenizer(PROMPT).input_ids
        reference = hf_greedy(lm, prompt, args.new_tokens)
        hf_ppl = math.exp(hf_nll(lm, windows))
        for quant in args.quants.split(","):
            with tempfile.TemporaryDirectory() as tmp:
                path = export_gguf(lm, Path(tmp) / "model.gguf", quant)
                size = path.stat().st_size / 2**20
                llm = Llama(
                    model_path=str(path), n_ctx=args.seqlen, logits_all=True,
                    n_threads=args.threads, verbose=False,
                )  # fmt: skip
                continuation = cpp_greedy(llm, prompt, args.new_tokens)
                cpp_ppl = math.exp(cpp_nll(llm, windows))
                del llm
            same = sum(a == b for a, b in zip(continuation, reference, strict=False))
            row = {
                "variant": variant,
                "quant": quant,
                "blocks": len(lm.adapter.blocks),
                "gguf_mib": round(size, 1),
                "greedy_tokens_identical": f"{same}/{len(reference)}",
                "first_divergence": next(
                    (
                        i
                        for i, (a, b) in enumerate(zip(continuation, reference, strict=False))
                        if a != b
                    ),
                    None,
                ),  # fmt: skip
                "hf_ppl": round(hf_ppl, 3),
                "llamacpp_ppl": round(cpp_ppl, 3),
                "ppl_rel_diff": round(cpp_ppl / hf_ppl - 1, 5),
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    lines = [
        f"Model {args.model}; llama.cpp through llama-cpp-python; greedy continuation of "
        f"{args.new_tokens} tokens after {PROMPT!r}; perplexity on the first {args.windows} "
        f"windows of {args.seqlen} tokens of WikiText-2 test (the same windows for both); "
        f"{args.threads} threads.",
        "",
        "| model | weights | blocks | GGUF MiB | greedy tokens identical to HF | HF ppl "
        "| llama.cpp ppl | relative difference |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['variant']} | {r['quant']} | {r['blocks']} | {r['gguf_mib']} "
            f"| {r['greedy_tokens_identical']} | {r['hf_ppl']:.3f} | {r['llamacpp_ppl']:.3f} "
            f"| {r['ppl_rel_diff']:+.2%} |"
        )
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(rows, indent=2) + "\n")
    (RESULTS / f"{args.name}.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
