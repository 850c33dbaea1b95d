"""The report's figures (matplotlib, rendered off-screen to PNG bytes).

Every figure draws a series (method x pattern x allocation) the same way: its colour
names the method, its marker and line style the allocation, and an N:M series is a lone
point at its implied sparsity, not a line from the dense model. Legends sit outside the
axes; figures are the report page's width.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

from prunekit.bench.knee import knee_sparsity
from prunekit.bench.results import Group, accuracy
from prunekit.errors import PrunekitError
from prunekit.surgery.masks import Pattern

# colour names the method; marker and line the pattern / allocation (module docstring)
COLORS = [f"C{i}" for i in range(10)]
ALLOCATION_STYLES = [("o", "-"), ("s", "--"), ("^", ":"), ("P", "-.")]
NM_MARKERS = "DvX<>h"
FIGURE_WIDTH = 9.6  # inches at 100 dpi: the report page's width


@dataclass
class Figure:
    """One plot of the report: a file name, its PNG bytes and a caption."""

    name: str
    png: bytes
    caption: str


@dataclass(frozen=True)
class SeriesStyle:
    """How one series is drawn: N:M series are points (one sparsity), others lines."""

    color: str
    marker: str
    linestyle: str
    is_nm: bool


def series_styles(group: Group) -> dict[str, SeriesStyle]:
    """A style per series of `group`: colour by method, marker by pattern / allocation."""
    methods, variants, nm = {}, {}, {}
    styles = {}
    for name, rows in group.series().items():
        cell = rows[0].cell
        color = methods.setdefault(cell.method, COLORS[len(methods) % len(COLORS)])
        if Pattern.parse(cell.pattern).is_nm:
            marker = nm.setdefault(cell.pattern, NM_MARKERS[len(nm) % len(NM_MARKERS)])
            styles[name] = SeriesStyle(color, marker, "none", True)
        else:
            index = variants.setdefault(cell.allocation, len(variants))
            marker, line = ALLOCATION_STYLES[index % len(ALLOCATION_STYLES)]
            styles[name] = SeriesStyle(color, marker, line, False)
    return styles


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


def _knee_point(xs: list[float], degradation: list[float], ys: list[float]):
    """(sparsity, plotted value) of the curve's knee, or None."""
    knee = knee_sparsity(xs, degradation)
    return None if knee is None else (knee, ys[xs.index(knee)])


