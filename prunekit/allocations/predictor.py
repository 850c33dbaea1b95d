"""Accuracy-predictor allocation search (Ji et al., 2023, "Pruning Large Language Models
via Accuracy Predictor"): per-block sparsities chosen by a learned model of quality.

1. Sample `samples` ratio vectors with the requested mean (uniform perturbations of up
   to ±`span`, projected back onto the mean and [0, `cap`]); the first is uniform.
2. Prune a copy of the model with the `method` (any mask method) at each vector and
   measure the perplexity of the calibration windows' second half (the first half
   calibrates).
3. Fit a gradient-boosted regressor (scikit-learn) of log-perplexity on the vector.
4. Search the predictor: an evolutionary loop (`generations` × `population`) of
   mean-preserving mutations (move sparsity between two blocks) from the best sampled
   vectors; return the best predicted vector. Its mean equals the target exactly.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch

from prunekit.allocations.base import (
    Allocated,
    Allocation,
    AllocationConfig,
    describe,
    register_allocation,
)
from prunekit.errors import PrunekitError
from prunekit.eval.perplexity import mean_nll
from prunekit.methods.base import PruneRequest, get_method
from prunekit.models.loading import LoadedModel


@dataclass
class PredictorConfig(AllocationConfig):
    method: str = "wanda"  # mask method that prunes each sampled configuration
    samples: int = 24  # measured configurations
    span: float = 0.1  # largest deviation of a block from the mean when sampling
    cap: float = 0.95  # no block above this sparsity
    generations: int = 30
    population: int = 64


def project_mean(ratios: torch.Tensor, mean: float, cap: float) -> torch.Tensor:
    """The vector closest in shape to `ratios` [blocks] with the given mean, inside
    [0, cap]: shift the free entries by the residual until none crosses a bound."""
    r = ratios.double().clamp(0.0, cap)
    for _ in range(100):
        gap = mean * r.numel() - float(r.sum())
        if abs(gap) < 1e-12:
            break
        free = (r < cap) if gap > 0 else (r > 0)
        r[free] = (r[free] + gap / int(free.sum())).clamp(0.0, cap)
    return r


def sample_vectors(
    blocks: int, mean: float, config: PredictorConfig, generator: torch.Generator
) -> torch.Tensor:
    """[samples, blocks] ratio vectors with the requested mean (the first uniform)."""
    rows = [torch.full((blocks,), mean, dtype=torch.float64)]
    for _ in range(config.samples - 1):
        noise = torch.rand(blocks, generator=generator, dtype=torch.float64) * 2 - 1
        rows.append(project_mean(mean + config.span * noise, mean, config.cap))
    return torch.stack(rows)


def mutate(parent: torch.Tensor, generator: torch.Generator, step: float, cap: float):
    """Move up to `step` sparsity from one random block to another (mean preserved)."""
    child = parent.clone()
    i, j = torch.randperm(child.numel(), generator=generator)[:2].tolist()
    amount = float(torch.rand((), generator=generator, dtype=torch.float64)) * step
    amount = min(amount, float(child[i]), cap - float(child[j]))
    child[i] -= amount
    child[j] += amount
    return child


@register_allocation
class Predictor(Allocation):
    name = "predictor"
    summary = "GBM predictor of perplexity from sampled per-block ratios, then searched"
    Config = PredictorConfig
    needs_calibration = True

    def allocate(
        self, lm: LoadedModel, calib: torch.Tensor | None, request: PruneRequest
    ) -> Allocated:
        try:
            from sklearn.ensemble import GradientBoostingRegressor
        except ImportError as err:
            raise PrunekitError(
                "allocation predictor needs scikit-learn: pip install 'prunekit[search]'"
            ) from err
        config = self.config
        if config.samples < 4 or calib is None or calib.shape[0] < 2:
            raise PrunekitError("allocation predictor needs samples >= 4 and >= 2 windows")
        method_cls = get_method(config.method)
        if method_cls.kind != "unstructured" or request.pattern.is_nm:
            raise PrunekitError(
                "allocation predictor needs an unstructured mask method and pattern; "
                f"got {config.method} with {request.pattern}"
            )
        half = calib.shape[0] // 2
        fit_windows, score_windows = calib[:half], calib[half:]
        generator = torch.Generator().manual_seed(request.seed)
        blocks = lm.adapter.num_layers
        vectors = sample_vectors(blocks, request.sparsity, config, generator)
        scores = []
        for vector in vectors:
            probe = copy.deepcopy(lm)
            probe_request = copy.copy(request)
            probe_request.layer_sparsity = [float(v) for v in vector]
            method_cls().run(probe, fit_windows, probe_request)
            scores.append(mean_nll(probe.model, score_windows, request.batch_size))
            del probe
        x, y = vectors.numpy(), torch.tensor(scores).numpy()
        model = GradientBoostingRegressor(random_state=request.seed).fit(x, y)
        best = vectors[int(torch.tensor(scores).argmin())]
        ranked = [vectors[i] for i in torch.tensor(scores).argsort()[:8].tolist()]
        step = config.span
        for _ in range(config.generations):
            children = [
                mutate(ranked[k % len(ranked)], generator, step, config.cap)
                for k in range(config.population)
            ]
            pool = ranked + children
            predicted = model.predict(torch.stack(pool).numpy())
            order = predicted.argsort()
            ranked = [pool[i] for i in order[:8]]
            best = ranked[0]
            step *= 0.95
        ratios = [float(v) for v in best]
        predicted = float(model.predict(best.numpy()[None])[0])
        return Allocated(
            ratios,
            {
                **describe(ratios, request.sparsity),
                "method": config.method,
                "sampled_ppl": [round(math.exp(s), 4) for s in scores],
                "uniform_ppl": round(math.exp(scores[0]), 4),
                "best_sampled_ppl": round(math.exp(min(scores)), 4),
                "predicted_ppl": round(math.exp(predicted), 4),
            },
        )
