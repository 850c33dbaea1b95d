"""The report's figures (matplotlib, rendered off-screen to PNG bytes)."""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

from prunekit.bench.knee import knee_sparsity
from prunekit.bench.results import Group
from prunekit.errors import PrunekitError

MARKERS = "osD^vP<>X*"


@dataclass
class Figure:
    """One plot of the report: a file name, its PNG bytes and a caption."""

    name: str
    png: bytes
    caption: str


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise PrunekitError("reports need matplotlib: pip install 'prunekit[report]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    _pyplot().close(fig)
    return buffer.getvalue()


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in text).strip("_").lower()


def _mark_knee(ax, xs: list[float], ys_degradation: list[float], ys_plot: list[float], color):
    knee = knee_sparsity(xs, ys_degradation)
    if knee is not None:
        at = xs.index(knee)
        ax.plot(
            [knee],
            [ys_plot[at]],
            marker="*",
            markersize=16,
            color=color,
            zorder=5,
            markeredgecolor="black",
            linestyle="none",
        )


def _style(ax, xlabel: str, ylabel: str) -> None:
    """Axis labels, a light grid and a small legend: the look of every report plot."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)


def perplexity_figure(group: Group, task: str) -> Figure:
    """Perplexity vs sparsity, one line per method; dense dashed; knees starred."""
    plt = _pyplot()
    from matplotlib.ticker import ScalarFormatter

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    dense = group.dense.metrics[task]["perplexity"]
    for i, (name, rows) in enumerate(group.series().items()):
        xs, log_ratio = group.ppl_curve(rows, task)
        ppl = [dense * math.exp(v) for v in log_ratio]
        (line,) = ax.plot(xs, ppl, marker=MARKERS[i % len(MARKERS)], label=name)
        _mark_knee(ax, xs, log_ratio, ppl, line.get_color())
    ax.axhline(dense, color="gray", linestyle="--", label=f"dense {dense:.2f}")
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(ScalarFormatter())
    ax.yaxis.set_minor_formatter(ScalarFormatter())
    ax.set_title(f"{group.model}: {task} perplexity (★ essential-sparsity knee)")
    _style(ax, "sparsity", f"{task} perplexity (log scale)")
    return Figure(
        f"ppl_{_slug(group.model)}_{_slug(task)}.png",
        _png(fig),
        f"{group.model}: {task} perplexity vs sparsity per method (dense dashed; ★ knee)",
    )


def retained_figure(group: Group, task_groups: dict[str, list[str]]) -> Figure:
    """Retained accuracy (pruned / dense, mean over a group's tasks) vs sparsity."""
    plt = _pyplot()
    names = list(task_groups)
    fig, axes = plt.subplots(1, len(names), figsize=(5.2 * len(names), 4.0), squeeze=False)
    for ax, name in zip(axes[0], names, strict=True):
        tasks = task_groups[name]
        for i, (series, rows) in enumerate(group.series().items()):
            xs, retained = group.retained_curve(rows, name)
            percent = [100 * v for v in retained]
            (line,) = ax.plot(xs, percent, marker=MARKERS[i % len(MARKERS)], label=series)
            _mark_knee(ax, xs, [1 - v for v in retained], percent, line.get_color())
        ax.axhline(100, color="gray", linestyle="--", label="dense")
        ax.set_title(f"{name}: {', '.join(tasks)}", fontsize=9)
        _style(ax, "sparsity", "retained accuracy (% of dense)")
    fig.suptitle(f"{group.model}: retained accuracy per task group (★ knee)")
    return Figure(
        f"retained_{_slug(group.model)}.png",
        _png(fig),
        f"{group.model}: retained accuracy (pruned / dense) vs sparsity per task group",
    )


def cost_figure(group: Group) -> Figure:
    """Pruning time and peak memory vs sparsity per method (dense memory dashed)."""
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(10.4, 4.0))
    for i, (name, rows) in enumerate(group.series().items()):
        marker = MARKERS[i % len(MARKERS)]
        xs = [r.cell.sparsity for r in rows]
        left.plot(xs, [r.timing.get("prune_s", 0.0) for r in rows], marker=marker, label=name)
        right.plot(xs, [r.peak_rss_mb for r in rows], marker=marker, label=name)
    if group.dense is not None:
        right.axhline(group.dense.peak_rss_mb, color="gray", linestyle="--", label="dense eval")
    left.set_title("time to prune")
    _style(left, "sparsity", "pruning time (s)")
    right.set_title("peak memory of the cell")
    _style(right, "sparsity", "peak RSS (MiB)")
    fig.suptitle(f"{group.model}: cost per method")
    return Figure(
        f"cost_{_slug(group.model)}.png",
        _png(fig),
        f"{group.model}: pruning time and peak memory per method",
    )
