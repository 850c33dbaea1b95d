"""The `prunekit` command line: a thin layer over `prunekit.api`.

Only typer and the root's light modules are imported at start-up; torch, transformers
and the methods are imported by the command that needs them, so `--help`, `--version`
and usage errors answer at once.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from prunekit.errors import PrunekitError
from prunekit.settings import VERSION

if TYPE_CHECKING:
    from prunekit.export.record import PruneRecord

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Prune large language models: one API, one CLI, one evaluation protocol.",
)


class Interrupted(Exception):
    """Ctrl-C during a command; the message says what was kept."""


def _show_version(value: bool) -> None:
    if value:
        typer.echo(f"prunekit {VERSION}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_show_version, is_eager=True, help="print the version"
    ),
) -> None:
    """Prune large language models: one API, one CLI, one evaluation protocol."""


def _split(values: str) -> list[str]:
    return [v.strip() for v in values.split(",") if v.strip()]


def _parse_options(pairs: list[str]) -> dict[str, str]:
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise PrunekitError(f"option {pair!r} must look like key=value")
        options[key.strip().replace("-", "_")] = value.strip()
    return options


THREADS_HELP = "torch threads [default: torch's choice; 1 is often faster on a busy machine]"


def _set_threads(threads: int | None) -> None:
    """Apply `--threads` (checked: at least 1) before any work."""
    if threads is None:
        return
    if threads < 1:
        raise PrunekitError(f"--threads must be at least 1, got {threads}")
    import torch

    torch.set_num_threads(threads)


def _check_json_path(path: Path | None) -> None:
    """Fail before any work when `--json PATH` cannot be written."""
    from prunekit.export.folder import check_writable_parent

    if path is None:
        return
    if path.is_dir():
        raise PrunekitError(f"--json {path} is a folder; name a file")
    check_writable_parent(path, "--json")


def _write_json(path: Path | None, payload: dict[str, Any]) -> None:
    if path is not None:
        _OUTPUTS.append(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(payload, indent=2) + "\n")


def _print_ppl_table(
    dense: dict[str, dict], pruned: dict[str, dict] | None, label: str = "dense ppl"
) -> None:
    from prunekit import api

    rows = {name: r for name, r in dense.items() if not api.is_zeroshot_task(name)}
    if not rows:
        return
    header = f"{'dataset':<16}{label:>12}" + (f"{'pruned ppl':>13}{'ratio':>8}" if pruned else "")
    typer.echo(header)
    for name, result in rows.items():
        line = f"{name:<16}{result['perplexity']:>12.3f}"
        if pruned:
            p = pruned[name]["perplexity"]
            line += f"{p:>13.3f}{p / result['perplexity']:>8.2f}"
        typer.echo(line)


def _print_task_table(dense: dict[str, dict], pruned: dict[str, dict] | None) -> None:
    """Zero-shot rows: acc and acc_norm (LAMBADA: acc and perplexity), dense beside pruned."""
    from prunekit import api

    rows = {name: r for name, r in dense.items() if api.is_zeroshot_task(name)}
    if not rows:
        return

    def cells(result: dict) -> str:
        second = result.get("acc_norm", result.get("perplexity", float("nan")))
        return f"{result['acc']:>8.4f}{second:>10.4g}"

    header = f"{'task':<16}{'n':>6}{'acc':>8}{'norm/ppl':>10}"
    if pruned:
        header += f"{'pr. acc':>9}{'norm/ppl':>10}{'retained':>10}"
    typer.echo(header)
    for name, result in rows.items():
        line = f"{name:<16}{result['n']:>6}{cells(result)}"
        if pruned:
            after = pruned[name]
            retained = after["acc"] / result["acc"] if result["acc"] else float("nan")
            line += f" {cells(after)}{retained:>10.3f}"
        typer.echo(line)


def _print_results(
    dense: dict[str, dict], pruned: dict[str, dict] | None = None, label: str = "dense ppl"
) -> None:
    """Perplexity and task tables; `label` heads the first column of values."""
    from prunekit import api
    from prunekit.eval.llmkick import format_llmkick, llmkick_view

    _print_ppl_table(dense, pruned, label)
    _print_task_table(dense, pruned)
    if pruned and any(api.is_zeroshot_task(name) for name in dense):
        typer.echo("\nLLM-Kick view (retained = pruned / dense)")
        typer.echo(format_llmkick(llmkick_view(dense, pruned)))


def _outcome(record: PruneRecord) -> str:
    """What a run did: zeros for mask methods, parameters removed for the others."""
    if record.parameters_after != record.parameters_before:
        removed = 1 - record.parameters_after / record.parameters_before
        return (
            f"parameters {record.parameters_before:,} -> {record.parameters_after:,} "
            f"({removed:.1%} removed)"
        )
    return f"{record.request['pattern']} sparsity {record.overall_sparsity:.4f}"


@app.command()
def prune(
    model: str = typer.Argument(..., help="HF folder, hub id, .gguf file, or alias"),
    dtype: str = typer.Option(
        "auto",
        help="weights in memory and on disk: auto (the checkpoint's), float32, bfloat16, float16",
    ),
    method: str = typer.Option("wanda", help="pruning method (see `prunekit methods`)"),
    sparsity: float | None = typer.Option(
        None,
        help="in [0, 1) [default: 0.5, or 1 - N/M]; mask methods: share of weights zeroed "
        "per linear; width: of decoder-block parameters removed; depth: of blocks removed; "
        "slicegpt: of the hidden width (`prunekit methods` says per method)",
    ),
    pattern: str = typer.Option("unstructured", help="unstructured, or N:M such as 2:4"),
    scope: str | None = typer.Option(
        None, help="unstructured comparison group: row or layer [default: the method's own]"
    ),
    allocation: str = typer.Option(
        "uniform", help="per-block sparsity: uniform, owl[:m=5,lam=0.08], file:PATH.json"
    ),
    calib: str = typer.Option("wikitext2", help="calibration dataset or text file"),
    nsamples: int = typer.Option(64, help="calibration windows"),
    seqlen: int = typer.Option(512, help="tokens per calibration window"),
    seed: int = typer.Option(0, help="seed of every random choice"),
    device: str = typer.Option("cpu", help="compute device for the current block"),
    batch_size: int = typer.Option(8, help="windows per forward pass"),
    compute_dtype: str = typer.Option(
        "auto", help="calibration forwards: auto (the weights' dtype), bfloat16, float16"
    ),
    offload: str = typer.Option(
        "none", help="none, or disk: stream blocks from the checkpoint and write them to --out"
    ),
    max_memory: str | None = typer.Option(
        None, help="memory budget, e.g. 4GiB: streams from disk when the model does not fit"
    ),
    propagate: str = typer.Option(
        "pruned", help="calibrate each block on the pruned or the dense previous outputs"
    ),
    opt: list[str] = typer.Option([], "--opt", help="method option key=value (repeatable)"),
    update: str = typer.Option("none", help="weight update after the mask: none, admm, alps, ..."),
    update_opt: list[str] = typer.Option(
        [], "--update-opt", help="update option key=value (repeatable)"
    ),
    out: Path | None = typer.Option(None, help="write the pruned model here"),
    overwrite: bool = typer.Option(False, help="replace an existing --out folder"),
    weights: str = typer.Option(
        "dense", help="--out weights: dense, or sparse-bitmask (compressed-tensors' format)"
    ),
    eval: str = typer.Option(
        "", "--eval", help="datasets and zero-shot tasks to evaluate, e.g. wikitext2,piqa"
    ),
    eval_seqlen: int | None = typer.Option(
        None, help="evaluation window length [default: min(1024, the model's context)]"
    ),
    eval_limit: int | None = typer.Option(
        None, help="evaluate only the first N windows / task items"
    ),
    ppl_protocol: str = typer.Option(
        "reference",
        help="calibration / perplexity windows: reference (nothing added) or bos (BOS first)",
    ),
    threads: int | None = typer.Option(None, help=THREADS_HELP),
    json_path: Path | None = typer.Option(None, "--json", help="write the run's record here"),
    recipe: Path | None = typer.Option(
        None, help="YAML list of stages (methods and heal) to apply in order; needs --out"
    ),
) -> None:
    """Prune MODEL and optionally evaluate and save it."""
    from prunekit import api
    from prunekit.export.folder import check_output_dir

    if out is not None:
        check_output_dir(out, overwrite)
    if recipe is not None:
        _run_recipe(model, recipe, out, overwrite, device, threads)
        return
    _check_json_path(json_path)
    _set_threads(threads)
    plan = api.plan_prune(
        method,
        sparsity,
        pattern=pattern,
        scope=scope,
        nsamples=nsamples,
        calib=calib,
        options=_parse_options(opt),
        propagate=propagate,
        allocation=allocation,
        update=update,
        update_options=_parse_options(update_opt),
    )
    api.check_protocol(ppl_protocol)
    api.check_weights_format(weights)
    api.check_run(device, batch_size)
    api.check_compute_dtype(plan.method, compute_dtype)
    api.check_dtype(dtype)
    if eval_limit is not None and eval_limit < 1:
        raise PrunekitError(f"--eval-limit must be at least 1, got {eval_limit}")
    tasks = _split(eval)
    for task in tasks:
        api.check_evaluation_name(task)
    budget = api.parse_memory(max_memory) if max_memory is not None else None
    if offload == "none" and budget is not None and api.checkpoint_bytes(model) > budget:
        offload = "disk"
        typer.echo(f"the model does not fit in --max-memory {max_memory}: streaming its blocks")
    device = api.init_distributed(device)
    if not api.is_main():  # every rank ends with the same model: rank 0 speaks for them
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (for the life of the process)
    staging = None
    if offload == "disk":
        api.check_offload(plan, out, tasks)
        staging = out.with_name(f".{out.name}.offload-{os.getpid()}")
    try:
        lm = api.load_model(model, dtype=dtype, device="cpu", offload=offload, staging=staging)
        budgeted = staging is not None and budget is not None
        if budgeted and api.check_offload_budget(lm, nsamples, seqlen, budget):
            typer.echo(
                f"the activations do not fit in --max-memory {max_memory} beside one "
                "block: keeping them in file-backed buffers in the staging folder"
            )
        if tasks:
            eval_seqlen = eval_seqlen or api.default_eval_seqlen(lm)
            api.check_seqlen(lm, eval_seqlen, "--eval-seqlen")
        dense = (
            api.evaluate(lm, tasks, eval_seqlen, eval_limit, protocol=ppl_protocol) if tasks else {}
        )
        record = api.run_plan(
            lm,
            plan,
            seqlen=seqlen,
            seed=seed,
            device=device,
            batch_size=batch_size,
            protocol=ppl_protocol,
            compute_dtype=compute_dtype,
        )
        if tasks:
            pruned = api.evaluate(lm, tasks, eval_seqlen, eval_limit, protocol=ppl_protocol)
            record.evaluation = {"dense": dense, "pruned": pruned}
        typer.echo(
            f"{method} on {model}: {_outcome(record)}, {record.wall_time_s:.1f} s, "
            f"peak RSS {record.peak_rss_mb:.0f} MiB"
        )
        if record.outcome:
            typer.echo(f"  {record.outcome}")
        if tasks:
            _print_results(dense, record.evaluation["pruned"])
        if out is not None:
            _OUTPUTS.append(Path(out))
            api.save(lm, out, record, overwrite, weights)
            typer.echo(f"saved to {out}")
    finally:
        if staging is not None:  # emptied by the save, or left over by a failure
            shutil.rmtree(staging, ignore_errors=True)
    _write_json(json_path, record.as_dict())


@app.command()
def heal(
    model_dir: str = typer.Argument(..., help="pruned model folder (or any HF folder / alias)"),
    out: Path = typer.Option(..., help="write the healed model here"),
    method: str = typer.Option("lora", help="lora, masked_lora, perp or distill"),
    steps: int = typer.Option(200, help="optimizer steps"),
    data: str = typer.Option("wikitext2", help="training dataset or text file"),
    split: str | None = typer.Option(None, help="dataset split [default: its calibration split]"),
    batch_size: int = typer.Option(8, help="windows per step"),
    seqlen: int = typer.Option(512, help="tokens per window"),
    lr: float = typer.Option(1e-4, help="peak learning rate"),
    schedule: str = typer.Option("cosine", help="cosine, linear or constant after warm-up"),
    warmup: int = typer.Option(0, help="warm-up steps"),
    rank: int = typer.Option(8, help="LoRA rank"),
    alpha: float = typer.Option(16.0, help="LoRA alpha"),
    targets: str = typer.Option("", help="LoRA linears by role, e.g. q,v [default: all]"),
    merge: bool = typer.Option(True, help="fold adapters into the weights, zeros kept"),
    perp: str = typer.Option("norms", help="PERP parts: norms, biases, head, embed, lora"),
    teacher: str | None = typer.Option(
        None, help="dense model to distill from [distill: the source in prunekit.json]"
    ),
    top_k: int = typer.Option(64, help="teacher logits kept per token"),
    temperature: float = typer.Option(1.0, help="distillation temperature"),
    hidden_weight: float = typer.Option(0.0, help="weight of the matched block-output MSE"),
    dynamic_every: int = typer.Option(
        0, help="several --data sources: re-weight them by loss gap every N steps"
    ),
    reference_loss: str = typer.Option(
        "", help="per-source reference losses for --dynamic-every [default: the teacher's]"
    ),
    save_every: int = typer.Option(50, help="checkpoint every N steps (resumed on rerun)"),
    seed: int = typer.Option(0, help="seed of the windows and adapter initialisation"),
    overwrite: bool = typer.Option(False, help="replace an existing --out folder"),
    threads: int | None = typer.Option(None, help=THREADS_HELP),
    json_path: Path | None = typer.Option(None, "--json", help="write the heal record here"),
) -> None:
    """Heal a pruned model by LoRA, masked LoRA, PERP or distillation, keeping its zeros."""
    from prunekit.engine.training import HealInterrupted
    from prunekit.export.folder import check_output_dir
    from prunekit.recovery import heal as run_heal
    from prunekit.recovery import make_config

    check_output_dir(out, overwrite)
    _check_json_path(json_path)
    _set_threads(threads)
    config = make_config(
        method=method,
        steps=steps,
        data=data,
        split=split,
        batch_size=batch_size,
        seqlen=seqlen,
        lr=lr,
        schedule=schedule,
        warmup=warmup,
        rank=rank,
        alpha=alpha,
        targets=_split(targets) or None,
        merge=merge,
        perp=_split(perp),
        teacher=teacher,
        top_k=top_k,
        temperature=temperature,
        hidden_weight=hidden_weight,
        dynamic_every=dynamic_every,
        reference_loss=_floats(reference_loss, "--reference-loss"),
        save_every=save_every,
        seed=seed,
    )
    _OUTPUTS.append(Path(out))
    try:
        record = run_heal(model_dir, out, config, overwrite)
    except HealInterrupted as err:
        raise Interrupted(str(err)) from err
    stage = record["healing"][-1]
    typer.echo(
        f"heal {method} on {model_dir}: loss {stage['first_loss']} -> {stage['final_loss']}, "
        f"{stage['trainable_parameters']:,} trainable parameters, sparsity "
        f"{stage['sparsity_before']:.4f} -> {stage['sparsity_after']}, "
        f"{stage['wall_time_s']:.1f} s, peak RSS {stage['peak_rss_mb']:.0f} MiB"
    )
    typer.echo(f"saved to {out}")
    _write_json(json_path, stage)


@app.command()
def speed(
    model: str = typer.Argument(..., help="model or pruned folder to time"),
    baseline: str | None = typer.Option(None, help="model to time beside it (e.g. the dense)"),
    prefill: int = typer.Option(512, help="prompt tokens"),
    decode: int = typer.Option(64, help="greedy decode steps after the prompt"),
    batch: str = typer.Option("1", help="batch sizes, e.g. 1,8"),
    repeats: int = typer.Option(5, help="interleaved repeats (medians and min/max)"),
    engine: str = typer.Option("torch", help="torch, or llamacpp (exports GGUF, batch 1)"),
    quant: str = typer.Option("f16", help="llamacpp: GGUF weights (f32, f16, bf16, q8_0)"),
    threads: int | None = typer.Option(None, help=THREADS_HELP),
    json_path: Path | None = typer.Option(None, "--json", help="write the figures here"),
) -> None:
    """Prefill and decode speed on CPU, interleaved with a baseline, medians of repeats."""
    from prunekit import api
    from prunekit.eval.speed import prompt_ids, sparse_matmul, speed_table

    batches = _positive_ints(batch, "--batch")
    if prefill < 1 or decode < 1 or repeats < 1:
        raise PrunekitError("--prefill, --decode and --repeats must be at least 1")
    if engine not in ("torch", "llamacpp"):
        raise PrunekitError(f"unknown --engine {engine!r}; valid: torch, llamacpp")
    if engine == "llamacpp" and batches != [1]:
        raise PrunekitError("--engine llamacpp times batch 1 only; valid: --batch 1")
    _check_json_path(json_path)
    _set_threads(threads)
    models = {"model": api.load_model(model)}
    if baseline is not None:
        models["baseline"] = api.load_model(baseline)
    api.check_seqlen(models["model"], prefill + decode, "--prefill + --decode")
    prompt = prompt_ids(models["model"].tokenizer, prefill)
    if engine == "llamacpp":
        table = _llamacpp_speed(models, prompt, decode, repeats, quant)
    else:
        table = speed_table(
            {k: v.model for k, v in models.items()}, prompt, decode, batches, repeats
        )
    payload = {
        "engine": engine,
        "model": model,
        "baseline": baseline,
        "prefill": prefill,
        "decode": decode,
        "repeats": repeats,
        "threads": torch_threads(),
        "speed": table,
    }
    for name in models:
        for key, row in table[name].items():
            typer.echo(
                f"{name:8s} {key:9s} prefill {row['prefill_tok_s']['median']:9.1f} tok/s  "
                f"decode {row['decode_tok_s']['median']:8.1f} tok/s "
                f"({row['decode_ms_per_token']['median']:.1f} ms/token)"
            )
    if baseline is not None:
        for key in table["model"]:
            ratio = (
                table["model"][key]["decode_tok_s"]["median"]
                / table["baseline"][key]["decode_tok_s"]["median"]
            )
            typer.echo(f"decode speed-up over the baseline at {key}: {ratio:.2f}x")
    lm = models["model"]
    zeros = [
        (m, float((m.weight == 0).float().mean()))
        for b in lm.adapter.blocks
        for m in lm.adapter.linears(b).values()
        if hasattr(m, "weight")
    ]
    sparsity = sum(s for _, s in zeros) / max(len(zeros), 1)
    if sparsity > 0.05:
        widest = max(zeros, key=lambda z: z[0].weight.numel())[0].weight
        payload["sparse_matmul"] = {
            f"{tokens} tokens": sparse_matmul(widest, tokens, repeats) for tokens in (1, prefill)
        }
        for key, row in payload["sparse_matmul"].items():
            typer.echo(
                f"CSR matmul at {sparsity:.0%} sparsity, {key}: {row['csr_over_dense']:.2f}x "
                "the dense time" + (" (slower than dense)" if row["csr_over_dense"] > 1 else "")
            )
    _write_json(json_path, payload)


def _llamacpp_speed(models: dict, prompt, decode: int, repeats: int, quant: str) -> dict:
    """Export every model to a temporary GGUF and time it in llama.cpp."""
    import tempfile

    from prunekit.eval.speed import llamacpp_table
    from prunekit.export.gguf import check_exportable, export_gguf

    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        raise PrunekitError(
            "--engine llamacpp needs llama-cpp-python: pip install llama-cpp-python"
        ) from None
    for lm in models.values():
        check_exportable(lm, quant)
    with tempfile.TemporaryDirectory() as tmp:
        paths = {
            name: str(export_gguf(lm, Path(tmp) / f"{name}.gguf", quant))
            for name, lm in models.items()
        }
        return llamacpp_table(paths, prompt[0].tolist(), decode, repeats, torch_threads())


def _floats(text: str, flag: str) -> list[float] | None:
    if not text:
        return None
    try:
        return [float(v) for v in _split(text)]
    except ValueError:
        raise PrunekitError(f"{flag} must be numbers such as 3.1,2.8; got {text!r}") from None


def _positive_ints(text: str, flag: str) -> list[int]:
    try:
        values = [int(v) for v in _split(text)]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise PrunekitError(f"{flag} must be positive integers such as 1,8; got {text!r}")
    return values


def torch_threads() -> int:
    import torch

    return torch.get_num_threads()


@app.command()
def export(
    model: str = typer.Argument(..., help="pruned folder (or any Llama model) to export"),
    gguf: Path = typer.Option(..., help="write this .gguf file (llama.cpp)"),
    quant: str = typer.Option("f16", help="weights: f32, f16, bf16 or q8_0"),
    overwrite: bool = typer.Option(False, help="replace an existing file"),
) -> None:
    """Export a depth-pruned or uniform-width Llama model as GGUF for llama.cpp."""
    from prunekit import api
    from prunekit.export.gguf import QUANTS, export_gguf

    if quant not in QUANTS:
        raise PrunekitError(f"unknown --quant {quant!r}; valid: {', '.join(QUANTS)}")
    if gguf.exists() and not overwrite:
        raise PrunekitError(f"{gguf} exists; pass --overwrite to replace it")
    if not gguf.parent.is_dir():
        raise PrunekitError(f"folder {gguf.parent} does not exist")
    path = export_gguf(api.load_model(model), gguf, quant)
    typer.echo(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB, {quant})")


@app.command("eval")
def evaluate(
    model: str = typer.Argument(..., help="HF folder, hub id, .gguf file, alias, or pruned dir"),
    dtype: str = typer.Option(
        "auto", help="weights' dtype: auto (the checkpoint's), float32, bfloat16, float16"
    ),
    tasks: str = typer.Option(
        "wikitext2", help="comma-separated perplexity datasets and zero-shot tasks"
    ),
    seqlen: int | None = typer.Option(
        None, help="evaluation window length [default: min(1024, the model's context)]"
    ),
    limit: int | None = typer.Option(None, help="evaluate only the first N windows / task items"),
    batch_size: int | None = typer.Option(
        None, help="windows (default 1) or task items (default 16) per forward pass"
    ),
    backend: str = typer.Option("prunekit", help="zero-shot scorer: prunekit or lm-eval"),
    ppl_protocol: str = typer.Option(
        "reference", help="perplexity windows: reference (nothing added) or bos (BOS first)"
    ),
    threads: int | None = typer.Option(None, help=THREADS_HELP),
    json_path: Path | None = typer.Option(None, "--json", help="write results here"),
) -> None:
    """Perplexity and zero-shot accuracy of MODEL on each dataset and task."""
    from prunekit import api
    from prunekit.eval.zeroshot import BACKENDS

    _check_json_path(json_path)
    _set_threads(threads)
    if backend not in BACKENDS:
        raise PrunekitError(f"unknown backend {backend!r}; valid: {', '.join(BACKENDS)}")
    api.check_protocol(ppl_protocol)
    names = _split(tasks)
    if not names:
        raise PrunekitError("--tasks names no task; e.g. --tasks wikitext2,piqa")
    for name in names:
        api.check_evaluation_name(name)
    if limit is not None and limit < 1:
        raise PrunekitError(f"--limit must be at least 1, got {limit}")
    if batch_size is not None and batch_size < 1:
        raise PrunekitError(f"--batch-size must be at least 1, got {batch_size}")
    api.check_dtype(dtype)
    lm = api.load_model(model, dtype=dtype)
    seqlen = seqlen or api.default_eval_seqlen(lm)
    api.check_seqlen(lm, seqlen, "--seqlen")
    results = api.evaluate(lm, names, seqlen, limit, batch_size, backend, ppl_protocol)
    pruned = (Path(model).expanduser() / "prunekit.json").is_file()
    _print_results(results, label="pruned ppl" if pruned else "dense ppl")
    _write_json(json_path, {"model": model, "results": results})


@app.command()
def bench(
    config: Path = typer.Argument(..., help="sweep YAML (see docs/bench.md)"),
    db: Path = typer.Option(Path("results.sqlite"), help="results store (SQLite) to fill"),
    executor: str = typer.Option("local", help="local (process per cell), inline, or ray"),
    ray_address: str | None = typer.Option(None, help="Ray cluster address (default: local)"),
    ray_cpus: int | None = typer.Option(None, help="CPUs of a local Ray instance"),
    dry_run: bool = typer.Option(False, help="list the cells and whether they are done"),
    threads: int | None = typer.Option(
        None, help="torch threads per cell [default: the config's execution.threads]"
    ),
) -> None:
    """Run the grid of CONFIG; cells already in the store are not run again."""
    from prunekit.bench import ResultStore, load_config, make_executor, run_sweep
    from prunekit.bench.sweep import check_cells

    if threads is not None and threads < 1:
        raise PrunekitError(f"--threads must be at least 1, got {threads}")
    runner = None if dry_run else make_executor(executor, ray_address, ray_cpus)
    sweep = load_config(config)
    if threads is not None:
        sweep.execution.threads = threads
    for line in sweep.impossible:
        typer.echo(f"not a cell (skipped): {line}")
    check_cells(sweep)
    with ResultStore(db) as store:
        if dry_run:
            done = store.done_keys()
            for cell in {c.key: c for c in sweep.cells}.values():
                state = "done" if cell.key in done else "todo"
                typer.echo(f"{state}  {cell.key[:12]}  {cell.label}")
            return
        before = len(store.done_keys())
        try:
            summary = run_sweep(sweep, store, runner)
        except KeyboardInterrupt:
            stored = len(store.done_keys()) - before
            total = len({c.key for c in sweep.cells})
            raise Interrupted(
                f"interrupted; {stored} cells stored now ({before + stored} of {total} done), "
                "rerun to resume"
            ) from None
    typer.echo(
        f"{summary.total} cells: {summary.skipped} already done, {summary.ran} run now, "
        f"{len(summary.failed)} failed; results in {db}"
    )
    for line in summary.failed:
        typer.echo(f"failed: {line}", err=True)
    if summary.failed:
        raise PrunekitError(
            f"{len(summary.failed)} of {summary.ran} cells failed; the next bench reruns them"
        )


@app.command()
def report(
    db: Path = typer.Option(Path("results.sqlite"), help="results store written by bench"),
    out: Path = typer.Option(..., help="folder for report.md, report.html and the PNGs"),
    title: str = typer.Option("prunekit sweep report", help="report title"),
    config: Path | None = typer.Option(None, help="the sweep's YAML: list its cells not run"),
) -> None:
    """Render a results store as Markdown and a self-contained HTML page with plots."""
    from prunekit.bench import load_config
    from prunekit.bench.report import write_report

    if not db.is_file():
        raise PrunekitError(f"results store not found: {db}")
    if out.exists() and not out.is_dir():
        raise PrunekitError(f"report --out {out} is a file; name a folder")
    sweep = load_config(config) if config is not None else None
    paths = write_report(db, out, title, sweep)
    typer.echo("wrote " + ", ".join(str(p) for p in paths))


@app.command()
def methods() -> None:
    """List registered methods and weight updates with one line each and their options."""
    from prunekit.methods import REGISTRY
    from prunekit.methods.unstructured.updates import UPDATES

    for name in sorted(REGISTRY):
        cls = REGISTRY[name]
        typer.echo(f"{name:<18}[{cls.kind}] {cls.summary}")
        typer.echo(f"{'':<20}--sparsity: {cls.sparsity_meaning}")
        for field in dataclasses.fields(cls.Config):
            typer.echo(f"{'':<20}--opt {field.name}={field.default!r}")
    typer.echo("\nweight updates (--update NAME, after any unstructured/N:M method):")
    for name in sorted(UPDATES):
        cls = UPDATES[name]
        typer.echo(f"{name:<18}{cls.summary}")
        for field in dataclasses.fields(cls.Config):
            typer.echo(f"{'':<20}--update-opt {field.name}={field.default!r}")


@app.command()
def allocations() -> None:
    """List per-block sparsity allocations (`--allocation NAME[:key=value,...]`)."""
    from prunekit.allocations import ALLOCATIONS

    for name in sorted(ALLOCATIONS):
        cls = ALLOCATIONS[name]
        options = ",".join(f"{f.name}={f.default}" for f in dataclasses.fields(cls.Config))
        typer.echo(f"{name:<18}{cls.summary}" + (f"  [{name}:{options}]" if options else ""))


def _run_recipe(
    model: str, recipe: Path, out: Path | None, overwrite: bool, device: str, threads: int | None
) -> None:
    from prunekit.recipes import load_recipe, run_recipe

    if out is None:
        raise PrunekitError("--recipe needs --out (each finished stage is kept for resuming)")
    _set_threads(threads)
    _OUTPUTS.append(Path(out))
    record = run_recipe(model, load_recipe(recipe), out, overwrite, device)
    for i, stage in enumerate(record["stages"], 1):
        typer.echo(
            f"stage {i} {stage['kind']} {stage['method']}: {stage['parameters_after']:,} "
            f"parameters, sparsity {stage['sparsity_after']:.4f}, {stage['seconds']:.1f} s"
        )
    typer.echo(f"saved to {out}")


def _is_click_error(err: BaseException) -> bool:
    """A usage error from click or from the click that typer bundles (duck-typed)."""
    return hasattr(err, "exit_code") and hasattr(err, "format_message")


_interrupted = False  # set by the SIGINT handler: Ctrl-C arrived during this run
_STARTED = time.time()
_OUTPUTS: list[Path] = []  # what this run was about to write (checked when interrupted)


def _interrupted_message() -> str:
    """What an interrupted run kept: the outputs it finished writing before the signal
    (an output counts once it exists and was written by this run), or nothing."""
    done = [str(p) for p in _OUTPUTS if p.exists() and p.stat().st_mtime >= _STARTED]
    return f"interrupted; wrote {', '.join(done)}" if done else "interrupted; nothing written"


def _on_sigint(signum: int, frame: object) -> None:
    """Remember the interrupt, then raise it as Python does. Libraries may turn it into
    another error on its way up (transformers' lazy imports raise an import error)."""
    global _interrupted
    _interrupted = True
    raise KeyboardInterrupt


def _exit_interrupted(message: str) -> None:
    """Say `message` and exit 130 at once. Everything to clean up (temporary folders,
    locks, the store) was released while the interrupt unwound; exiting through the
    interpreter's shutdown could still end the process by the signal itself when the
    interrupt arrived inside an import."""
    typer.echo(message, err=True)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(130)


def main() -> None:
    """Entry point: user errors become one line on stderr and exit code 2; Ctrl-C says
    what was kept and exits 130."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, _on_sigint)
    try:
        code = app(standalone_mode=False)
    except PrunekitError as err:
        typer.echo(f"error: {err}", err=True)
        sys.exit(2)
    except Interrupted as err:
        _exit_interrupted(str(err))
    except (typer.Abort, KeyboardInterrupt):
        _exit_interrupted(_interrupted_message())
    except Exception as err:
        if _interrupted:
            _exit_interrupted(_interrupted_message())
        if type(err).__name__ == "NoArgsIsHelpError":
            typer.echo(err.ctx.get_help())
            sys.exit(0)
        if _is_click_error(err):
            message = " ".join(err.format_message().split())
            typer.echo(f"error: {message}", err=True)
            sys.exit(2)
        raise
    if code == 130 or _interrupted:
        _exit_interrupted(_interrupted_message())
    if isinstance(code, int) and code:
        sys.exit(code)


if __name__ == "__main__":
    main()
