"""ShortGPT and angular distance against implementations written here from the papers and
the reference code, reading transformers' `hidden_states` directly (no prunekit code for
the part under test), on the real stories260K and real calibration text.

- ShortGPT (icip-cas/ShortGPT `compute_bi`): BI_i = sum over tokens of 1 − cos(h_i, h_{i+1})
  over `outputs.hidden_states`, whose last entry is the final norm's output; the k lowest go.
- Angular distance (Gromov et al.): d(l, n) = arccos(cos(h_l, h_{l+n})) / π at the last
  token of each window, averaged over windows; the run with the smallest d goes.
"""

from __future__ import annotations

import math

import pytest
import torch

from prunekit.methods import PruneRequest, get_method


def hidden_states(lm, calib: torch.Tensor) -> list[torch.Tensor]:
    """transformers' hidden states of every window: L + 1 tensors [n, T, H] (float64)."""
    with torch.no_grad():
        out = lm.model(calib, output_hidden_states=True, use_cache=False)
    return [h.double() for h in out.hidden_states]


def reference_bi(states: list[torch.Tensor]) -> list[float]:
    """Mean over tokens of 1 − cos(h_i, h_{i+1}) per block (the reference sums; same order)."""
    scores = []
    for a, b in zip(states[:-1], states[1:], strict=True):
        a, b = a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1])
        cos = (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))
        scores.append(float((1 - cos).mean()))
    return scores


def reference_angular(states: list[torch.Tensor], n: int) -> list[float]:
    """d(l, n) at the last token, mean over windows, for every start l with l + n < L
    (the spans that end before the final norm)."""
    runs = []
    for start in range(len(states) - 1 - n):
        a, b = states[start][:, -1], states[start + n][:, -1]
        cos = ((a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))).clamp(-1, 1)
        runs.append(float((torch.arccos(cos) / math.pi).mean()))
    return runs


@pytest.fixture(scope="module")
def calib(stories_calib):
    return stories_calib[:4, :64]


def test_shortgpt_block_influence_matches_the_reference(stories, calib):
    states = hidden_states(stories, calib)
    expected = reference_bi(states)
    cls = get_method("shortgpt")
    details = cls(cls.Config(blocks=2)).run(stories, calib, PruneRequest(sparsity=0.0))
    assert details["block_scores"] == pytest.approx(expected, rel=1e-5, abs=1e-7)
    assert details["removed_blocks"] == sorted(sorted(range(5), key=expected.__getitem__)[:2])


def test_shortgpt_without_the_final_norm_scores_the_raw_last_output(stories, calib):
    states = hidden_states(stories, calib)
    cls = get_method("shortgpt")
    details = cls(cls.Config(blocks=1, final_norm=False)).run(
        stories, calib, PruneRequest(sparsity=0.0)
    )
    reference = reference_bi(states)
    assert details["block_scores"][:-1] == pytest.approx(reference[:-1], rel=1e-5, abs=1e-7)
    assert details["block_scores"][-1] != pytest.approx(reference[-1], rel=1e-3)


@pytest.mark.parametrize("n", [1, 2])
def test_angular_distance_matches_the_reference(stories, calib, n):
    states = hidden_states(stories, calib)
    expected = reference_angular(states, n)
    cls = get_method("angular")
    details = cls(cls.Config(blocks=n)).run(stories, calib, PruneRequest(sparsity=0.0))
    runs = details["run_distances"]
    assert runs[: len(expected)] == pytest.approx(expected, rel=1e-5, abs=1e-7)
