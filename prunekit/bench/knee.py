"""The "essential sparsity" of a curve (Jaiswal et al., 2023): the sparsity up to which a
model degrades slowly, after which it degrades much faster.

Two readings, both on a degradation curve `d(s)` (higher = worse; the dense model at
s = 0 included):

- `knee_sparsity`: the sparsity where the slope of `d` increases most, i.e. the interior
  point with the largest second difference on the (possibly uneven) grid:
  `(d[i+1]-d[i])/(s[i+1]-s[i]) - (d[i]-d[i-1])/(s[i]-s[i-1])`. None when the slope never
  increases (no knee) or there are fewer than three points.
- `tolerance_sparsity`: the largest sparsity before the first point whose degradation
  exceeds `tolerance` (the "within 1 % of dense" reading).

Degradations used by the report: log(ppl / dense ppl) for perplexity (so the knee does
not simply sit at the last point of an exponential), 1 - retained accuracy for tasks.
"""

from __future__ import annotations

from collections.abc import Sequence


def _sorted(sparsities: Sequence[float], degradation: Sequence[float]):
    if len(sparsities) != len(degradation):
        raise ValueError("sparsities and degradation differ in length")
    return sorted(zip(sparsities, degradation, strict=True))


def slope_changes(sparsities: Sequence[float], degradation: Sequence[float]) -> list[float]:
    """Second difference at each interior point of the sorted curve (len n - 2)."""
    points = _sorted(sparsities, degradation)
    slopes = [(d1 - d0) / (s1 - s0) for (s0, d0), (s1, d1) in zip(points, points[1:], strict=False)]
    return [b - a for a, b in zip(slopes, slopes[1:], strict=False)]


def knee_sparsity(sparsities: Sequence[float], degradation: Sequence[float]) -> float | None:
    """The sparsity where the degradation's slope increases most, or None."""
    points = _sorted(sparsities, degradation)
    if len(points) < 3:
        return None
    changes = slope_changes(sparsities, degradation)
    best = max(range(len(changes)), key=changes.__getitem__)
    return points[best + 1][0] if changes[best] > 0 else None


def tolerance_sparsity(
    sparsities: Sequence[float], degradation: Sequence[float], tolerance: float
) -> float | None:
    """The largest sparsity reached before the degradation first exceeds `tolerance`.

    None when even the first (lowest-sparsity) point exceeds it.
    """
    best = None
    for sparsity, value in _sorted(sparsities, degradation):
        if value > tolerance:
            break
        best = sparsity
    return best


def is_monotone(
    sparsities: Sequence[float], degradation: Sequence[float], slack: float = 0.0
) -> bool | None:
    """Whether the degradation never falls by more than `slack` as sparsity rises (the
    Junk-DNA reading: magnitude pruning removes ever larger weights as sparsity rises, so
    a monotone curve means damage grows with the magnitude of what is removed). None with
    fewer than two points."""
    points = _sorted(sparsities, degradation)
    if len(points) < 2:
        return None
    return all(b >= a - slack for (_, a), (_, b) in zip(points, points[1:], strict=False))
