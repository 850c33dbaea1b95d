"""Inference speed of expert pruning against the dense mixture-of-experts model in torch on
CPU, the same measurement as `benchmarks/speed.py` (interleaved prefill / decode, medians
of repeats). No pretrained MoE model fits this machine's offline registries, so the model
is a random-init Qwen3-MoE with SmolLM2's tokenizer (shape in the table); speed does not
depend on the weights' values. The pruned model keeps `top_k`, so every token still runs
`top_k` experts: the gain is the smaller expert set, not fewer FLOPs per token.

    python benchmarks/moe_speed.py --sparsity 0.5 --prefill 256 --decode 32 --batch 1,8
"""

from __future__ import annotations

import argparse

import torch
from results_io import write
from speed import speed_rows
from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

import prunekit
from prunekit.eval.speed import prompt_ids, speed_table
from prunekit.models.families import adapter_for
from prunekit.models.loading import LoadedModel
from prunekit.surgery.experts import expert_count

SHAPE = dict(
    hidden_size=576, num_hidden_layers=16, num_attention_heads=9, num_key_value_heads=3,
    head_dim=64, intermediate_size=1536, moe_intermediate_size=256, num_experts=16,
    num_experts_per_tok=2, decoder_sparse_step=1, mlp_only_layers=[], norm_topk_prob=True,
    tie_word_embeddings=True, max_position_embeddings=2048,
)  # fmt: skip


def moe_model(tokenizer, seed: int) -> LoadedModel:
    """The random-init Qwen3-MoE of `SHAPE` with `tokenizer`'s vocabulary."""
    torch.manual_seed(seed)
    config = Qwen3MoeConfig(vocab_size=len(tokenizer), **SHAPE)
    model = Qwen3MoeForCausalLM(config).eval()
    return LoadedModel(model, tokenizer, adapter_for(model), source="qwen3_moe-random")


def parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sparsity", type=float, default=0.5, help="share of experts removed")
    parser.add_argument("--criterion", default="reap")
    parser.add_argument("--prefill", type=int, default=256)
    parser.add_argument("--decode", type=int, default=32)
    parser.add_argument("--batch", default="1,8")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--name", default="speed_moe")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    tokenizer = prunekit.load_model("smollm2-135m", dtype="float32").tokenizer
    dense, pruned = moe_model(tokenizer, args.seed), moe_model(tokenizer, args.seed)
    prunekit.prune(
        pruned, "expert_prune", sparsity=args.sparsity, nsamples=16, seqlen=256,
        options={"criterion": args.criterion},
    )  # fmt: skip
    label = f"expert_prune {args.sparsity:.0%}"
    models = {"dense": dense.model, label: pruned.model}
    prompt = prompt_ids(tokenizer, args.prefill)
    batches = [int(b) for b in args.batch.split(",")]
    table = speed_table(models, prompt, args.decode, batches, args.repeats)
    sizes = {
        name: {
            "parameters": parameters(lm.model),
            "experts": expert_count(lm.adapter.moe(lm.adapter.blocks[0])),
        }
        for name, lm in (("dense", dense), (label, pruned))
    }
    payload = {"args": vars(args), "shape": SHAPE, "sizes": sizes, "speed": table}
    lines = [
        f"Random-init Qwen3-MoE ({SHAPE['num_hidden_layers']} blocks, hidden "
        f"{SHAPE['hidden_size']}, {SHAPE['num_experts']} experts of width "
        f"{SHAPE['moe_intermediate_size']}, top-{SHAPE['num_experts_per_tok']}, SmolLM2 "
        f"vocabulary), torch on CPU, {args.threads} thread(s); expert_prune "
        f"criterion={args.criterion} from 16 x 256 WikiText-2 calibration tokens; prompt "
        f"{args.prefill} tokens, {args.decode} greedy decode steps; medians of "
        f"{args.repeats} interleaved repeats (min-max in the JSON). Command: "
        f"`python benchmarks/moe_speed.py --sparsity {args.sparsity} --prefill "
        f"{args.prefill} --decode {args.decode} --batch {args.batch} --repeats "
        f"{args.repeats} --threads {args.threads}`.",
        "",
        "| model | experts per block | params | batch | prefill tok/s | x dense "
        "| decode tok/s | x dense |",
        "|---|---|---|---|---|---|---|---|",
    ]
    lines += speed_rows(
        table, lambda name: f"| {sizes[name]['experts']} | {sizes[name]['parameters'] / 1e6:.1f}M "
    )
    markdown = "\n".join(lines) + "\n"
    write(payload, args.name, lambda _: markdown)
    print(markdown)


if __name__ == "__main__":
    main()
