"""Parity with llm-compressor: the same job through prunekit and through llm-compressor.

SmolLM2-135M (float32), the same 64 x 512 WikiText-2 calibration windows handed to both
(cut once by prunekit's reference protocol, saved, and given to llm-compressor as a
tokenized dataset), Wanda and SparseGPT at 50% unstructured and 2:4 through
`WandaPruningModifier` / `SparseGPTModifier` (llm-compressor's one-shot sequential
pipeline), magnitude against the reference's per-layer threshold (llm-compressor's
magnitude modifier is a training-time schedule, not a one-shot method). Per configuration:

- mask agreement: share of the decoder linears' weights that are kept (or zeroed) by both;
- WikiText-2 and PTB perplexity of both models under prunekit's evaluator (the reference
  protocol: no BOS per window, non-overlapping windows);
- whole-process wall time of each tool's pruning job (interpreter start, imports, model
  load, calibration, pruning, writing the weights), the two run back to back.

llm-compressor lives in its own virtual environment (it pins its own transformers):

    python3 -m venv /work/lcvenv
    /work/lcvenv/bin/pip install torch==2.13.0 llmcompressor==0.14.0.1
    python benchmarks/parity.py --lc-python /work/lcvenv/bin/python --eval-limit 40
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
CONFIGS = [  # (name, method, pattern, prunekit's compute dtype)
    ("wanda-50", "wanda", "unstructured", "auto"),
    ("wanda-2:4", "wanda", "2:4", "auto"),
    ("sparsegpt-50", "sparsegpt", "unstructured", "auto"),
    ("sparsegpt-2:4", "sparsegpt", "2:4", "auto"),
    ("magnitude-50", "magnitude", "unstructured", "auto"),
    ("wanda-50-bf16", "wanda", "unstructured", "bfloat16"),
    ("wanda-2:4-bf16", "wanda", "2:4", "bfloat16"),
    ("sparsegpt-50-bf16", "sparsegpt", "unstructured", "bfloat16"),
    ("sparsegpt-2:4-bf16", "sparsegpt", "2:4", "bfloat16"),
]
NSAMPLES, SEQLEN = 64, 512


# -- the jobs, each run in its own process ------------------------------------------------


def prepare(work: Path) -> None:
    """The dense HF folder of SmolLM2-135M and the calibration windows, once."""
    import torch

    import prunekit
    from prunekit.data import calibration_windows, load_text

    lm = prunekit.load_model("smollm2-135m")
    dense = work / "dense"
    if not (dense / "config.json").exists():
        lm.model.save_pretrained(dense)
        lm.tokenizer.save_pretrained(dense)
    text = load_text("wikitext2", purpose="calib").text
    windows = calibration_windows(lm.tokenizer, text, NSAMPLES, SEQLEN, seed=0)
    torch.save(windows, work / "calib.pt")


def save_linears(model, path: Path) -> None:
    """Every decoder linear's weight (float32) to one safetensors file."""
    import torch
    from safetensors.torch import save_file

    weights = {
        f"{name}.weight": module.weight.detach().float().contiguous()
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and ".layers." in name
    }
    save_file(weights, str(path))


def run_prunekit(
    work: Path, method: str, pattern: str, threads: int, out: Path, compute_dtype: str
) -> None:
    import hashlib

    import torch

    import prunekit
    import prunekit.api  # noqa: F401  (the package root imports lazily)

    torch.set_num_threads(threads)
    lm = prunekit.load_model(str(work / "dense"))
    record = prunekit.prune(
        lm,
        method,
        sparsity=0.5 if pattern == "unstructured" else None,
        pattern=pattern,
        calib="wikitext2",
        nsamples=NSAMPLES,
        seqlen=SEQLEN,
        seed=0,
        compute_dtype=compute_dtype,
    )
    saved = torch.load(work / "calib.pt", weights_only=True)
    sha = hashlib.sha256(saved.numpy().tobytes()).hexdigest()
    if record.calibration and record.calibration["windows_sha256"] != sha:
        raise SystemExit("prunekit's calibration windows differ from the saved ones")
    save_linears(lm.model, out)


