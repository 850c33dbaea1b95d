"""Bad input, interruptions and concurrency.

Every bad input, through the CLI (run in-process through `prunekit.cli.main`, the entry
point the `prunekit` script calls) or the Python API, gives exactly one line naming the
problem, exit code 2 (a `PrunekitError` from the API), no traceback, and writes nothing.
Interruptions and races run real `prunekit` processes.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import re
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml
from helpers import ROOT
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import prunekit
from prunekit import cli
from prunekit.options import parse_pairs

STORIES = ["stories260k", "--calib", "tinyshakespeare", "--nsamples", "2", "--seqlen", "32"]
PRUNE = ["prune", *STORIES]


def _bad_files(tmp: Path) -> dict[str, Path]:
    binary = tmp / "binary.bin"
    binary.write_bytes(bytes(range(256)) * 4)
    (tmp / "afile").write_text("x")
    (tmp / "adir").mkdir()
    (tmp / "empty.sqlite").write_bytes(b"")
    foreign = sqlite3.connect(tmp / "foreign.sqlite")
    foreign.execute("CREATE TABLE cells (name TEXT)")
    foreign.commit()
    foreign.close()
    yaml_bin = tmp / "sweep.yaml"
    yaml_bin.write_bytes(b"\xff\xfe\x00models: [x]")
    files = {"binary": binary, "yaml_bin": yaml_bin}
    for name, text in SWEEPS.items():
        files[name] = tmp / f"{name}.yaml"
        files[name].write_text(text)
    for name, text in ALLOCATION_FILES.items():
        files[name] = tmp / f"{name}.json"
        files[name].write_text(text)
    return files


SWEEP = "models: [stories260k]\nsparsities: [0.5]\n"
SWEEPS = {  # bench configs that must fail before any cell runs or any store is created
    "sweep_context": SWEEP
    + "methods: [wanda]\nevaluation: {tasks: [tinyshakespeare], seqlen: 4096}",
    "sweep_calib_context": SWEEP + "methods: [wanda]\ncalibration: {dataset: tinyshakespeare, "
    "nsamples: 2, seqlen: 4096}\nevaluation: {tasks: [tinyshakespeare], seqlen: 128}",
    "sweep_model": "models: [/nonexistent/model]\nmethods: [wanda]\nsparsities: [0.5]",
    "sweep_nothing": SWEEP + "methods: [shortgpt]\npatterns: ['2:4']",
    "sweep_option": SWEEP + "methods: [{name: sparsegpt, options: {blocksize: 1.5}}]",
    "sweep_method": SWEEP + "methods: [nosuch]",
    "sweep_key": SWEEP + "methods: [wanda]\nmodles: [x]",
    "sweep_list": "- models\n- methods",
    "sweep_yaml": "models: [stories260k\nmethods: [wanda]",
    "sweep_sparsity": "models: [stories260k]\nmethods: [wanda]\nsparsities: [1.5]",
    "sweep_tag": SWEEP + "methods: !!python/object/apply:os.system ['echo hi']",
}
ALLOCATION_FILES = {
    "alloc_list": "[0.5, 0.5]",
    "alloc_short": '{"0": 0.5}',
    "alloc_range": '{"0": 1.5, "1": 0.5, "2": 0.5, "3": 0.5, "4": 0.5}',
    "alloc_text": "not json",
}


CLI_CASES: list[tuple[list[str], str]] = [
    # the CLI's own parsing
    (["prnue"], "No such command 'prnue'"),
    (["prune"], "Missing argument"),
    (["prune", "stories260k", "--bogus"], "No such option: --bogus"),
    ([*PRUNE, "--sparsity", "half"], "Invalid value for '--sparsity'"),
    ([*PRUNE, "--nsamples", "abc"], "Invalid value for '--nsamples'"),
    ([*PRUNE, "--seqlen", "1.5"], "Invalid value for '--seqlen'"),
    ([*PRUNE, "--seed", "x"], "Invalid value for '--seed'"),
    ([*PRUNE, "--batch-size", "many"], "Invalid value for '--batch-size'"),
    ([*PRUNE, "--eval-limit", "none"], "Invalid value for '--eval-limit'"),
    (["eval", "stories260k", "--limit", "x"], "Invalid value for '--limit'"),
    (["eval"], "Missing argument"),
    (["bench"], "Missing argument"),
    (["report"], "Missing option '--out'"),
    (["methods", "extra"], "unexpected extra argument"),
    # choices and names
    ([*PRUNE, "--method", "nosuch"], "unknown method 'nosuch'"),
    ([*PRUNE, "--method", "wanda+nosuch"], "unknown update 'nosuch'"),
    ([*PRUNE, "--method", "flap+admm"], "needs a layer-wise mask method"),
    ([*PRUNE, "--update", "nosuch"], "unknown update 'nosuch'"),
    ([*PRUNE, "--update-opt", "rho=1"], "no update requested"),
    ([*PRUNE, "--pattern", "4:4"], "needs 0 < N < M"),
    ([*PRUNE, "--pattern", "2:0"], "needs 0 < N < M"),
    ([*PRUNE, "--pattern", "a:b"], "unknown pattern 'a:b'"),
    ([*PRUNE, "--pattern", "2:4:8"], "unknown pattern '2:4:8'"),
    ([*PRUNE, "--pattern", ""], "unknown pattern ''"),
    ([*PRUNE, "--scope", "column"], "unknown scope 'column'"),
    ([*PRUNE, "--propagate", "both"], "unknown propagation 'both'"),
    ([*PRUNE, "--allocation", "owly"], "unknown allocation 'owly'"),
    ([*PRUNE, "--allocation", "owl:m=x"], "option 'm' needs a float"),
    ([*PRUNE, "--allocation", "owl:q=1"], "unknown option 'q'"),
    ([*PRUNE, "--allocation", "owl:mapping=wild"], "unknown owl mapping 'wild'"),
    ([*PRUNE, "--allocation", "owl", "--pattern", "2:4"], "needs an unstructured pattern"),
    ([*PRUNE, "--allocation", "file:/nonexistent.json"], "allocation file not found"),
    ([*PRUNE, "--calib", "nosuchdata"], "unknown dataset 'nosuchdata'"),
    ([*PRUNE, "--eval", "nosuchtask"], "unknown task 'nosuchtask'"),
    ([*PRUNE, "--ppl-protocol", "eos"], "unknown perplexity protocol 'eos'"),
    (["eval", "stories260k", "--ppl-protocol", "x"], "unknown perplexity protocol 'x'"),
    (["eval", "stories260k", "--tasks", "nosuch"], "unknown task 'nosuch'"),
    (["eval", "stories260k", "--backend", "vllm"], "unknown backend 'vllm'"),
    # numbers out of range
    ([*PRUNE, "--sparsity", "1.0"], "sparsity must be in [0, 1)"),
    ([*PRUNE, "--sparsity", "-0.1"], "sparsity must be in [0, 1)"),
    ([*PRUNE, "--sparsity", "7"], "sparsity must be in [0, 1)"),
    ([*PRUNE, "--sparsity", "0.7", "--pattern", "2:4"], "conflicts with pattern 2:4"),
    ([*PRUNE, "--nsamples", "0"], "nsamples must be at least 1"),
    ([*PRUNE, "--nsamples", "-3"], "nsamples must be at least 1"),
    ([*PRUNE, "--batch-size", "0"], "batch size must be at least 1"),
    ([*PRUNE, "--batch-size", "-1"], "batch size must be at least 1"),
    ([*PRUNE, "--eval-limit", "0"], "--eval-limit must be at least 1"),
    ([*PRUNE, "--eval-limit", "-2"], "--eval-limit must be at least 1"),
    ([*PRUNE, "--device", "tpu9"], "unknown device 'tpu9'"),
    ([*PRUNE, "--device", "cuda:x"], "unknown device 'cuda:x'"),
    ([*PRUNE, "--method", "sparsegpt", "--opt", "blocksize=0"], "'blocksize' must be >= 1"),
    ([*PRUNE, "--method", "sparsegpt", "--opt", "blocksize=-4"], "'blocksize' must be >= 1"),
    ([*PRUNE, "--method", "sparsegpt", "--opt", "percdamp=-1"], "'percdamp' must be > 0"),
    ([*PRUNE, "--method", "sparsegpt", "--opt", "percdamp=0"], "'percdamp' must be > 0"),
    ([*PRUNE, "--method", "sparsegpt", "--opt", "blocksize=1.5"], "'blocksize' needs a int"),
    ([*PRUNE, "--method", "sparsegpt", "--opt", "blocksize"], "must look like key=value"),
    ([*PRUNE, "--method", "sparsegpt", "--opt", "=3"], "must look like key=value"),
    ([*PRUNE, "--method", "wanda", "--opt", "blocksize=12"], "unknown option 'blocksize'"),
    ([*PRUNE, "--method", "ria", "--opt", "permute=maybe"], "'permute' needs a bool"),
    ([*PRUNE, "--method", "flap", "--opt", "selection=best"], "unknown selection 'best'"),
    ([*PRUNE, "--method", "slicegpt", "--opt", "round_to=0"], "round_to must be at least 1"),
    ([*PRUNE, "--method", "slicegpt", "--opt", "budget=x"], "unknown budget 'x'"),
    ([*PRUNE, "--method", "shortened_llama", "--opt", "criterion=g"], "unknown criterion 'g'"),
    ([*PRUNE, "--method", "laco", "--opt", "merge=1"], "merge must be >= 2"),
    ([*PRUNE, "--method", "magnitude_sp", "--opt", "weights=some"], "unknown weights 'some'"),
    ([*PRUNE, "--method", "magnitude", "--pattern", "4:8"], "divisible by 8"),
    ([*PRUNE, "--seqlen", "4096"], "exceeds the model's context of 512"),
    ([*PRUNE, "--seqlen", "1"], "seqlen must be at least 2"),
    ([*PRUNE, "--eval", "tinyshakespeare", "--eval-seqlen", "4096"], "--eval-seqlen 4096"),
    (["eval", "stories260k", "--seqlen", "4096"], "--seqlen 4096 exceeds"),
    (["eval", "stories260k", "--limit", "0"], "--limit must be at least 1"),
    (["eval", "stories260k", "--limit", "-1"], "--limit must be at least 1"),
    (["eval", "stories260k", "--batch-size", "0"], "--batch-size must be at least 1"),
    (["eval", "stories260k", "--tasks", ""], "--tasks names no task"),
    (["eval", "stories260k", "--tasks", ",,"], "--tasks names no task"),
    # models and files
    (["eval", "/nonexistent/model"], "unknown model '/nonexistent/model'"),
    (["eval", "not a model"], "unknown model 'not a model'"),
    ([*PRUNE[:1], "/nonexistent/x.gguf"], "GGUF file not found: /nonexistent/x.gguf"),
    ([*PRUNE, "--calib", "{binary}"], "is not UTF-8 text"),
    ([*PRUNE, "--eval", "{binary}"], "is not UTF-8 text"),
    (["eval", "stories260k", "--tasks", "{binary}"], "is not UTF-8 text"),
    (["bench", "{yaml_bin}", "--dry-run"], "is not UTF-8 text"),
    (["bench", "/nonexistent.yaml"], "sweep config not found"),
    (["report", "--db", "/nonexistent.sqlite", "--out", "r"], "results store not found"),
    # output paths, checked before any model loads
    ([*PRUNE, "--out", "{tmp}/afile"], "exists and is not a folder"),
    ([*PRUNE, "--out", "{tmp}/adir"], "exists; pass --overwrite"),
    ([*PRUNE, "--out", "{tmp}/afile/sub/out"], "{tmp}/afile is not a folder"),
    ([*PRUNE, "--json", "{tmp}/adir"], "--json {tmp}/adir is a folder"),
    ([*PRUNE, "--json", "{tmp}/afile/run.json"], "{tmp}/afile is not a folder"),
    (["eval", "stories260k", "--json", "{tmp}/adir"], "--json {tmp}/adir is a folder"),
    (["report", "--db", "{tmp}/afile", "--out", "r"], "is not a prunekit results store"),
    (["report", "--db", "{tmp}/empty.sqlite", "--out", "r"], "is not a prunekit results store"),
    (["report", "--db", "{tmp}/foreign.sqlite", "--out", "r"], "no cells table"),
    (["report", "--db", "{tmp}/foreign.sqlite", "--out", "{tmp}/afile"], "is a file"),
    # sparsity semantics and combinations that cannot apply
    ([*PRUNE, "--method", "shortgpt", "--opt", "blocks=2", "--sparsity", "0.2"], "not both"),
    ([*PRUNE, "--method", "shortgpt", "--opt", "blocks=-1"], "blocks must be >= 0"),
    ([*PRUNE, "--method", "shortgpt", "--opt", "blocks=5"], "removing 5 of 5 blocks"),
    ([*PRUNE, "--method", "shortgpt", "--allocation", "owl"], "depth methods remove whole"),
    ([*PRUNE, "--method", "slicegpt", "--allocation", "owl"], "one width"),
    ([*PRUNE, "--method", "bonsai", "--allocation", "owl"], "chooses where to prune"),
    ([*PRUNE, "--method", "global_magnitude", "--allocation", "owl"], "its own per-layer"),
    ([*PRUNE, "--method", "flap", "--pattern", "2:4"], "does not support N:M"),
    ([*PRUNE, "--method", "sleb", "--pattern", "2:4"], "does not support N:M"),
    ([*PRUNE, "--method", "flap", "--sparsity", "0.99"], "flap can remove at most 92.5%"),
    ([*PRUNE, "--method", "wanda_sp", "--sparsity", "0.95"], "can remove at most 92.5%"),
    ([*PRUNE, "--method", "magnitude_sp", "--sparsity", "0.99"], "can remove at most"),
    ([*PRUNE, "--method", "llm_pruner", "--sparsity", "0.9"], "protected block(s) stay"),
    ([*PRUNE, "--method", "slicegpt", "--sparsity", "0.9"], "keeps at least round_to=8"),
    (
        [*PRUNE, "--method", "slicegpt", "--opt", "budget=parameters", "--sparsity", "0.9"],
        "slicegpt can remove at most",
    ),
    ([*PRUNE, "--method", "bonsai", "--sparsity", "0.95"], "bonsai can remove at most"),
    ([*PRUNE, "--method", "llm_pruner", "--opt", "protect_first=-2"], "must be >= 0"),
    ([*PRUNE, "--method", "llm_pruner", "--opt", "importance=x"], "unknown importance 'x'"),
    ([*PRUNE, "--method", "angular", "--opt", "tokens=x"], "unknown tokens mode 'x'"),
    ([*PRUNE, "--method", "owl"], "unknown method 'owl'"),
    ([*PRUNE, "--allocation", "file:{alloc_list}"], "allocation file"),
    ([*PRUNE, "--allocation", "file:{alloc_short}"], "allocation file"),
    ([*PRUNE, "--allocation", "file:{alloc_range}"], "allocation file"),
    ([*PRUNE, "--allocation", "file:{alloc_text}"], "allocation file"),
    ([*PRUNE, "--threads", "0"], "--threads must be at least 1"),
    (["eval", "stories260k", "--threads", "-1"], "--threads must be at least 1"),
    (["bench", "{sweep_method}", "--threads", "0"], "--threads must be at least 1"),
    # sweeps: checked whole before the first cell runs or the store is created
    (["bench", "{sweep_context}"], "evaluation.seqlen: 4096 exceeds the context"),
    (["bench", "{sweep_calib_context}"], "calibration.seqlen: 4096 exceeds the context"),
    (["bench", "{sweep_model}"], "unknown model '/nonexistent/model'"),
    (["bench", "{sweep_nothing}"], "no combination of the grid can run"),
    (["bench", "{sweep_option}", "--dry-run"], "'blocksize' needs a int"),
    (["bench", "{sweep_method}"], "unknown method 'nosuch'"),
    (["bench", "{sweep_key}"], "modles"),
    (["bench", "{sweep_list}"], "sweep config"),
    (["bench", "{sweep_yaml}"], "is not valid YAML"),
    (["bench", "{sweep_sparsity}"], "sparsities[0]"),
    (["bench", "{sweep_tag}"], "is not valid YAML"),
    (["bench", "{sweep_method}", "--executor", "slurm"], "unknown executor 'slurm'"),
]


def run_main(args: list[str], capsys) -> tuple[int, str, str]:
    """`prunekit ARGS` in this process: (exit code, stdout, stderr)."""
    old = sys.argv
    sys.argv = ["prunekit", *args]
    try:
        cli.main()
        code = 0
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
    finally:
        sys.argv = old
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize(("args", "message"), CLI_CASES, ids=[" ".join(a) for a, _ in CLI_CASES])
def test_bad_cli_input_is_one_line_exit_2_nothing_written(args, message, tmp_path, capsys):
    files = _bad_files(tmp_path)
    fill = {"tmp": str(tmp_path), **{k: str(v) for k, v in files.items()}}
    args = [a.format(**fill) for a in args]
    message = message.format(**fill)
    before = sorted(p.name for p in tmp_path.iterdir())
    os.chdir(tmp_path)
    try:
        code, _, err = run_main(args, capsys)
    finally:
        os.chdir(ROOT)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1, err
    assert message in lines[0], lines[0]
    assert "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == before


API_CASES = [
    (lambda lm: prunekit.prune(lm, "wanda", sparsity="0.5"), "sparsity must be a number"),
    (lambda lm: prunekit.prune(lm, "wanda", nsamples="8"), "nsamples must be an integer"),
    (lambda lm: prunekit.prune(lm, "wanda", nsamples=True), "nsamples must be an integer"),
    (lambda lm: prunekit.prune(lm, "wanda", allocation=5), "allocation must be an allocation"),
    (lambda lm: prunekit.prune(lm, 7), "method must be a method name"),
    (lambda lm: prunekit.prune(lm, "wanda", pattern=24), "pattern must be"),
    (lambda lm: prunekit.prune(lm, "wanda", batch_size=0), "batch size must be at least 1"),
    (lambda lm: prunekit.prune(lm, "wanda", device="gpu"), "unknown device 'gpu'"),
    (lambda lm: prunekit.prune(lm, "wanda", seed=-1), "seed must be at least 0"),
    (lambda lm: prunekit.prune(lm, "wanda", seed=1.5), "seed must be an integer"),
    (
        lambda lm: prunekit.prune(lm, "sparsegpt", options={"blocksize": [4]}),
        "'blocksize' needs a int",
    ),
    (
        lambda lm: prunekit.prune(lm, "sparsegpt", options={"blocksize": 1.5}),
        "'blocksize' needs a int",
    ),
    (lambda lm: prunekit.prune(lm, "sparsegpt", options="blocksize=4"), "options must be a"),
    (lambda lm: prunekit.prune(lm, "ria", options={"permute": "yes please"}), "needs a bool"),
    (lambda lm: prunekit.prune(lm, "wanda", protocol="x"), "unknown perplexity protocol"),
    (lambda lm: prunekit.evaluate(lm, []), "no task given"),
    (lambda lm: prunekit.evaluate(lm, 5), "tasks must be a task name"),
    (lambda lm: prunekit.evaluate(lm, "nosuch"), "unknown task 'nosuch'"),
    (lambda lm: prunekit.evaluate(lm, "tinyshakespeare", limit=0), "limit must be at least 1"),
    (lambda lm: prunekit.evaluate(lm, "tinyshakespeare", limit="2"), "limit must be an integer"),
    (lambda lm: prunekit.evaluate(lm, "tinyshakespeare", batch_size=0), "batch size must be"),
    (lambda lm: prunekit.evaluate(lm, "tinyshakespeare", seqlen=9999), "exceeds the model's"),
    (lambda lm: prunekit.load_model(123), "model must be a folder"),
    (lambda lm: prunekit.load_model("nosuch/dir/x"), "unknown model"),
    (lambda lm: prunekit.save(lm, "/dev/null/x", None), "/dev/null is not a folder"),
]


@pytest.mark.parametrize(("call", "message"), API_CASES, ids=[m for _, m in API_CASES])
def test_bad_api_input_is_a_prunekit_error(stories, call, message):
    with pytest.raises(prunekit.PrunekitError) as info:
        call(stories)
    text = str(info.value)
    assert message in text and "\n" not in text


def test_evaluate_takes_a_single_task_name(stories):
    one = prunekit.evaluate(stories, "tinyshakespeare", seqlen=64, limit=2)
    assert list(one) == ["tinyshakespeare"]


def test_eval_labels_a_pruned_folder_as_pruned(tmp_path, capsys):
    lm = prunekit.load_model("stories260k")
    record = prunekit.prune(lm, "magnitude", 0.5)
    prunekit.save(lm, tmp_path / "m", record)
    code, out, _ = run_main(["eval", str(tmp_path / "m"), "--tasks", "tinyshakespeare",
                             "--seqlen", "64", "--limit", "1"], capsys)  # fmt: skip
    assert code == 0 and "pruned ppl" in out and "dense ppl" not in out


def test_saved_folder_follows_the_umask(tmp_path):
    lm = prunekit.load_model("stories260k")
    record = prunekit.prune(lm, "magnitude", 0.5)
    old = os.umask(0o022)
    try:
        out = prunekit.save(lm, tmp_path / "m", record)
    finally:
        os.umask(old)
    assert out.stat().st_mode & 0o777 == 0o755
    assert (out / "prunekit.json").stat().st_mode & 0o777 == 0o644


def test_fast_help_version_and_usage_errors():
    """No torch import before a command needs it: each of these is one short process."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    for args, code in ((["--help"], 0), (["--version"], 0), (["prnue"], 2)):
        start = time.perf_counter()
        result = subprocess.run(
            [sys.executable, "-c", "import sys; from prunekit.cli import main; "
             "main(); print('torch' in sys.modules)", *args],
            capture_output=True, text=True, env=env, timeout=60,
        )  # fmt: skip
        assert result.returncode == code, result.stderr
        assert "True" not in result.stdout  # torch was never imported
        assert time.perf_counter() - start < 30


