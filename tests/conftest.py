"""Shared fixtures: the real tiny Llama (stories260K), calibration windows, tiny models."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
if "PRUNEKIT_DATA_DIR" not in os.environ and (SHARED / "data").is_dir():
    os.environ["PRUNEKIT_DATA_DIR"] = str(SHARED)

import prunekit  # noqa: E402
from prunekit.data import calibration_windows, load_text  # noqa: E402

torch.set_num_threads(2)


@pytest.fixture
def stories():
    """A fresh copy of stories260K (loads in milliseconds)."""
    return prunekit.load_model("stories260k")


@pytest.fixture(scope="session")
def stories_calib() -> torch.Tensor:
    """16 windows of 128 tokens of Tiny Shakespeare, tokenized for stories260K: [16, 128]."""
    lm = prunekit.load_model("stories260k")
    text = load_text("tinyshakespeare", purpose="calib").text
    return calibration_windows(lm.tokenizer, text, nsamples=16, seqlen=128, seed=0)