def run_llmcompressor(work: Path, method: str, pattern: str, threads: int, out: Path) -> None:
    import torch
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.pruning import SparseGPTModifier, WandaPruningModifier
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(work / "dense", dtype=torch.float32)
    windows = torch.load(work / "calib.pt", weights_only=True)
    data = Dataset.from_dict(
        {"input_ids": windows.tolist(), "attention_mask": torch.ones_like(windows).tolist()}
    )
    structure = "0:0" if pattern == "unstructured" else pattern
    kind = {"wanda": WandaPruningModifier, "sparsegpt": SparseGPTModifier}[method]
    recipe = kind(sparsity=0.5, mask_structure=structure, targets=["LlamaDecoderLayer"])
    oneshot(
        model=model,
        dataset=data,
        recipe=recipe,
        num_calibration_samples=NSAMPLES,
        max_seq_length=SEQLEN,
        shuffle_calibration_samples=False,
    )
    save_linears(model, out)


def reference_magnitude(work: Path, out: Path) -> None:
    """locuslab/wanda `prune_magnitude`: one threshold per layer, `|W| <= sorted[int(n·s)]`
    zeroed (written here, not with prunekit's mask helpers)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(work / "dense", dtype=torch.float32)
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and ".layers." in name:
                w = module.weight
                thresh = torch.sort(w.abs().flatten())[0][int(w.numel() * 0.5)]
                w[w.abs() <= thresh] = 0
    save_linears(model, out)


# -- comparison ---------------------------------------------------------------------------


def agreement(work: Path, name: str, reference: str) -> dict:
    """Mask agreement of prunekit's weights for `name` with the reference's `reference`:
    the share of decoder-linear weights that both keep or both zero."""
    from safetensors.torch import load_file

    ours = load_file(str(work / f"prunekit-{name}.safetensors"))
    theirs = load_file(str(work / f"reference-{reference}.safetensors"))
    same = total = zeros_ours = zeros_theirs = 0
    for key, w in ours.items():
        same += int(((w == 0) == (theirs[key] == 0)).sum())
        zeros_ours += int((w == 0).sum())
        zeros_theirs += int((theirs[key] == 0).sum())
        total += w.numel()
    return {
        "mask_agreement": same / total,
        "prunekit_sparsity": zeros_ours / total,
        "reference_sparsity": zeros_theirs / total,
    }


def perplexities(work: Path, weights: Path, eval_limit: int | None, datasets: list[str]) -> dict:
    """Perplexity of the dense model with `weights` loaded, under prunekit's evaluator."""
    from safetensors.torch import load_file

    import prunekit
    import prunekit.api  # noqa: F401

    lm = prunekit.load_model(str(work / "dense"))
    lm.model.load_state_dict(load_file(str(weights)), strict=False)
    scores = prunekit.evaluate(lm, datasets, limit=eval_limit)
    return {dataset: scores[dataset]["perplexity"] for dataset in datasets}


def evaluated(cmd: list[str], weights: Path) -> dict:
    """Perplexities from a `--evaluate WEIGHTS` subprocess."""
    done = subprocess.run([*cmd, "--evaluate", str(weights)], check=True, capture_output=True,
                          text=True)  # fmt: skip
    return json.loads(done.stdout.strip().splitlines()[-1])


