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


# -- SLEB, Shortened LLaMA, LaCo: whole-model losses and merges computed here ------------


def nll_without(lm, calib: torch.Tensor, removed: list[int]) -> float:
    """Mean next-token NLL (nats) of the model with blocks `removed` taken out of its
    ModuleList, as the references delete layers before evaluating."""
    model = lm.model
    layers = model.model.layers
    model.model.layers = torch.nn.ModuleList([b for i, b in enumerate(layers) if i not in removed])
    try:
        with torch.no_grad():
            logits = model(calib, use_cache=False).logits[:, :-1].double()
        return float(
            torch.nn.functional.cross_entropy(logits.flatten(0, 1), calib[:, 1:].flatten())
        )
    finally:
        model.model.layers = layers


def reference_sleb(lm, calib, k: int, early_barrier: int = 1, latter_barrier: int = 1):
    """jiwonsong-dev/SLEB: k greedy steps, each removing the candidate (barriers excluded)
    whose removal gives the lowest calibration perplexity (first index on a tie)."""
    n = lm.model.config.num_hidden_layers
    removed: list[int] = []
    for _ in range(k):
        best, best_ppl = None, float("inf")
        for j in range(early_barrier, n - latter_barrier):
            if j in removed:
                continue
            ppl = math.exp(nll_without(lm, calib, [*removed, j]))
            if ppl < best_ppl:
                best, best_ppl = j, ppl
        removed.append(best)
    return removed


@pytest.mark.parametrize("k", [1, 2])
def test_sleb_greedy_order_and_barriers_match_the_reference(stories, calib, k):
    expected = reference_sleb(stories, calib, k)
    cls = get_method("sleb")
    details = cls(cls.Config(blocks=k)).run(stories, calib, PruneRequest(sparsity=0.0))
    assert details["removal_order"] == expected
    assert 0 not in expected and 4 not in expected


def test_shortened_llama_ppl_scores_match_the_reference(stories, calib):
    """One-shot PPL of the model without each block; keep-first / keep-last filter."""
    expected = [math.exp(nll_without(stories, calib, [i])) for i in range(5)]
    cls = get_method("shortened_llama")
    config = cls.Config(blocks=2, keep_first=1, keep_last=1)
    details = cls(config).run(stories, calib, PruneRequest(sparsity=0.0))
    scores = details["block_scores"]
    assert scores[0] is None and scores[4] is None
    assert scores[1:4] == pytest.approx(expected[1:4], rel=1e-5)
    assert details["removed_blocks"] == sorted(sorted([1, 2, 3], key=expected.__getitem__)[:2])


def test_shortened_llama_taylor_scores_match_the_reference(stories, calib):
    """Taylor+: Σ |W ⊙ G| over each block's weights, G the loss gradient summed over the
    calibration windows (one backward per window)."""
    model = stories.model
    model.zero_grad()
    for row in calib:
        ids = row.unsqueeze(0)
        model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
    expected = []
    for block in model.model.layers:
        expected.append(
            sum(
                float((p.detach() * p.grad).abs().sum())
                for name, p in block.named_parameters()
                if name.endswith("weight")
            )
        )
    model.zero_grad(set_to_none=True)
    cls = get_method("shortened_llama")
    config = cls.Config(blocks=1, criterion="taylor", keep_first=0, keep_last=0)
    details = cls(config).run(stories, calib, PruneRequest(sparsity=0.0))
    assert details["block_scores"] == pytest.approx(expected, rel=1e-4)


def laco_merged_similarity(lm, calib, base: int, count: int) -> float:
    """yangyifei729/LaCo: add (θ_j − θ_base) of the next count−1 blocks' linears to block
    `base`, drop them, and take the mean token cosine similarity of the last hidden
    states (after the final norm) with the original model's."""
    import copy

    with torch.no_grad():
        reference = lm.model(calib, output_hidden_states=True).hidden_states[-1].double()
        merged = copy.deepcopy(lm.model)
        layers = merged.model.layers
        names = [n for n, _ in layers[base].named_parameters() if "proj" in n]
        params = dict(layers[base].named_parameters())
        originals = {n: params[n].detach().clone() for n in names}
        for j in range(base + 1, base + count):
            other = dict(layers[j].named_parameters())
            for n in names:
                params[n] += other[n] - originals[n]
        merged.model.layers = torch.nn.ModuleList(
            [b for i, b in enumerate(layers) if not base < i < base + count]
        )
        out = merged(calib, output_hidden_states=True).hidden_states[-1].double()
    return float(torch.nn.functional.cosine_similarity(out, reference, dim=-1).mean())


def test_laco_merge_similarities_match_the_reference(stories, calib):
    """Every start block's one-shot merge of 3 blocks (the final block never merged)."""
    n = 5
    expected = [laco_merged_similarity(stories, calib, p, min(3, n - 1 - p)) for p in range(n - 2)]
    cls = get_method("laco")
    details = cls(cls.Config(blocks=1, lowest=0)).run(stories, calib, PruneRequest(sparsity=0.0))
    assert details["block_scores"] == pytest.approx(expected, rel=1e-6, abs=1e-6)
    assert 4 not in details["removed_blocks"]