# -- interruptions -------------------------------------------------------------------


def _prunekit(args: list[str], cwd: Path) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
    return subprocess.Popen(
        [sys.executable, "-m", "prunekit.cli", *args],
        cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


SLOW_PRUNE = [
    "prune", "stories260k", "--method", "sparsegpt", "--calib", "tinyshakespeare",
    "--nsamples", "64", "--seqlen", "256", "--eval", "tinyshakespeare", "--out", "out",
]  # fmt: skip


@pytest.mark.parametrize("delay", [0.3, 0.4, 0.5, 3.0, 6.0])
def test_sigint_exits_130_with_one_line_and_no_folder(tmp_path, delay):
    """During imports, loading, pruning or evaluation: one line, exit 130, nothing left."""
    proc = _prunekit(SLOW_PRUNE, tmp_path)
    time.sleep(delay)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    if proc.returncode == 0:  # finished before the signal: nothing to check
        pytest.skip("the run ended before the signal")
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == []
    if (tmp_path / "out").exists():  # the signal came after the save: say so, whole folder
        assert err.strip().splitlines()[-1] == "interrupted; wrote out"
        assert (tmp_path / "out" / "prunekit.json").is_file()
    else:
        assert err.strip().splitlines()[-1] == "interrupted; nothing written"


def test_stale_temporaries_of_a_killed_save_are_removed_by_the_next(tmp_path):
    """A dead process's hidden `.out.tmp-PID-*` folder and lock go on the next save."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".out.tmp-{dead.pid}-abc"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"x" * 100)
    (tmp_path / ".out.lock").write_text(str(dead.pid))
    alive = tmp_path / f".out.tmp-{os.getpid()}-live"
    alive.mkdir()
    lm = prunekit.load_model("stories260k")
    prunekit.save(lm, tmp_path / "out", prunekit.prune(lm, "magnitude", 0.5))
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == sorted(["out", alive.name])


KILL_SWEEP = {
    "models": ["stories260k"],
    "methods": ["magnitude", "wanda"],
    "sparsities": [0.3, 0.6],
    "calibration": {"dataset": "tinyshakespeare", "nsamples": 2, "seqlen": 32},
    "evaluation": {"tasks": ["tinyshakespeare"], "seqlen": 64, "limit": 300},  # ~5 s a cell
    "execution": {"threads": 1, "batch_size": 2},
}


def _children(pid: int) -> list[int]:
    """PIDs whose parent is `pid` (Linux /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def _metrics(db: Path) -> dict[str, dict]:
    from prunekit.bench import ResultStore

    with ResultStore(db, read_only=True) as store:
        return {row.key: row.metrics for row in store.rows()}


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc")
def test_sigkill_of_bench_kills_its_worker_and_a_rerun_resumes_to_the_same_results(tmp_path):
    """SIGKILL the bench parent mid-sweep: its worker dies with it, the next bench removes
    the dead run's job folder, resumes, and ends with the results of an uninterrupted run."""
    config = tmp_path / "sweep.yaml"
    config.write_text(yaml.safe_dump(KILL_SWEEP))
    proc = _prunekit(["bench", str(config), "--db", "killed.sqlite"], tmp_path)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # wait for the second cell's worker
        workers = _children(proc.pid)
        if workers and (tmp_path / "killed.sqlite").exists() and _metrics_count(tmp_path) >= 1:
            break
        time.sleep(0.2)
    assert workers, "no worker started"
    time.sleep(1.0)  # the worker is importing or evaluating, seconds from its end
    proc.kill()
    proc.wait(timeout=30)
    for _ in range(10):  # the worker gets SIGKILL from the kernel when its parent dies
        if not any(Path(f"/proc/{w}").exists() and _is_running(w) for w in workers):
            break
        time.sleep(0.1)
    assert not any(_is_running(w) for w in workers), "worker outlived the killed bench"
    stale = list(Path(tempfile.gettempdir()).glob(f"prunekit-cell-{proc.pid}-*"))
    assert stale, "the killed bench left no job folder (nothing to clean up tested)"
    done_before = _metrics_count(tmp_path)
    assert 1 <= done_before < 5

    resumed = _prunekit(["bench", str(config), "--db", "killed.sqlite"], tmp_path)
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    assert f"{done_before} already done" in out
    assert not any(p.exists() for p in stale)
    whole = _prunekit(["bench", str(config), "--db", "whole.sqlite"], tmp_path)
    _, err = whole.communicate(timeout=300)
    assert whole.returncode == 0, err
    assert _metrics(tmp_path / "killed.sqlite") == _metrics(tmp_path / "whole.sqlite")


def test_sigint_of_bench_says_what_is_stored_and_exits_130(tmp_path):
    config = tmp_path / "sweep.yaml"
    config.write_text(yaml.safe_dump(KILL_SWEEP))
    proc = _prunekit(["bench", str(config), "--db", "killed.sqlite"], tmp_path)
    deadline = time.monotonic() + 120
    while _metrics_count(tmp_path) < 1 and time.monotonic() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    stored = _metrics_count(tmp_path)
    assert proc.returncode == 130, err
    last = err.strip().splitlines()[-1]
    assert re.fullmatch(
        r"interrupted; \d+ cells stored now \(\d+ of 5 done\), rerun to resume", last
    )
    assert f"({stored} of 5 done)" in last
    assert "Traceback" not in err


def _metrics_count(folder: Path) -> int:
    try:
        return len(_metrics(folder / "killed.sqlite"))
    except prunekit.PrunekitError:  # not created yet
        return 0


def _is_running(pid: int) -> bool:
    """Alive and not a zombie."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _save_worker(folder: str, queue) -> None:
    lm = prunekit.load_model("stories260k")
    record = prunekit.prune(lm, "magnitude", 0.5)
    try:
        prunekit.save(lm, folder, record)
        queue.put("ok")
    except prunekit.PrunekitError as err:
        queue.put(f"error: {err}")


def test_two_saves_to_one_folder_exactly_one_succeeds(tmp_path):
    for trial in range(3):
        folder = str(tmp_path / f"out{trial}")
        ctx = multiprocessing.get_context("spawn")
        queue = ctx.Queue()
        procs = [ctx.Process(target=_save_worker, args=(folder, queue)) for _ in range(2)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(120)
        results = sorted(queue.get(timeout=5) for _ in procs)
        assert results[1] == "ok" and results[0].startswith("error:"), results
        assert json.loads((Path(folder) / "prunekit.json").read_text())["method"] == "magnitude"
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert leftovers == []


def _open_store(path: str, queue) -> None:
    from prunekit.bench import ResultStore

    try:
        with ResultStore(Path(path)):
            queue.put("ok")
    except Exception as err:  # noqa: BLE001 - the test reports any failure
        queue.put(repr(err))


def test_two_processes_create_one_results_store(tmp_path):
    for trial in range(5):
        path = str(tmp_path / f"r{trial}.sqlite")
        ctx = multiprocessing.get_context("spawn")
        queue = ctx.Queue()
        procs = [ctx.Process(target=_open_store, args=(path, queue)) for _ in range(2)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(60)
        assert [queue.get(timeout=5) for _ in procs] == ["ok", "ok"]
        assert sqlite3.connect(path).execute("select count(*) from meta").fetchone()[0] >= 1


# -- fuzzing the option parsers ------------------------------------------------------


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.text(alphabet="abm=,:;-_ 0123456789.x\n", max_size=30))
def test_option_pairs_parse_or_fail_in_one_line(text):
    try:
        pairs = parse_pairs(text)
    except prunekit.PrunekitError as err:
        assert "\n" not in str(err)
        return
    assert all(isinstance(k, str) and k and "=" not in k for k in pairs)


@settings(max_examples=150, deadline=None)
@given(st.text(alphabet="owlunifrm:=,.0123456789abx-", max_size=24))
def test_allocation_specs_parse_or_fail_in_one_line(text):
    from prunekit.allocations import get_allocation

    try:
        allocation = get_allocation(text)
    except prunekit.PrunekitError as err:
        assert "\n" not in str(err)
        return
    assert allocation.name in ("uniform", "owl", "file")


@settings(max_examples=150, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(["blocksize", "percdamp", "x"]),
        st.one_of(st.integers(-5, 500), st.floats(-2, 2), st.text(max_size=4), st.booleans(),
                  st.lists(st.integers(), max_size=2)),
        max_size=3,
    )
)  # fmt: skip
def test_typed_method_options_validate_or_fail_in_one_line(options):
    from prunekit.methods.unstructured.sparsegpt import SparseGPTConfig

    try:
        config = SparseGPTConfig.from_options(options)
    except prunekit.PrunekitError as err:
        assert "\n" not in str(err)
        return
    assert isinstance(config.blocksize, int) and config.blocksize >= 1
    assert isinstance(config.percdamp, float) and config.percdamp > 0


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.recursive(
        st.one_of(st.none(), st.booleans(), st.integers(-3, 3), st.floats(-1, 2),
                  st.sampled_from(["stories260k", "wanda", "2:4", "owl", "x", "unstructured"])),
        lambda children: st.lists(children, max_size=3)
        | st.dictionaries(
            st.sampled_from(["models", "methods", "sparsities", "patterns", "allocations",
                             "calibration", "evaluation", "seed", "scope", "bogus"]),
            children, max_size=4),
        max_leaves=12,
    )
)  # fmt: skip
def test_sweep_configs_parse_or_fail_in_one_line(raw):
    from prunekit.bench import parse_config

    try:
        sweep = parse_config(raw)
    except prunekit.PrunekitError as err:
        assert "\n" not in str(err)
        return
    assert all(cell.model for cell in sweep.cells)


def test_progress_in_a_log_is_one_readable_line_per_update(capsys, monkeypatch):
    from prunekit import progress as progress_module

    monkeypatch.setattr(progress_module, "LOG_INTERVAL_S", 0.0)
    for _ in progress_module.progress(range(5), desc="blocks", leave=True, miniters=1):
        pass
    err = capsys.readouterr().err
    assert "\r" not in err
    lines = err.strip().splitlines()
    assert len(lines) >= 2 and lines[-1].startswith("blocks: 100%")


def test_an_interrupt_after_the_save_names_what_was_written(tmp_path, monkeypatch):
    """A Ctrl-C that lands after the folder was renamed into place says it was written;
    an output that predates the run (not replaced) does not count."""
    from prunekit import cli

    old = tmp_path / "old"
    old.mkdir()
    os.utime(old, (cli._STARTED - 60, cli._STARTED - 60))
    new = tmp_path / "new"
    monkeypatch.setattr(cli, "_OUTPUTS", [old, new])
    assert cli._interrupted_message() == "interrupted; nothing written"
    new.mkdir()
    assert cli._interrupted_message() == f"interrupted; wrote {new}"