def timed(cmd: list[str], log: Path) -> float:
    """Wall seconds of a whole subprocess (its output to `log`); a failure stops the run."""
    start = time.perf_counter()
    with log.open("w") as sink:
        done = subprocess.run(cmd, stdout=sink, stderr=subprocess.STDOUT)
    if done.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed; see {log}")
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lc-python", default="/work/lcvenv/bin/python")
    parser.add_argument("--work", type=Path, default=ROOT / "out" / "parity")
    parser.add_argument("--configs", default=",".join(c[0] for c in CONFIGS))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=1, help="timed runs per tool")
    parser.add_argument("--eval-limit", type=int, default=None, help="evaluation windows")
    parser.add_argument("--datasets", default="wikitext2,ptb")
    parser.add_argument("--name", default="parity")
    parser.add_argument("--job", nargs=4, metavar=("TOOL", "METHOD", "PATTERN", "OUT"))
    parser.add_argument("--compute-dtype", default="auto")
    parser.add_argument("--evaluate", type=Path, metavar="WEIGHTS")
    args = parser.parse_args()
    work = args.work
    if args.job:
        tool, method, pattern, out = args.job
        if tool == "prunekit":
            run_prunekit(work, method, pattern, args.threads, Path(out), args.compute_dtype)
        elif tool == "llmcompressor":
            run_llmcompressor(work, method, pattern, args.threads, Path(out))
        else:
            reference_magnitude(work, Path(out))
        return
    datasets = args.datasets.split(",")
    if args.evaluate:
        print(json.dumps(perplexities(work, args.evaluate, args.eval_limit, datasets)))
        return

    work.mkdir(parents=True, exist_ok=True)
    prepare(work)
    me = [__file__, "--work", str(work), "--threads", str(args.threads)]
    rows = []
    wanted = args.configs.split(",")
    reference_times: dict[str, list[float]] = {}  # reference config -> wall times
    reference_ppl: dict[str, dict] = {}  # reference config -> perplexity per dataset
    evaluate = [sys.executable, *me, "--datasets", args.datasets]
    if args.eval_limit:
        evaluate += ["--eval-limit", str(args.eval_limit)]
    for name, method, pattern, dtype in (c for c in CONFIGS if c[0] in wanted):
        ref_tool = "reference" if method == "magnitude" else "llmcompressor"
        ref_python = sys.executable if method == "magnitude" else args.lc_python
        ref_name = name.removesuffix("-bf16")  # the reference always computes in float32
        ours: list[float] = []
        for _ in range(args.repeats):  # back to back, alternating
            out = work / f"prunekit-{name}.safetensors"
            job = [sys.executable, *me, "--compute-dtype", dtype, "--job", "prunekit"]
            ours.append(timed([*job, method, pattern, str(out)], out.with_suffix(".log")))
            print(f"{name}: prunekit {ours[-1]:.1f} s", flush=True)
            if len(reference_times.get(ref_name, [])) < args.repeats:
                out = work / f"reference-{ref_name}.safetensors"
                job = [ref_python, *me, "--job", ref_tool, method, pattern, str(out)]
                seconds = timed(job, out.with_suffix(".log"))
                reference_times.setdefault(ref_name, []).append(seconds)
                print(f"{ref_name}: {ref_tool} {reference_times[ref_name][-1]:.1f} s", flush=True)
        if ref_name not in reference_ppl:
            theirs = work / f"reference-{ref_name}.safetensors"
            reference_ppl[ref_name] = evaluated(evaluate, theirs)
        ours_ppl = evaluated(evaluate, work / f"prunekit-{name}.safetensors")
        scores = agreement(work, name, ref_name)
        for dataset in datasets:
            scores[f"prunekit_{dataset}"] = ours_ppl[dataset]
            scores[f"reference_{dataset}"] = reference_ppl[ref_name][dataset]
        row = {
            "config": name,
            "compute_dtype": dtype,
            "reference": ref_tool,
            "prunekit_wall_s": statistics.median(ours),
            "reference_wall_s": statistics.median(reference_times[ref_name]),
            **scores,
        }
        row["wall_ratio"] = row["prunekit_wall_s"] / row["reference_wall_s"]
        for dataset in datasets:
            row[f"ppl_ratio_{dataset}"] = row[f"prunekit_{dataset}"] / row[f"reference_{dataset}"]
        rows.append(row)
        print(json.dumps(row), flush=True)
    meta = {
        "model": "smollm2-135m (float32)",
        "calibration": f"{NSAMPLES} x {SEQLEN} WikiText-2 calibration windows "
        "(the valid split offline), seed 0, no BOS",
        "evaluation": f"{args.datasets} test, reference protocol, seqlen = prunekit default, "
        + (f"first {args.eval_limit} windows" if args.eval_limit else "whole test set"),
        "threads": args.threads,
        "repeats": args.repeats,
        "command": "python benchmarks/parity.py " + " ".join(sys.argv[1:]),
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    (RESULTS / f"{args.name}.md").write_text(markdown(rows, meta, datasets))
    print(markdown(rows, meta, datasets))


def markdown(rows: list[dict], meta: dict, datasets: list[str]) -> str:
    head = "| config | prunekit compute | compared with | mask agreement | " + " | ".join(
        f"{d} prunekit / ref" for d in datasets
    )
    head += " | wall prunekit / ref (s) | ratio |\n"
    head += "|---" * (6 + len(datasets)) + "|\n"
    lines = []
    for r in rows:
        ppl = " | ".join(f"{r[f'prunekit_{d}']:.3f} / {r[f'reference_{d}']:.3f}" for d in datasets)
        lines.append(
            f"| {r['config']} | {r['compute_dtype']} | {r['reference']} | "
            f"{r['mask_agreement']:.2%} | {ppl} | "
            f"{r['prunekit_wall_s']:.1f} / {r['reference_wall_s']:.1f} | {r['wall_ratio']:.2f} |"
        )
    notes = "\n".join(f"- {k}: {v}" for k, v in meta.items())
    return head + "\n".join(lines) + "\n\n" + notes + "\n"


if __name__ == "__main__":
    main()