def _draw_knees(ax, knees: list[tuple[float, float, str]], log_y: bool) -> None:
    """Star each (x, y, colour); stars that would coincide are spread sideways."""
    span = ax.get_xlim()[1] - ax.get_xlim()[0]
    placed: dict[tuple[float, float], int] = {}
    for x, y, color in knees:
        key = (round(x, 6), round(math.log(y) if log_y else y, 2))
        shift = placed.get(key, 0)
        placed[key] = shift + 1
        offset = 0.025 * span * ((shift + 1) // 2) * (1 if shift % 2 else -1)
        ax.plot(
            [x + offset],
            [y],
            marker="*",
            markersize=15,
            color=color,
            markeredgecolor="black",
            linestyle="none",
            zorder=5,
        )


def _plot_series(
    ax, style: SeriesStyle, xs: list[float], ys: list[float], label: str, dense_first=True
) -> None:
    """A line (from the dense point when `dense_first`), or for N:M its points alone."""
    if style.is_nm and dense_first:
        xs, ys = xs[1:], ys[1:]
    ax.plot(
        xs,
        ys,
        color=style.color,
        marker=style.marker,
        linestyle=style.linestyle,
        markersize=7 if style.is_nm else 5,
        label=label,
    )


def _style(ax, xlabel: str, ylabel: str, legend: bool = True) -> None:
    """Axis labels, a light grid and a legend outside the data: every report plot's look."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    if legend:
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0)


def perplexity_figure(group: Group, task: str) -> Figure:
    """Perplexity vs sparsity per series; dense dashed; knees starred; N:M as points."""
    plt = _pyplot()
    from matplotlib.ticker import ScalarFormatter

    fig, ax = plt.subplots(figsize=(FIGURE_WIDTH, 4.4))
    dense = group.dense.metrics[task]["perplexity"]
    knees = []
    for name, style in series_styles(group).items():
        xs, log_ratio = group.ppl_curve(group.series()[name], task)
        ppl = [dense * math.exp(v) for v in log_ratio]
        _plot_series(ax, style, xs, ppl, name)
        knee = None if style.is_nm else _knee_point(xs, log_ratio, ppl)
        if knee:
            knees.append((*knee, style.color))
    ax.axhline(dense, color="gray", linestyle="--", label=f"dense {dense:.2f}")
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(ScalarFormatter())
    ax.yaxis.set_minor_formatter(ScalarFormatter())
    _draw_knees(ax, knees, log_y=True)
    ax.set_title(f"{group.model}: {task} perplexity (★ essential-sparsity knee)")
    _style(ax, "sparsity", f"{task} perplexity (log scale)")
    return Figure(
        f"ppl_{_slug(group.model)}_{_slug(task)}.png",
        _png(fig),
        f"{group.model}: {task} perplexity vs sparsity; colour = method, marker and line = "
        "allocation, lone points = N:M patterns (dense dashed; ★ knee)",
    )


def retained_figure(group: Group, task_groups: dict[str, list[str]]) -> Figure:
    """Chance-corrected retained accuracy vs sparsity, one panel per task group.

    Tasks whose dense accuracy is at or below chance are left out of a group's mean and
    named under its panel; a group with no other task says so instead of a curve."""
    plt = _pyplot()
    names = list(task_groups)
    fig, axes = plt.subplots(len(names), 1, figsize=(FIGURE_WIDTH, 3.8 * len(names)), squeeze=False)
    styles = series_styles(group)
    for ax, name in zip(axes[:, 0], names, strict=True):
        above, low = group.above_chance(name)
        knees = []
        for series, style in styles.items() if above else ():
            xs, kept = group.retained_curve(group.series()[series], name, corrected=True)
            percent = [100 * v for v in kept]
            _plot_series(ax, style, xs, percent, series)
            knee = None if style.is_nm else _knee_point(xs, [1 - v for v in kept], percent)
            if knee:
                knees.append((*knee, style.color))
        ax.axhline(100, color="gray", linestyle="--", label="dense")
        ax.axhline(0, color="gray", linestyle=":", label="chance")
        _draw_knees(ax, knees, log_y=False)
        title = f"{name}: {', '.join(above) or 'no task above chance'}"
        if low:
            dense = ", ".join(
                f"{t} {accuracy(group.dense.metrics[t]):.2f} vs {group.chance_floor(t)[0]:.2f}"
                for t in low
            )
            title += f"\ndense at or below chance, left out: {dense}"
        ax.set_title(title, fontsize=9)
        if not above:
            ax.text(
                0.5,
                0.5,
                "dense model at chance: no retention to show",
                transform=ax.transAxes,
                ha="center",
                va="center",
            )
        _style(ax, "sparsity", "retained accuracy above chance (% of dense)")
    fig.suptitle(f"{group.model}: chance-corrected retained accuracy per task group (★ knee)")
    return Figure(
        f"retained_{_slug(group.model)}.png",
        _png(fig),
        f"{group.model}: retained accuracy above chance, (pruned - chance) / (dense - chance), "
        "vs sparsity per task group",
    )


def cost_figure(group: Group) -> Figure:
    """Pruning time and peak memory vs sparsity per series (dense memory dashed)."""
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(FIGURE_WIDTH, 4.0))
    for name, style in series_styles(group).items():
        rows = group.series()[name]
        xs = [r.cell.sparsity for r in rows]
        times = [r.timing.get("prune_s", 0.0) for r in rows]
        _plot_series(left, style, xs, times, name, dense_first=False)
        memory = [r.peak_rss_mb for r in rows]
        _plot_series(right, style, xs, memory, name, dense_first=False)
    if group.dense is not None:
        right.axhline(group.dense.peak_rss_mb, color="gray", linestyle="--", label="dense eval")
    left.set_title("time to prune")
    _style(left, "sparsity", "pruning time (s)", legend=False)
    right.set_title("peak memory of the cell")
    _style(right, "sparsity", "peak RSS (MiB)")
    fig.suptitle(f"{group.model}: cost per series")
    return Figure(
        f"cost_{_slug(group.model)}.png",
        _png(fig),
        f"{group.model}: pruning time and peak memory per series",
    )
