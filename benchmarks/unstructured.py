"""Unstructured and N:M pruning of SmolLM2-135M: perplexity per method x allocation.

WikiText-2 and PTB perplexity at 50/60/70% unstructured and 2:4 for magnitude, Wanda,
SparseGPT, RIA (also with channel permutation at N:M) and DaSS (plus ADMM/ALPS/BESA
when registered), each with uniform and OWL allocation at unstructured sparsities, and
the dense model from the same run. Calibration: WikiText-2 valid, seeded; evaluation:
WikiText-2 / PTB test, non-overlapping windows (first `--eval-limit` of them).

Runs are resumable: finished configurations are kept in the JSON and skipped, so a
subset can be run (`--methods`, `--sparsities`, `--allocations`) and extended later.
The run order puts the configurations behind the papers' claims first.

    python benchmarks/unstructured.py --nsamples 32 --seqlen 512 --eval-limit 8
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

import prunekit
from prunekit.allocations import get_allocation
from prunekit.methods import REGISTRY

RESULTS = Path(__file__).resolve().parent / "results"
CORE = ["magnitude", "wanda", "sparsegpt", "ria", "dass"]
OPTIONAL = ["admm", "alps", "besa"]  # included when registered
LEVELS = ["0.5", "0.6", "0.7", "2:4"]


@dataclass(frozen=True)
class Run:
    method: str
    level: str  # "0.5" ... or an N:M pattern
    allocation: str = "uniform"
    permute: bool = False

    @property
    def key(self) -> str:
        name = self.method + ("+permute" if self.permute else "")
        return f"{name}|{self.level}|{self.allocation}"

    @property
    def label(self) -> str:
        return self.method + ("+perm" if self.permute else "")

    def priority(self) -> tuple:
        """Claims first: OWL at 70%, RIA vs Wanda at 50%, permutation at 2:4."""
        claims = [
            ("wanda", "0.7"),
            ("wanda", "0.5"),
            ("ria", "0.5"),
            ("ria", "2:4"),
        ]
        if (self.method, self.level) in claims and (self.level, self.allocation) != ("0.5", "owl"):
            return (0, claims.index((self.method, self.level)), self.permute, self.allocation)
        tier = {"0.7": 1, "2:4": 2, "0.5": 3, "0.6": 4}[self.level] if self.level in LEVELS else 5
        return (tier, self.allocation != "uniform", self.method, self.permute)


def plan(methods: list[str], levels: list[str], allocations: list[str]) -> list[Run]:
    runs = []
    for method in methods:
        for level in levels:
            nm = ":" in level
            for allocation in allocations:
                if allocation != "uniform" and nm:
                    continue  # N:M fixes every block's sparsity
                runs.append(Run(method, level, allocation))
            if method == "ria" and nm:
                runs.append(Run(method, level, "uniform", permute=True))
    return sorted(runs, key=Run.priority)


def commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True)
        return out.stdout.strip()
    except OSError:
        return "unknown"


def run_one(run: Run, args, allocations: dict) -> dict:
    lm = prunekit.load_model(args.model)
    nm = ":" in run.level
    options = {"permute": True} if run.permute else {}
    record = prunekit.prune(
        lm,
        run.method,
        sparsity=None if nm else float(run.level),
        pattern=run.level if nm else "unstructured",
        calib="wikitext2",
        nsamples=args.nsamples,
        seqlen=args.seqlen,
        seed=args.seed,
        allocation=allocations[run.allocation],
        batch_size=args.batch_size,
        options=options,
    )
    start = time.perf_counter()
    ppl = prunekit.evaluate(lm, args.datasets, args.eval_seqlen, args.eval_limit)
    details = record.details
    return {
        "method": run.method,
        "permute": run.permute,
        "level": run.level,
        "allocation": run.allocation,
        "overall_sparsity": record.overall_sparsity,
        "perplexity": {k: v["perplexity"] for k, v in ppl.items()},
        "eval_windows": {k: v["windows"] for k, v in ppl.items()},
        "prune_time_s": record.wall_time_s,
        "eval_time_s": time.perf_counter() - start,
        "allocation_ratios": details.get("allocation", {}).get("ratios"),
        "permutation": details.get("permutation"),
    }


def dense(args) -> dict:
    lm = prunekit.load_model(args.model)
    ppl = prunekit.evaluate(lm, args.datasets, args.eval_seqlen, args.eval_limit)
    return {k: v["perplexity"] for k, v in ppl.items()}


def _cell(results: dict, run: Run, dataset: str) -> str:
    r = results.get(run.key)
    return f"{r['perplexity'][dataset]:.2f}" if r else "—"


def markdown(payload: dict) -> str:
    p = payload["protocol"]
    results = payload["runs"]
    lines = [
        f"# Unstructured / N:M pruning of {p['model']}",
        "",
        f"Calibration: {p['calib']} valid, {p['nsamples']} x {p['seqlen']} tokens, seed "
        f"{p['seed']}. Evaluation: test split (WikiText-2 is the tokenized wiki.test.tokens), "
        f"non-overlapping windows of {p['eval_seqlen']} tokens with nothing added (the "
        f"reference protocol), first {p['eval_limit'] or 'all'} windows per dataset (a "
        "subset, to fit the CPU budget). Every method at its reference defaults. "
        f"OWL: {p['owl']}. Protocol flags: `{p['command']}` (the run may be split over "
        "`--shard` processes; see docs/unstructured.md for the exact commands).",
        "",
    ]
    rows = sorted({(r["method"], r["permute"], r["allocation"]) for r in results.values()})
    for dataset in p["datasets"]:
        lines += [
            f"## {dataset} perplexity (dense {payload['dense'][dataset]:.2f})",
            "",
            "| method | allocation | " + " | ".join(_level_name(v) for v in p["levels"]) + " |",
            "|---|---|" + "---:|" * len(p["levels"]),
        ]
        for method, permute, allocation in rows:
            cells = [
                _cell(results, Run(method, v, allocation, permute), dataset) for v in p["levels"]
            ]
            label = method + ("+perm" if permute else "")
            lines.append(f"| {label} | {allocation} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += _partial_sparsity(results) + ["## The papers' claims on this model", ""]
    lines += claims(payload) + [""]
    return "\n".join(lines)


def _partial_sparsity(results: dict) -> list[str]:
    """A note for methods whose share of zeros over all prunable linears is not the level
    (e.g. DaSS, which leaves attention dense as its reference does)."""
    notes = {}
    for r in results.values():
        if ":" not in r["level"] and abs(r["overall_sparsity"] - float(r["level"])) > 0.01:
            notes.setdefault(r["method"], {})[r["level"]] = r["overall_sparsity"]
    if not notes:
        return []
    parts = [
        f"{method} " + ", ".join(f"{float(k):.0%} -> {v:.1%}" for k, v in sorted(levels.items()))
        for method, levels in sorted(notes.items())
    ]
    return [
        "Share of zeros over all prunable linears where it differs from the level: "
        + "; ".join(parts)
        + ". Compare those rows by that share.",
        "",
    ]


def _level_name(level: str) -> str:
    return level if ":" in level else f"{float(level):.0%}"


def _ppl(results: dict, run: Run, dataset: str) -> float | None:
    r = results.get(run.key)
    return r["perplexity"][dataset] if r else None


def claims(payload: dict) -> list[str]:
    """One line per claim, stated from the measured numbers (or 'not run')."""
    results, datasets = payload["runs"], payload["protocol"]["datasets"]
    out = []
    for method in CORE:
        for level in ("0.7", "0.6"):
            pairs = [
                (
                    d,
                    _ppl(results, Run(method, level, "uniform"), d),
                    _ppl(results, Run(method, level, "owl"), d),
                )
                for d in datasets
            ]
            if all(u is not None and o is not None for _, u, o in pairs):
                text = ", ".join(f"{d} {u:.2f} -> {o:.2f}" for d, u, o in pairs)
                verdict = _verdict([(d, o < u) for d, u, o in pairs])
                out.append(
                    f"- OWL vs uniform, {method} at {_level_name(level)}: {text}: {verdict}."
                )
    pairs = [
        (d, _ppl(results, Run("ria", "0.5"), d), _ppl(results, Run("wanda", "0.5"), d))
        for d in datasets
    ]
    if all(r is not None and w is not None for _, r, w in pairs):
        text = ", ".join(f"{d} RIA {r:.2f} vs Wanda {w:.2f}" for d, r, w in pairs)
        verdict = _verdict([(d, r <= w) for d, r, w in pairs])
        out.append(f"- RIA <= Wanda at 50%: {text}: {verdict}.")
    perm = results.get(Run("ria", "2:4", "uniform", True).key)
    if perm and perm["permutation"] and perm["permutation"]["retained_permuted_layers"]:
        r = perm["permutation"]["retained_permuted_layers"]
        a = perm["permutation"]["retained_all_layers"]
        verdict = "holds" if r["permuted"] >= r["identity"] else "does NOT hold"
        out.append(
            f"- Channel permutation raises retained RIA importance at 2:4: on the permuted "
            f"layers (o, down) {r['identity']:.4f} -> {r['permuted']:.4f}, over all layers "
            f"{a['identity']:.4f} -> {a['permuted']:.4f}: {verdict}."
        )
        plain = results.get(Run("ria", "2:4").key)
        if plain:
            text = ", ".join(
                f"{d} {plain['perplexity'][d]:.2f} -> {perm['perplexity'][d]:.2f}" for d in datasets
            )
            out.append(f"  Perplexity of RIA 2:4 without -> with permutation: {text}.")
    return out or ["- (no claim's runs finished yet)"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--methods", default=",".join(CORE + OPTIONAL))
    parser.add_argument("--sparsities", default=",".join(LEVELS))
    parser.add_argument("--allocations", default="uniform,owl")
    parser.add_argument("--owl", default="owl:m=5,lam=0.08", help="OWL spec used for 'owl'")
    parser.add_argument("--datasets", default="wikitext2,ptb")
    parser.add_argument("--nsamples", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--eval-seqlen", type=int, default=1024)
    parser.add_argument("--eval-limit", type=int, default=None)
    parser.add_argument("--name", default="unstructured", help="results file stem")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (1 on a busy host)")
    parser.add_argument("--shard", default="0/1", help="i/n: run every n-th config from the i-th")
    parser.add_argument("--dry-run", action="store_true", help="print the plan only")
    parser.add_argument(
        "--permutation-only",
        action="store_true",
        help="only prune with RIA 2:4 + permutation and record retained importance (no eval)",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    shard, shards = (int(x) for x in args.shard.split("/"))
    args.datasets = [d for d in args.datasets.split(",") if d]
    methods = [m for m in args.methods.split(",") if m in REGISTRY]
    levels = [v for v in args.sparsities.split(",") if v]
    runs = plan(methods, levels, [a for a in args.allocations.split(",") if a])[shard::shards]
    if args.permutation_only:
        permutation_check(args)
        return
    if args.dry_run:
        print("\n".join(r.key for r in runs))
        return

    json_path, md_path = RESULTS / f"{args.name}.json", RESULTS / f"{args.name}.md"
    protocol = {
        "model": args.model,
        "calib": "wikitext2",
        "nsamples": args.nsamples,
        "seqlen": args.seqlen,
        "seed": args.seed,
        "eval_seqlen": args.eval_seqlen,
        "eval_limit": args.eval_limit,
        "datasets": args.datasets,
        "levels": LEVELS,
        "owl": args.owl,
        "ppl_protocol": "reference",
        "defaults": "reference",
        "command": "python benchmarks/unstructured.py "
        + " ".join(
            f"--{k.replace('_', '-')} {v}"
            for k, v in (
                ("nsamples", args.nsamples),
                ("seqlen", args.seqlen),
                ("eval_limit", args.eval_limit),
                ("eval_seqlen", args.eval_seqlen),
            )
            if v is not None
        ),
    }
    payload = {"protocol": protocol, "dense": None, "runs": {}, "commit": commit()}
    allocations = {"uniform": "uniform", "owl": get_allocation(args.owl)}  # OWL pass cached

    def sync(new: dict | None = None) -> None:
        """Merge with the file under a lock (shards share it), then rewrite JSON and MD."""
        RESULTS.mkdir(parents=True, exist_ok=True)
        with open(Path(tempfile.gettempdir()) / f"prunekit-bench-{args.name}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if json_path.exists():
                old = json.loads(json_path.read_text())
                if _comparable(old["protocol"]) == _comparable(protocol):
                    payload["dense"] = payload["dense"] or old["dense"]
                    payload["runs"] = {**old["runs"], **payload["runs"]}
            payload["runs"].update(new or {})
            tmp = json_path.with_suffix(f".tmp{os.getpid()}")
            tmp.write_text(json.dumps(payload, indent=2) + "\n")
            os.replace(tmp, json_path)
            if payload["dense"] is not None:
                md_path.write_text(markdown(payload))

    sync()
    if payload["dense"] is None and shard == 0:
        payload["dense"] = dense(args)
        sync()
    todo = [r for r in runs if r.key not in payload["runs"]]
    for run in tqdm(todo, desc="configs", unit="run"):
        sync()
        if run.key in payload["runs"]:  # another shard finished it meanwhile
            continue
        result = run_one(run, args, allocations)
        tqdm.write(f"{run.key}: {result['perplexity']} ({result['prune_time_s']:.0f} s prune)")
        sync({run.key: result})


def _verdict(checks: list[tuple[str, bool]]) -> str:
    """'holds', 'does NOT hold', or where it holds and where not, from (dataset, ok) pairs."""
    good = [d for d, ok in checks if ok]
    if len(good) == len(checks):
        return "holds"
    if not good:
        return "does NOT hold"
    bad = [d for d, ok in checks if not ok]
    return f"holds on {', '.join(good)}, NOT on {', '.join(bad)}"


def permutation_check(args) -> None:
    """RIA 2:4 with channel permutation: share of RIA score kept per layer, both orders."""
    lm = prunekit.load_model(args.model)
    record = prunekit.prune(
        lm, "ria", None, "2:4", calib="wikitext2", nsamples=args.nsamples, seqlen=args.seqlen,
        seed=args.seed, batch_size=args.batch_size, options={"permute": True},
    )  # fmt: skip
    perm = record.details["permutation"]
    by_role: dict[str, list[list[float]]] = {}
    for layer, pair in perm["retained"].items():
        by_role.setdefault(layer.split(".", 1)[1], []).append(pair)
    payload = {
        "model": args.model,
        "calibration": {"dataset": "wikitext2", "nsamples": args.nsamples, "seqlen": args.seqlen},
        "retained_permuted_layers": perm["retained_permuted_layers"],
        "retained_all_layers": perm["retained_all_layers"],
        "by_layer_type": {
            role: {
                "identity": sum(p[0] for p in pairs) / len(pairs),
                "permuted": sum(p[1] for p in pairs) / len(pairs),
                "layers_improved": sum(p[1] > p[0] for p in pairs),
                "layers": len(pairs),
            }
            for role, pairs in by_role.items()
        },
        "prune_time_s": record.wall_time_s,
    }
    out = RESULTS / f"{args.name}_permutation.json"
    out.write_text(json.dumps(payload, indent=2) + "\n")
    print(json.dumps(payload, indent=2))


def _comparable(protocol: dict) -> dict:
    """The protocol fields that make two result sets comparable."""
    return {k: v for k, v in protocol.items() if k not in ("levels", "command", "owl")}


if __name__ == "__main__":
    main()
