"""Size on disk of SmolLM2-135M pruned by magnitude at 50%, 70% and 2:4, saved dense and
in the sparse-bitmask format, in float32 and bfloat16; and that the sparse folder reloads
to identical weights.

    python benchmarks/sparse_checkpoint.py
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

import prunekit

RESULTS = Path(__file__).resolve().parent / "results"
SETTINGS = [("50%", {"sparsity": 0.5}), ("70%", {"sparsity": 0.7}), ("2:4", {"pattern": "2:4"})]


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--name", default="sparse_checkpoint_smollm2")
    args = parser.parse_args()
    rows = []
    for dtype in ("float32", "bfloat16"):
        for label, options in SETTINGS:
            lm = prunekit.load_model(args.model, dtype=dtype)
            record = prunekit.prune(lm, "magnitude", **options)
            with tempfile.TemporaryDirectory() as tmp:
                dense = prunekit.save(lm, Path(tmp) / "dense", record)
                sparse = prunekit.save(lm, Path(tmp) / "sparse", record, weights="sparse-bitmask")
                reloaded = prunekit.load_pruned(sparse)
                original = dict(lm.model.named_parameters())
                identical = all(
                    torch.equal(p, original[n]) for n, p in reloaded.model.named_parameters()
                )
                row = {
                    "dtype": dtype,
                    "pruning": label,
                    "dense_mb": folder_bytes(dense) / 2**20,
                    "sparse_mb": folder_bytes(sparse) / 2**20,
                    "identical_after_reload": identical,
                }
            row["ratio"] = row["sparse_mb"] / row["dense_mb"]
            rows.append(row)
            print(json.dumps(row), flush=True)
    lines = [
        f"Model {args.model}, magnitude pruning of every decoder linear; safetensors bytes "
        "of the folder (embeddings and norms stay dense).",
        "",
        "| dtype | pruning | dense MiB | sparse-bitmask MiB | ratio | identical after reload |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['dtype']} | {r['pruning']} | {r['dense_mb']:.1f} | {r['sparse_mb']:.1f} "
            f"| {r['ratio']:.2f} | {'yes' if r['identical_after_reload'] else 'NO'} |"
        )
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(rows, indent=2) + "\n")
    (RESULTS / f"{args.name}.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
