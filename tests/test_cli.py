"""The CLI: a full run writes a loadable folder; bad input is one line, exit 2, nothing written."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import run_cli
from transformers import AutoModelForCausalLM

BASE = ["prune", "stories260k", "--calib", "tinyshakespeare", "--nsamples", "4", "--seqlen", "64"]


def test_prune_writes_a_loadable_folder_and_json(tmp_path):
    result = run_cli(
        *BASE,
        "--method",
        "wanda",
        "--pattern",
        "2:4",
        "--eval",
        "tinystories",
        "--eval-seqlen",
        "128",
        "--out",
        "pruned",
        "--json",
        "run.json",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert "tinystories" in result.stdout
    record = json.loads((tmp_path / "run.json").read_text())
    saved = json.loads((tmp_path / "pruned" / "prunekit.json").read_text())
    assert record["layer_sparsity"] == saved["layer_sparsity"]
    ppl = saved["evaluation"]
    assert ppl["pruned"]["tinystories"]["perplexity"] > ppl["dense"]["tinystories"]["perplexity"]
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned")
    w = model.model.layers[0].mlp.down_proj.weight
    assert ((w != 0).reshape(w.shape[0], -1, 4).sum(2) == 2).all()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--method", "nosuch"], "unknown method 'nosuch'; valid:"),
        (["--pattern", "4:4"], "needs 0 < N < M"),
        (["--pattern", "banana"], "unknown pattern 'banana'"),
        (["--sparsity", "1.0"], "sparsity must be in [0, 1)"),
        (["--sparsity", "-0.1"], "sparsity must be in [0, 1)"),
        (["--sparsity", "0.7", "--pattern", "2:4"], "conflicts with pattern 2:4"),
        (["--seqlen", "4096"], "exceeds the model's context of 512"),
        (["--calib", "nosuchdata"], "unknown dataset 'nosuchdata'; valid:"),
        (["--opt", "blocksize=12"], "unknown option 'blocksize'"),
        (["--scope", "column"], "unknown scope 'column'"),
    ],
)
def test_bad_input_is_one_clear_line(tmp_path, args, message):
    result = run_cli(*BASE, *args, "--out", "never", cwd=tmp_path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert message in lines[0]
    assert list(tmp_path.iterdir()) == []


def test_unknown_model_is_one_clear_line(tmp_path):
    result = run_cli("prune", "no/such/model/here", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().startswith("error: unknown model")


def test_unsupported_architecture_names_supported_ones(tmp_path):
    folder = tmp_path / "bert"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "bert"}))
    result = run_cli("eval", str(folder), cwd=tmp_path)
    assert result.returncode == 2
    assert "unsupported architecture 'bert'; supported: llama" in result.stderr


def test_existing_out_needs_overwrite(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    result = run_cli(*BASE, "--out", "out", cwd=tmp_path)
    assert result.returncode == 2
    assert "pass --overwrite" in result.stderr
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"
    result = run_cli(*BASE, "--method", "magnitude", "--out", "out", "--overwrite", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert not (tmp_path / "out" / "keep.txt").exists()
    assert (tmp_path / "out" / "prunekit.json").exists()


def test_methods_lists_registered_methods_with_options(tmp_path):
    result = run_cli("methods", cwd=tmp_path)
    assert result.returncode == 0
    for name in ("magnitude", "wanda", "sparsegpt"):
        assert name in result.stdout
    assert "--opt percdamp=0.01" in result.stdout


def test_eval_reports_perplexity(tmp_path):
    result = run_cli(
        "eval",
        "stories260k",
        "--tasks",
        "tinystories",
        "--seqlen",
        "128",
        "--json",
        "e.json",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    ppl = json.loads((tmp_path / "e.json").read_text())["results"]["tinystories"]["perplexity"]
    assert 1.0 < ppl < 20.0
    torch.manual_seed(0)
