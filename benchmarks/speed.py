"""Inference speed of pruned SmolLM2-135M against dense in torch on CPU, the same
measurement as `prunekit speed` (interleaved prefill / decode, medians of repeats):
ShortGPT 30% (depth), FLAP 40% (width) and magnitude 2:4 (dense kernels, so no gain
expected), with the CSR sparse-matmul check for the 2:4 model; with `--llamacpp`, the
GGUF exports of the models GGUF can hold timed in llama.cpp too.

    python benchmarks/speed.py --prefill 256 --decode 32 --batch 1,8 --repeats 3 --llamacpp
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path

import torch

import prunekit
from prunekit.eval.speed import prompt_ids, sparse_matmul, speed_table

RESULTS = Path(__file__).resolve().parent / "results"
VARIANTS = {
    "shortgpt 30%": ("shortgpt", {"sparsity": 0.3}),
    "flap 40%": ("flap", {"sparsity": 0.4}),
    "magnitude 2:4": ("magnitude", {"pattern": "2:4"}),
}


def speed_rows(table: dict, cells: Callable[[str], str] = lambda name: "") -> list[str]:
    """Markdown rows `| model | cells(model) | batch | prefill tok/s | x dense | decode
    tok/s | x dense |` of a `speed_table`, ratios against its "dense" entry."""
    lines = []
    for name, rows in table.items():
        for key, row in rows.items():
            base = table["dense"][key]
            pre, dec = row["prefill_tok_s"]["median"], row["decode_tok_s"]["median"]
            lines.append(
                f"| {name} {cells(name)}| {key.split()[-1]} | {pre:.0f} "
                f"| {pre / base['prefill_tok_s']['median']:.2f} | {dec:.1f} "
                f"| {dec / base['decode_tok_s']['median']:.2f} |"
            )
    return lines


def llamacpp_rows(loaded: dict, prompt: torch.Tensor, args: argparse.Namespace) -> dict:
    """The exportable models timed in llama.cpp at batch 1."""
    import tempfile

    from prunekit.errors import PrunekitError
    from prunekit.eval.speed import llamacpp_table
    from prunekit.export.gguf import check_exportable, export_gguf

    with tempfile.TemporaryDirectory() as tmp:
        paths = {}
        for name, lm in loaded.items():
            try:
                check_exportable(lm, args.quant)
            except PrunekitError:
                continue
            paths[name] = str(export_gguf(lm, Path(tmp) / f"{len(paths)}.gguf", args.quant))
        return llamacpp_table(paths, prompt[0].tolist(), args.decode, args.repeats, args.threads)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--prefill", type=int, default=256)
    parser.add_argument("--decode", type=int, default=32)
    parser.add_argument("--batch", default="1,8")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--llamacpp", action="store_true", help="also time the GGUF exports")
    parser.add_argument("--quant", default="f16", help="GGUF weights for --llamacpp")
    parser.add_argument("--name", default="speed_smollm2")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    batches = [int(b) for b in args.batch.split(",")]
    dense = prunekit.load_model(args.model, dtype="float32")
    prompt = prompt_ids(dense.tokenizer, args.prefill)
    models = {"dense": dense.model}
    loaded = {"dense": dense}
    csr = {}
    for name, (method, options) in VARIANTS.items():
        lm = prunekit.load_model(args.model, dtype="float32")
        prunekit.prune(lm, method, nsamples=16, seqlen=256, **options)
        models[name], loaded[name] = lm.model, lm
        if "pattern" in options:
            widest = max(
                (m for b in lm.adapter.blocks for m in lm.adapter.linears(b).values()),
                key=lambda m: m.weight.numel(),
            )
            csr[name] = {
                f"{t} tokens": sparse_matmul(widest.weight, t, args.repeats)
                for t in (1, args.prefill)
            }
    table = speed_table(models, prompt, args.decode, batches, args.repeats)
    payload = {"args": vars(args), "speed": table, "csr": csr}
    cpp = llamacpp_rows(loaded, prompt, args) if args.llamacpp else {}
    payload["llamacpp"] = cpp
    lines = [
        f"Model {args.model}, torch on CPU, {args.threads} thread(s); prompt {args.prefill} "
        f"tokens, {args.decode} greedy decode steps; medians of {args.repeats} interleaved "
        "repeats (min-max in the JSON).",
        "",
        "| model | batch | prefill tok/s | x dense | decode tok/s | x dense |",
        "|---|---|---|---|---|---|",
    ]
    lines += speed_rows(table)
    if cpp:
        lines += [
            "",
            f"llama.cpp (llama-cpp-python, GGUF {args.quant}), batch 1, same prompt and "
            "decode length; models GGUF cannot hold are left out:",
            "",
            "| model | prefill tok/s | x dense | decode tok/s | x dense |",
            "|---|---|---|---|---|",
        ]
        base = cpp["dense"]["batch 1"]
        for name, rows in cpp.items():
            row = rows["batch 1"]
            pre, dec = row["prefill_tok_s"]["median"], row["decode_tok_s"]["median"]
            lines.append(
                f"| {name} | {pre:.0f} | {pre / base['prefill_tok_s']['median']:.2f} "
                f"| {dec:.1f} | {dec / base['decode_tok_s']['median']:.2f} |"
            )
    for name, rows in csr.items():
        for key, row in rows.items():
            lines.append(
                f"\n{name}: its widest linear as torch CSR at {key}: "
                f"{row['csr_over_dense']:.2f}x the dense matmul time."
            )
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(payload, indent=2) + "\n")
    (RESULTS / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
