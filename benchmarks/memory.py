"""Memory of pruning with the blocks on disk (`--offload disk`) against pruning in memory.

(a) SmolLM2-135M, Wanda and SparseGPT 50%, 64 x 512 WikiText-2 calibration windows, each
    run in a fresh process: peak RSS of the whole process and over the import baseline
    (python + torch + transformers + prunekit, measured in the same process before the
    model loads), and wall time, streaming vs in memory.
(b) A model of Llama-2-7B's shape (hidden 4096, 32 blocks, 32 heads without GQA,
    intermediate 11008, vocabulary 32000, random init, bfloat16, ~13.5 GB of safetensors
    written here), pruned by Wanda 50% from 8 x 128 calibration tokens through the CLI
    under `--max-memory 4GiB`: wall time, peak RSS, and a check that the output loads and
    runs in plain transformers.

    python benchmarks/memory.py                 # both parts
    python benchmarks/memory.py --part small    # (a) only
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
LLAMA7B = {
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "vocab_size": 32000,
    "max_position_embeddings": 4096,
}


def one_run(method: str, offload: str, threads: int, work: Path, batch_size: int) -> dict:
    """In a subprocess: prune SmolLM2-135M, save, report memory and time (one JSON line)."""
    import torch

    import prunekit
    import prunekit.api  # noqa: F401  (the package root imports lazily)
    from prunekit.process_memory import peak_rss_mb

    torch.set_num_threads(threads)
    baseline = peak_rss_mb()
    start = time.perf_counter()
    out = work / f"{method}-{offload}"
    shutil.rmtree(out, ignore_errors=True)
    lm = prunekit.load_model("smollm2-135m", offload=offload, staging=work / f"staging-{offload}")
    record = prunekit.prune(
        lm, method, sparsity=0.5, calib="wikitext2", nsamples=64, seqlen=512, seed=0,
        batch_size=batch_size,
    )  # fmt: skip
    prunekit.save(lm, out, record)
    return {
        "method": method,
        "offload": offload,
        "batch_size": batch_size,
        "wall_s": time.perf_counter() - start,
        "import_rss_mb": baseline,
        "peak_rss_mb": peak_rss_mb(),
        "sparsity": record.overall_sparsity,
    }


def warm_token_cache() -> None:
    """Tokenize the calibration text once, so every measured run reads the cached ids."""
    import prunekit
    from prunekit.data import calibration_windows, load_text

    lm = prunekit.load_model("smollm2-135m")
    calibration_windows(lm.tokenizer, load_text("wikitext2", purpose="calib").text, 1, 512, 0)


def small(threads: int, work: Path, batch_sizes: list[int]) -> list[dict]:
    warm_token_cache()
    rows = []
    for batch in batch_sizes:
        for method in ("wanda", "sparsegpt"):
            for offload in ("none", "disk"):
                cmd = [sys.executable, __file__, "--one", method, offload]
                cmd += ["--threads", str(threads), "--work", str(work), "--batch-size", str(batch)]
                done = subprocess.run(cmd, check=True, capture_output=True, text=True)
                row = json.loads(done.stdout.strip().splitlines()[-1])
                row["over_imports_mb"] = row["peak_rss_mb"] - row["import_rss_mb"]
                rows.append(row)
                print(json.dumps(row), flush=True)
    for disk in (r for r in rows if r["offload"] == "disk"):
        mem = next(
            r for r in rows
            if (r["method"], r["batch_size"], r["offload"])
            == (disk["method"], disk["batch_size"], "none")
        )  # fmt: skip
        disk["rss_ratio"] = disk["peak_rss_mb"] / mem["peak_rss_mb"]
        disk["over_imports_ratio"] = disk["over_imports_mb"] / mem["over_imports_mb"]
    return rows


def write_llama7b(folder: Path) -> int:
    """A random-init bfloat16 model of Llama-2-7B's shape, one shard per block; bytes."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoTokenizer, LlamaConfig

    if (folder / "model.safetensors.index.json").is_file():
        return sum(p.stat().st_size for p in folder.glob("*.safetensors"))
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    config = LlamaConfig(**LLAMA7B, dtype="bfloat16", tie_word_embeddings=False)
    config.save_pretrained(tmp)
    tokenizer = AutoTokenizer.from_pretrained(ROOT.parent / "shared" / "models" / "stories260K")
    tokenizer.save_pretrained(tmp)
    gen = torch.Generator().manual_seed(0)
    h, i, v = LLAMA7B["hidden_size"], LLAMA7B["intermediate_size"], LLAMA7B["vocab_size"]

    def rand(*shape):
        return (torch.randn(*shape, generator=gen) * 0.02).to(torch.bfloat16)

    n = LLAMA7B["num_hidden_layers"]
    names = [f"model-{k + 1:05d}-of-{n + 1:05d}.safetensors" for k in range(n + 1)]
    weight_map, total = {}, 0
    head = {
        "model.embed_tokens.weight": rand(v, h),
        "model.norm.weight": torch.ones(h, dtype=torch.bfloat16),
        "lm_head.weight": rand(v, h),
    }

    def shards():  # made one at a time, so this process never holds the model
        yield names[0], head
        for layer in range(n):
            p = f"model.layers.{layer}."
            yield (
                names[layer + 1],
                {
                    p + "self_attn.q_proj.weight": rand(h, h),
                    p + "self_attn.k_proj.weight": rand(h, h),
                    p + "self_attn.v_proj.weight": rand(h, h),
                    p + "self_attn.o_proj.weight": rand(h, h),
                    p + "mlp.gate_proj.weight": rand(i, h),
                    p + "mlp.up_proj.weight": rand(i, h),
                    p + "mlp.down_proj.weight": rand(h, i),
                    p + "input_layernorm.weight": torch.ones(h, dtype=torch.bfloat16),
                    p + "post_attention_layernorm.weight": torch.ones(h, dtype=torch.bfloat16),
                },
            )

    for name, tensors in shards():
        save_file(tensors, str(tmp / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, name))
        total += sum(t.numel() * 2 for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (tmp / "model.safetensors.index.json").write_text(json.dumps(index))
    os.replace(tmp, folder)
    return total


def large(threads: int, work: Path, budget: str) -> dict:
    folder = work / "llama7b-shape"
    start = time.perf_counter()
    size = write_llama7b(folder)
    written_s = time.perf_counter() - start
    out = work / "llama7b-wanda50"
    shutil.rmtree(out, ignore_errors=True)
    cmd = [
        sys.executable, "-m", "prunekit.cli", "prune", str(folder), "--method", "wanda",
        "--sparsity", "0.5", "--calib", "wikitext2", "--nsamples", "8", "--seqlen", "128",
        "--max-memory", budget, "--threads", str(threads), "--out", str(out),
    ]  # fmt: skip
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode:
        raise SystemExit(done.stderr[-2000:])
    # the CLI's own figure: ru_maxrss of a child also counts its parent's memory at fork
    peak_mib = float(re.search(r"peak RSS (\d+) MiB", done.stdout).group(1))
    check = [sys.executable, __file__, "--check-load", str(out)]
    loaded = json.loads(subprocess.run(check, check=True, capture_output=True, text=True).stdout)
    return {
        "shape": "Llama-2-7B (random init, bfloat16)",
        "checkpoint_gb": size / 1e9,
        "write_s": written_s,
        "max_memory": budget,
        "prune_wall_s": wall,
        "prune_wall_min": wall / 60,
        "peak_rss_gib": peak_mib / 1024,
        "cli_output": done.stdout.strip().splitlines()[-3:],
        **loaded,
    }


def check_load(folder: Path) -> dict:
    """Load the pruned folder in plain transformers, run 8 tokens, count zeros."""
    import torch
    from transformers import AutoModelForCausalLM

    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
    with torch.no_grad():
        logits = model(torch.arange(1, 9).unsqueeze(0)).logits
    linears = [m.weight for n, m in model.named_modules() if n.endswith("_proj")]
    zeros = sum(int((w == 0).sum()) for w in linears) / sum(w.numel() for w in linears)
    return {
        "loads_in_transformers": bool(torch.isfinite(logits.float()).all()),
        "load_s": time.perf_counter() - start,
        "output_sparsity": zeros,
    }


def markdown(result: dict) -> str:
    """The tables of `memory.json`."""
    lines = [
        "Commands: `python benchmarks/memory.py --part small --batch-sizes 8,1` (SmolLM2-135M) "
        f"and `--part large` (the 7B shape); {result.get('threads')} thread(s) per process; "
        "the SmolLM2 wall times were taken while another benchmark shared the 2 cores.",
        "",
    ]
    if "smollm2" in result:
        lines += [
            "SmolLM2-135M, 50%, 64 x 512 WikiText-2 calibration windows (token ids read from "
            "the token cache), a fresh process per run; 'batch' is the engine's windows per "
            "forward; 'x in memory' compares the memory over imports:",
            "",
            "| method | batch | blocks | peak RSS (MiB) | over imports (MiB) | x in memory "
            "| wall (s) |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in result["smollm2"]:
            ratio = f"{r['over_imports_ratio']:.2f}" if "over_imports_ratio" in r else "-"
            lines.append(
                f"| {r['method']} | {r.get('batch_size', 8)} | "
                f"{'on disk' if r['offload'] == 'disk' else 'in memory'} | "
                f"{r['peak_rss_mb']:.0f} | {r['over_imports_mb']:.0f} | {ratio} | "
                f"{r['wall_s']:.0f} |"
            )
        lines.append("")
    if "llama7b_shape" in result:
        r = result["llama7b_shape"]
        lines += [
            f"{r['shape']}, {r['checkpoint_gb']:.1f} GB of safetensors, Wanda 50% from 8 x 128 "
            f"calibration tokens with `--max-memory {r['max_memory']}` (streaming turned on by "
            f"the budget): pruned in {r['prune_wall_min']:.1f} min (whole CLI process) with "
            f"{r['peak_rss_gib']:.2f} GiB peak RSS; the output loads in plain transformers "
            f"({r['load_s']:.0f} s) with sparsity {r['output_sparsity']:.3f}.",
        ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--part", choices=("small", "large", "both"), default="both")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--work", type=Path, default=ROOT / "out" / "memory")
    parser.add_argument("--max-memory", default="4GiB")
    parser.add_argument("--one", nargs=2, metavar=("METHOD", "OFFLOAD"))
    parser.add_argument("--batch-size", type=int, default=8, help="with --one")
    parser.add_argument("--batch-sizes", default="8,1", help="engine batch sizes (small)")
    parser.add_argument("--check-load", type=Path)
    parser.add_argument("--markdown-only", action="store_true", help="rewrite memory.md")
    args = parser.parse_args()
    path = RESULTS / "memory.json"
    if args.markdown_only:
        (RESULTS / "memory.md").write_text(markdown(json.loads(path.read_text())))
        return
    if args.one:
        print(json.dumps(one_run(*args.one, args.threads, args.work, args.batch_size)))
        return
    if args.check_load:
        print(json.dumps(check_load(args.check_load)))
        return
    args.work.mkdir(parents=True, exist_ok=True)
    result = {"command": "python benchmarks/memory.py " + " ".join(sys.argv[1:]),
              "threads": args.threads}  # fmt: skip
    if path.is_file():  # keep the other part's latest figures
        result = {**json.loads(path.read_text()), **result}
    if args.part in ("small", "both"):
        sizes = [int(b) for b in args.batch_sizes.split(",")]
        result["smollm2"] = small(args.threads, args.work, sizes)
    if args.part in ("large", "both"):
        result["llama7b_shape"] = large(args.threads, args.work, args.max_memory)
        print(json.dumps(result["llama7b_shape"]), flush=True)
    RESULTS.mkdir(exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / "memory.md").write_text(markdown(result))


if __name__ == "__main__":
    main()
