"""Mask helpers: exact sparsity and valid N:M groups over many shapes (property tests)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from prunekit.errors import PrunekitError
from prunekit.surgery.masks import (
    Pattern,
    Target,
    global_masks,
    is_valid_nm,
    layer_mask,
    make_mask,
    nm_mask,
    row_mask,
)


def _scores(rows: int, cols: int, seed: int) -> torch.Tensor:
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))


def score_matrices(test):
    """Property test over random score matrices: rows, cols, sparsity and seed vary."""
    return settings(max_examples=60, deadline=None)(
        given(
            rows=st.integers(1, 40),
            cols=st.integers(1, 70),
            sparsity=st.floats(0.0, 0.99),
            seed=st.integers(0, 1000),
        )(test)
    )


@score_matrices
def test_row_mask_zeros_exactly_per_row(rows, cols, sparsity, seed):
    mask = row_mask(_scores(rows, cols, seed), sparsity)
    expected = round(cols * sparsity)
    assert ((~mask).sum(1) == expected).all()


@score_matrices
def test_layer_mask_zeros_exactly_per_layer(rows, cols, sparsity, seed):
    mask = layer_mask(_scores(rows, cols, seed), sparsity)
    assert int((~mask).sum()) == round(rows * cols * sparsity)


@settings(max_examples=60, deadline=None)
@given(
    rows=st.integers(1, 30),
    groups=st.integers(1, 12),
    m=st.integers(2, 8),
    data=st.data(),
)
def test_nm_mask_keeps_n_in_every_group(rows, groups, m, data):
    n = data.draw(st.integers(1, m - 1))
    scores = _scores(rows, groups * m, data.draw(st.integers(0, 1000)))
    mask = nm_mask(scores, n, m)
    assert (mask.reshape(rows, groups, m).sum(2) == n).all()
    assert is_valid_nm(scores * mask, n, m)


def test_nm_mask_keeps_the_largest_of_each_group():
    scores = torch.tensor([[4.0, 1.0, 3.0, 2.0, -1.0, 0.0, 5.0, 7.0]])
    assert nm_mask(scores, 2, 4).tolist() == [
        [True, False, True, False] + [False, False, True, True]
    ]


def test_row_mask_drops_the_lowest_scores():
    scores = torch.tensor([[0.5, 0.1, 0.9, 0.3]])
    assert row_mask(scores, 0.5).tolist() == [[True, False, True, False]]


def test_global_masks_share_one_threshold():
    scores = {"a": torch.tensor([[1.0, 2.0]]), "b": torch.tensor([[3.0, 0.5, 4.0]])}
    masks = global_masks(scores, 0.4)
    assert masks["a"].tolist() == [[False, True]]
    assert masks["b"].tolist() == [[True, False, True]]


def test_make_mask_routes_by_target():
    scores = _scores(8, 16, 0)
    assert is_valid_nm(scores * make_mask(scores, Target(0.5, Pattern(2, 4))), 2, 4)
    assert int((~make_mask(scores, Target(0.25, scope="layer"))).sum()) == 32


@pytest.mark.parametrize("text", ["4:4", "5:4", "0:4", "2-4", "two:four", "sparse"])
def test_bad_patterns_are_rejected(text):
    with pytest.raises(PrunekitError):
        Pattern.parse(text)


def test_pattern_parse():
    assert Pattern.parse("2:4").sparsity == 0.5
    assert Pattern.parse("unstructured").sparsity is None
    assert str(Pattern.parse("4:8")) == "4:8"
