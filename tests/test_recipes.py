"""Recipes: stages in order with one record each, every bad recipe refused before any
work with the stage and field named, and resuming after the last finished stage."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

import prunekit
from prunekit.data import load_text
from prunekit.recipes import HealStage, PruneStage, load_recipe, run_recipe


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("recipe") / "train.txt"
    path.write_text(load_text("tinyshakespeare", purpose="calib").text[:20000])
    return str(path)


def _calib(text_file):
    return {"calib": text_file, "nsamples": 4, "seqlen": 64}


def _heal(text_file):
    return {"steps": 2, "batch_size": 2, "seqlen": 32, "data": text_file}


def test_stages_apply_in_order_and_are_recorded(text_file, tmp_path):
    stages = [
        PruneStage("shortgpt", {"sparsity": 0.2, **_calib(text_file)}),
        PruneStage("wanda", {"pattern": "2:4", **_calib(text_file)}),
        HealStage("masked_lora", _heal(text_file)),
    ]
    record = run_recipe("stories260k", stages, tmp_path / "out")
    kinds = [(s["kind"], s["method"]) for s in record["stages"]]
    assert kinds == [("prune", "shortgpt"), ("prune", "wanda"), ("heal", "masked_lora")]
    assert record["stages"][0]["facts"]["details"]["num_blocks_after"] == 4
    assert record["stages"][1]["sparsity_after"] == pytest.approx(0.5, abs=1e-6)
    assert record["stages"][2]["sparsity_after"] == record["stages"][1]["sparsity_after"]
    assert all(s["seconds"] >= 0 and s["peak_rss_mb"] > 0 for s in record["stages"])
    lm = prunekit.load_pruned(tmp_path / "out")
    assert len(lm.adapter.blocks) == 4
    assert (
        json.loads((tmp_path / "out" / "prunekit.json").read_text())["stages"] == record["stages"]
    )
    same = prunekit.load_model("stories260k")  # the same two prunings by hand
    prunekit.prune(same, "shortgpt", sparsity=0.2, **_calib(text_file))
    prunekit.prune(same, "wanda", pattern="2:4", **_calib(text_file))
    for a, b in zip(lm.adapter.blocks, same.adapter.blocks, strict=True):
        wa = lm.adapter.linear(a, "down").weight
        assert torch.equal(wa == 0, same.adapter.linear(b, "down").weight == 0)


@pytest.mark.parametrize(
    "stages, message",
    [
        ([{"method": "nosuch"}], "stage 1 (nosuch): unknown method"),
        ([{"method": "wanda", "sparsty": 0.5}], "stage 1 (wanda): unknown field 'sparsty'"),
        ([{"method": "wanda", "sparsity": "half"}], "field 'sparsity' has the wrong type"),
        ([{"heal": "lora"}], "stage 1 (lora): healing before any pruning"),
        (
            [{"method": "wanda"}, {"heal": "lora", "stepz": 3}],
            "stage 2 (lora): unknown heal option stepz",
        ),
        (
            [{"method": "flap", "sparsity": 0.2}, {"method": "sparsegpt", "pattern": "2:4"}],
            "stage 2 (sparsegpt): N:M after width stage 1",
        ),
        ([{"method": "wanda", "heal": "lora"}], "exactly one of 'method'"),
    ],
)
def test_bad_recipes_fail_before_any_work(tmp_path, stages, message):
    path = tmp_path / "recipe.yaml"
    path.write_text(json.dumps({"stages": stages}))  # JSON is YAML
    with pytest.raises(
        prunekit.PrunekitError, match=message.replace("(", r"\(").replace(")", r"\)")
    ):
        run_recipe("stories260k", load_recipe(path), tmp_path / "out")
    assert not list(tmp_path.glob("*out*"))


def test_interrupted_recipe_resumes_after_the_last_finished_stage(text_file, tmp_path, monkeypatch):
    stages = [
        PruneStage("wanda", {"sparsity": 0.5, **_calib(text_file)}),
        HealStage("masked_lora", _heal(text_file)),
    ]
    import prunekit.recipes.recipe as recipe

    real = recipe.heal_model

    def broken(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(recipe, "heal_model", broken)
    with pytest.raises(KeyboardInterrupt):
        run_recipe("stories260k", stages, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    monkeypatch.setattr(recipe.api, "run_plan", broken)  # a rerun must not prune again
    monkeypatch.setattr(recipe, "heal_model", real)
    record = run_recipe("stories260k", stages, tmp_path / "out")
    assert [s["kind"] for s in record["stages"]] == ["prune", "heal"]
    assert not list(tmp_path.glob(".out.recipe-*"))


def test_cli_recipe(text_file, tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text(
        "stages:\n"
        f"  - {{method: wanda, sparsity: 0.5, calib: {text_file}, nsamples: 4, seqlen: 64}}\n"
        f"  - {{heal: perp, perp: [norms], steps: 2, batch_size: 2, seqlen: 32, data: {text_file}}}\n"
    )
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "prunekit",
            "prune",
            "stories260k",
            "--recipe",
            str(path),
            "--out",
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert "stage 2 heal perp" in done.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "prunekit", "prune", "stories260k", "--recipe", str(path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert bad.returncode == 2 and "needs --out" in bad.stderr
