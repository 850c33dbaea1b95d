"""Several processes (torchrun, gloo on CPU): each rank calibrates on its share of the
windows, statistics are merged across ranks, every rank ends with the same model and
rank 0 writes it, equal to the one-process result."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from helpers import ROOT
from safetensors.torch import load_file

import prunekit
import prunekit.api
from prunekit.engine import distributed
from prunekit.errors import PrunekitError

ARGS = ["stories260k", "--calib", "tinyshakespeare", "--nsamples", "8", "--seqlen", "64",
        "--threads", "1"]  # fmt: skip


def _run(cmd: list[str], cwd) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def _both(tmp_path, method: str, *extra: str):
    one = _run([sys.executable, "-m", "prunekit", "prune", *ARGS, "--method", method, *extra,
                "--out", "one"], tmp_path)  # fmt: skip
    assert one.returncode == 0, one.stderr
    two = _run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                "--nproc-per-node", "2", "-m", "prunekit", "prune", *ARGS, "--method", method,
                *extra, "--out", "two"], tmp_path)  # fmt: skip
    assert two.returncode == 0, two.stderr
    assert two.stdout.count("saved to two") == 1  # rank 0 speaks and writes
    return load_file(str(tmp_path / "one" / "model.safetensors")), load_file(
        str(tmp_path / "two" / "model.safetensors")
    )


@pytest.mark.parametrize("method", ["wanda", "flap"])
def test_two_processes_give_the_one_process_model(tmp_path, method):
    """Wanda (input norms, summed over ranks) and FLAP (means and variances merged by
    Chan's formula): the same masks / kept structures, weights equal to float rounding."""
    one, two = _both(tmp_path, method)
    assert one.keys() == two.keys()
    for name, tensor in one.items():
        assert tensor.shape == two[name].shape, name
        assert torch.equal(tensor == 0, two[name] == 0), name
        torch.testing.assert_close(two[name], tensor, rtol=1e-5, atol=1e-6)


def test_two_processes_sparsegpt_within_float_tolerance(tmp_path):
    """XᵀX summed in another order: masks agree on all but near-ties, weights closely."""
    one, two = _both(tmp_path, "sparsegpt")
    same = sum(int(((a == 0) == (two[k] == 0)).sum()) for k, a in one.items())
    total = sum(a.numel() for a in one.values())
    assert same / total >= 0.999
    for name, tensor in one.items():
        both = (tensor != 0) & (two[name] != 0)
        assert torch.allclose(tensor[both], two[name][both], rtol=1e-3, atol=1e-4), name


def test_methods_on_one_process_and_too_few_windows_are_refused(monkeypatch):
    monkeypatch.setattr(distributed, "world", lambda: (0, 2))
    monkeypatch.setattr(prunekit.api, "world", lambda: (0, 2))
    lm = prunekit.load_model("stories260k")
    with pytest.raises(PrunekitError, match="runs on one process; with 2 processes use one of"):
        prunekit.prune(lm, "sleb", calib="tinyshakespeare", nsamples=8, seqlen=64)
    with pytest.raises(PrunekitError, match="2 processes need at least 2 calibration windows"):
        prunekit.prune(lm, "wanda", calib="tinyshakespeare", nsamples=1, seqlen=64)


DIE = """
import os, sys
from prunekit.engine import collectors
from prunekit import cli

calls = {"n": 0}
real = collectors.all_reduce_sum


def dying(tensor):
    calls["n"] += 1
    if os.environ.get("RANK") == "1" and calls["n"] == 3:
        os._exit(1)  # this rank dies mid-run
    return real(tensor)


collectors.all_reduce_sum = dying
sys.argv = ["prunekit", *sys.argv[1:]]
cli.main()
"""


def test_a_rank_dying_mid_run_stops_the_job_and_writes_nothing(tmp_path):
    (tmp_path / "die.py").write_text(DIE)
    done = _run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                 "--nproc-per-node", "2", "die.py", "prune", *ARGS, "--method", "wanda",
                 "--out", "out"], tmp_path)  # fmt: skip
    assert done.returncode != 0
    said = done.stderr + done.stdout
    assert "a process of the distributed job ended" in said or "exitcode  : 1" in said, said[-2000:]
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_solves_are_shared_out_by_cost():
    owner = distributed.assign_by_cost({"a": 9.0, "b": 5.0, "c": 4.0, "d": 1.0}, 2)
    assert owner == {"a": 0, "b": 1, "c": 1, "d": 0}  # loads 10 and 9
    assert distributed.assign_by_cost({"x": 1.0}, 3) == {"x": 0}


def _facts(tmp_path) -> list[dict]:
    import json

    return [json.loads((tmp_path / d / "prunekit.json").read_text()) for d in ("one", "two")]


def test_two_processes_share_the_update_solves(tmp_path):
    """Wanda's masks with the ADMM update: each linear's solve runs on one rank and is
    broadcast; same masks as one process, weights to float tolerance, and the record
    counts every linear's update."""
    one, two = _both(tmp_path, "wanda", "--update", "admm")
    for name, tensor in one.items():
        assert torch.equal(tensor == 0, two[name] == 0), name
        torch.testing.assert_close(two[name], tensor, rtol=1e-3, atol=1e-4)
    layers = [f["details"]["update"]["layers"] for f in _facts(tmp_path)]
    assert layers == [5 * 7, 5 * 7]


def test_two_processes_gather_the_alps_facts(tmp_path):
    """ALPS's per-linear iteration counts come back from every rank (its support search
    is sensitive to the summation order of XᵀX, so masks are not compared here)."""
    _both(tmp_path, "alps", "--opt", "max_iterations=6", "--opt", "min_iterations=3")
    layers = [f["details"]["alps"]["layers"] for f in _facts(tmp_path)]
    assert layers == [5 * 7, 5 * 7]
