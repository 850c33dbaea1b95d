"""Sparse-bitmask checkpoints (compressed-tensors' format): the layout decoded by code
written here from the format's definition, identical weights after reload, a folder
smaller than dense, and bad requests refused."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import prunekit
from prunekit.models.compressed import compress, decompress


def _independent_decode(shape, values, bitmask, row_offsets):
    """Rows of `shape`, bits little-endian per byte, values row-major; offsets checked."""
    rows, cols = shape
    dense = np.zeros((rows, cols), dtype=np.float32)
    index = 0
    for r in range(rows):
        assert row_offsets[r] == index
        for c in range(cols):
            if (bitmask[r, c // 8] >> (c % 8)) & 1:
                dense[r, c] = values[index]
                index += 1
    assert index == len(values)
    return dense


def test_format_matches_its_definition():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(5, 19, generator=gen)
    w[torch.rand(5, 19, generator=gen) < 0.6] = 0
    parts = compress(w)
    assert parts["bitmask"].dtype == torch.uint8 and parts["bitmask"].shape == (5, 3)
    dense = _independent_decode(
        parts["shape"].tolist(),
        parts["compressed"].numpy(),
        parts["bitmask"].numpy(),
        parts["row_offsets"].numpy(),
    )
    np.testing.assert_array_equal(dense, w.numpy())
    assert torch.equal(decompress(parts), w)


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_saved_sparse_folder_reloads_identically_and_is_smaller(stories, tmp_path, pattern):
    record = prunekit.prune(stories, "magnitude", sparsity=0.5, pattern=pattern)
    dense_dir = prunekit.save(stories, tmp_path / "dense", record)
    sparse_dir = prunekit.save(stories, tmp_path / "sparse", record, weights="sparse-bitmask")
    config = json.loads((sparse_dir / "config.json").read_text())
    sparsity = config["quantization_config"]["sparsity_config"]
    assert sparsity["format"] == "sparse-bitmask" and sparsity["sparsity_structure"] == pattern
    stored = load_file(str(sparse_dir / "model.safetensors"))
    assert "model.layers.0.mlp.down_proj.weight.bitmask" in stored
    assert "model.layers.0.mlp.down_proj.weight" not in stored
    assert (sparse_dir / "model.safetensors").stat().st_size < 0.8 * (
        dense_dir / "model.safetensors"
    ).stat().st_size
    reloaded = prunekit.load_pruned(sparse_dir)
    original = dict(stories.model.named_parameters())
    for name, param in reloaded.model.named_parameters():
        assert torch.equal(param, original[name]), name


def test_unknown_weights_format_is_refused(stories, tmp_path):
    record = prunekit.prune(stories, "magnitude", sparsity=0.5)
    with pytest.raises(prunekit.PrunekitError, match="valid: dense, sparse-bitmask"):
        prunekit.save(stories, tmp_path / "x", record, weights="csr")
    assert not (tmp_path / "x").exists()


def test_the_compressed_tensors_library_reads_and_writes_the_same_tensors():
    """Where compressed-tensors with its sparse-bitmask compressor is installed (releases up
    to 0.10; later ones dropped it), its compression equals ours in both directions."""
    lib = pytest.importorskip("compressed_tensors.compressors.sparse_compressors.sparse_bitmask")
    gen = torch.Generator().manual_seed(1)
    for dtype in (torch.float32, torch.bfloat16):
        w = torch.randn(64, 200, generator=gen).to(dtype)
        w[torch.rand(64, 200, generator=gen) < 0.55] = 0
        ours = compress(w)
        values, bits, offsets = lib.bitmask_compress(w)
        assert torch.equal(ours["compressed"], values) and torch.equal(ours["bitmask"], bits)
        assert torch.equal(ours["row_offsets"], offsets)
        theirs = lib.BitmaskTensor(
            shape=ours["shape"].tolist(),
            compressed=ours["compressed"],
            bitmask=ours["bitmask"],
            row_offsets=ours["row_offsets"],
        )
        assert torch.equal(theirs.decompress(), w)
