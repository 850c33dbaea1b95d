"""Models in their own dtype: weights stay bfloat16 / float16 in memory and on disk while
statistics and solves run in float32; `compute_dtype` lowers only the calibration
forwards."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

import prunekit
from prunekit.errors import PrunekitError

FAMILY_METHODS = [  # one method per family and driver
    ("wanda", {}),
    ("sparsegpt", {}),
    ("wanda+admm", {}),
    ("flap", {}),
    ("llm_pruner", {"protect_first": 0, "protect_last": 0}),
    ("slicegpt", {}),
    ("shortgpt", {}),
    ("sleb", {}),
]


def _prune(lm, method, options, **kw):
    return prunekit.prune(
        lm, method, sparsity=0.2, calib="tinyshakespeare", nsamples=8, seqlen=64,
        options=options, **kw,
    )  # fmt: skip


@pytest.mark.parametrize(("method", "options"), FAMILY_METHODS)
def test_every_family_prunes_a_bfloat16_model_in_bfloat16(method, options, tmp_path):
    lm = prunekit.load_model("stories260k", dtype="bfloat16")
    record = _prune(lm, method, options)
    assert {p.dtype for p in lm.model.parameters()} == {torch.bfloat16}
    assert record.request["dtype"] == "bfloat16"
    ids = torch.tensor([[1, 400, 300, 200, 100]])
    assert torch.isfinite(lm.model(ids).logits).all()
    out = prunekit.save(lm, tmp_path / "out", record)
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        names = f.keys()
        assert {f.get_tensor(k).dtype for k in names} == {torch.bfloat16}
    back = prunekit.load_pruned(out)  # "auto": the dtype it was saved in
    assert next(back.model.parameters()).dtype == torch.bfloat16
    torch.testing.assert_close(back.model(ids).logits, lm.model(ids).logits)


@pytest.mark.parametrize("method", ["wanda", "sparsegpt", "flap", "llm_pruner"])
def test_float16_runs_on_the_cpu(method):
    """No "not implemented for 'Half'" from any family's statistics or solves."""
    lm = prunekit.load_model("stories260k", dtype="float16")
    options = {"protect_first": 0, "protect_last": 0} if method == "llm_pruner" else {}
    _prune(lm, method, options)
    assert {p.dtype for p in lm.model.parameters()} == {torch.float16}
    assert torch.isfinite(lm.model(torch.tensor([[1, 400, 300]])).logits).all()


def test_bfloat16_wanda_masks_nearly_equal_float32_ones():
    """Scores from bfloat16 weights and activations pick almost the same weights."""
    masks = {}
    for dtype in ("float32", "bfloat16"):
        lm = prunekit.load_model("stories260k", dtype=dtype)
        _prune(lm, "wanda", {})
        masks[dtype] = [m.weight != 0 for m in lm.model.model.layers[0].modules()
                        if isinstance(m, torch.nn.Linear)]  # fmt: skip
    same = sum(int((a == b).sum()) for a, b in zip(*masks.values(), strict=True))
    total = sum(a.numel() for a in masks["float32"])
    assert same / total >= 0.97


def test_bfloat16_compute_keeps_float32_weights_and_nearly_the_same_masks():
    weights = {}
    for compute in ("auto", "bfloat16"):
        lm = prunekit.load_model("stories260k")
        record = _prune(lm, "wanda", {}, compute_dtype=compute)
        assert record.request["compute_dtype"] == compute
        assert next(lm.model.parameters()).dtype == torch.float32
        weights[compute] = torch.cat(
            [m.weight.flatten() for m in lm.model.modules() if isinstance(m, torch.nn.Linear)]
        )
    agree = float(((weights["auto"] == 0) == (weights["bfloat16"] == 0)).float().mean())
    assert 0.99 <= agree < 1.0  # lower precision flips a few near-ties, no more


def test_auto_is_the_checkpoint_dtype(tmp_path):
    lm = prunekit.load_model("stories260k", dtype=torch.float16)
    lm.model.save_pretrained(tmp_path / "half")
    lm.tokenizer.save_pretrained(tmp_path / "half")
    assert next(prunekit.load_model(str(tmp_path / "half")).model.parameters()).dtype == (
        torch.float16
    )
    as_float = prunekit.load_model(str(tmp_path / "half"), dtype="float32")
    assert next(as_float.model.parameters()).dtype == torch.float32


@pytest.mark.parametrize("dtype", ["bf16", "int8", 3, torch.int8])
def test_unknown_dtype_is_one_line(dtype):
    with pytest.raises(PrunekitError, match="dtype .*valid: auto, float32, bfloat16, float16"):
        prunekit.load_model("stories260k", dtype=dtype)


def test_methods_without_lower_precision_forwards_refuse_it():
    lm = prunekit.load_model("stories260k")
    with pytest.raises(PrunekitError, match="computes in the weights' dtype"):
        _prune(lm, "llm_pruner", {}, compute_dtype="bfloat16")
