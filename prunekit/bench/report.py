"""`prunekit report`: a results store rendered as Markdown (+ PNG files) and as one
self-contained HTML page (figures inlined as base64 PNG, no external resource)."""

from __future__ import annotations

import base64
import html
import json
import math
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from prunekit.bench.config import SweepConfig, series_name
from prunekit.bench.knee import is_monotone, knee_sparsity, tolerance_sparsity
from prunekit.bench.plots import Figure, cost_figure, perplexity_figure, retained_figure
from prunekit.bench.results import Group, accuracy, group_rows, series_of
from prunekit.bench.store import ResultStore, Row
from prunekit.errors import PrunekitError

PPL_TOLERANCE = 0.10  # essential sparsity: perplexity at most 10 % above dense
ACC_TOLERANCE = 0.02  # essential sparsity: at most 2 % of the dense accuracy lost
MONOTONE_SLACK = 0.01  # a dip in degradation smaller than this still counts as monotone


@dataclass
class Table:
    """Headers and rows of strings; `keys` names each row (the cell key) for the HTML."""

    headers: list[str]
    rows: list[list[str]] = field(default_factory=list)
    keys: list[str] = field(default_factory=list)
    html_id: str = ""

    def markdown(self) -> str:
        lines = ["| " + " | ".join(self.headers) + " |", "|" + "---|" * len(self.headers)]
        lines += ["| " + " | ".join(cells) + " |" for cells in self.rows]
        return "\n".join(lines)

    def html(self) -> str:
        head = "".join(f"<th>{html.escape(h)}</th>" for h in self.headers)
        body = []
        for i, cells in enumerate(self.rows):
            key = f' data-key="{html.escape(self.keys[i])}"' if self.keys else ""
            row_class = ' class="cell"' if self.keys else ""
            tds = "".join(f"<td>{html.escape(c)}</td>" for c in cells)
            body.append(f"<tr{row_class}{key}>{tds}</tr>")
        table_id = f' id="{self.html_id}"' if self.html_id else ""
        return (
            f'<div class="scroll"><table{table_id}><thead><tr>{head}</tr></thead>'
            f"<tbody>{''.join(body)}</tbody></table></div>"
        )


def _fmt(value: float | None, spec: str) -> str:
    """`value` formatted, or an en dash when missing."""
    if value is None or math.isnan(value):
        return "–"
    return format(value, spec)


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}"


def cell_table(group: Group, groups: dict[str, list[str]]) -> Table:
    """One row per cell: the dense baseline first, then every pruned cell."""
    ppl_tasks, acc_tasks = group.perplexity_tasks, group.accuracy_tasks
    headers = ["method", "pattern", "allocation", "sparsity", "actual"]
    headers += [f"{t} ppl" for t in ppl_tasks] + [f"{t} acc %" for t in acc_tasks]
    headers += [f"{g} retained %" for g in groups]
    headers += ["prune s", "cell s", "peak MiB", "key"]
    table = Table(headers, html_id="cells")
    for row in group.rows:
        cell = row.cell
        actual = row.prune["overall_sparsity"] if row.prune else 0.0
        cells = [
            series_name(cell.method, cell.options, None, None),
            cell.pattern or "–",
            cell.allocation or "–",
            _fmt(cell.sparsity or 0.0, ".2f"),
            _fmt(actual, ".4f"),
        ]
        for task in ppl_tasks:
            result = row.metrics.get(task)
            ratio = group.perplexity_ratio(row, task)
            text = _fmt(result["perplexity"], ".2f") if result else "–"
            cells.append(text if cell.is_dense or ratio is None else f"{text} (×{ratio:.2f})")
        for task in acc_tasks:
            result = row.metrics.get(task)
            cells.append(_pct(accuracy(result)) if result else "–")
        for name in groups:
            cells.append(_pct(1.0 if cell.is_dense else group.retained(row, name)))
        cells += [
            _fmt(row.timing.get("prune_s"), ".1f"),
            _fmt(row.wall_time_s, ".1f"),
            _fmt(row.peak_rss_mb, ".0f"),
            row.key[:12],
        ]
        table.rows.append(cells)
        table.keys.append(row.key)
    return table


def knee_table(group: Group, groups: dict[str, list[str]]) -> Table:
    """Per method and metric: the knee (largest slope increase) and the tolerance reading."""
    table = Table(
        [
            "method",
            "metric",
            "knee (largest slope increase)",
            "within tolerance up to",
            "damage monotone in sparsity",
        ]
    )
    ppl_rule = f"ppl ≤ dense × {1 + PPL_TOLERANCE:g}"
    acc_rule = f"retained ≥ {1 - ACC_TOLERANCE:.0%}"
    for name, rows in group.series().items():
        curves = []  # (metric, sparsities, degradation, tolerance, rule)
        for task in group.perplexity_tasks:
            xs, log_ratio = group.ppl_curve(rows, task)
            curves.append(
                (f"{task} log ppl ratio", xs, log_ratio, math.log1p(PPL_TOLERANCE), ppl_rule)
            )
        for label in groups:
            xs, retained = group.retained_curve(rows, label)
            lost = [1 - v for v in retained]
            curves.append((f"{label} 1 − retained", xs, lost, ACC_TOLERANCE, acc_rule))
        for metric, xs, ys, tolerance, rule in curves:
            knee = knee_sparsity(xs, ys)
            within = tolerance_sparsity(xs, ys, tolerance)
            knee_text = "none" if knee is None else f"{knee:.2f}"
            monotone = is_monotone(xs, ys, MONOTONE_SLACK)
            table.rows.append(
                [
                    name,
                    metric,
                    knee_text,
                    f"{_fmt(within, '.2f')} ({rule})",
                    "-" if monotone is None else ("yes" if monotone else "no"),
                ]
            )
    return table


def provenance_table(rows: list[Row]) -> Table:
    """Per cell: seed, versions, data hashes, when it finished, how often it ran."""
    table = Table(
        [
            "key",
            "cell",
            "seed",
            "prunekit",
            "torch",
            "transformers",
            "data sha256 (first 10)",
            "finished",
            "attempts",
        ]
    )
    for row in rows:
        hashes = ", ".join(f"{k}={v[:10]}" for k, v in sorted(row.data_hashes.items()))
        table.rows.append(
            [
                row.key[:12],
                row.cell.label,
                "–" if row.cell.seed is None else str(row.cell.seed),
                row.versions.get("prunekit", "?"),
                row.versions.get("torch", "?"),
                row.versions.get("transformers", "?"),
                hashes,
                row.finished_at,
                str(row.attempts),
            ]
        )
    return table


def _calibration_line(calib: dict) -> str:
    return (
        f"- calibration: {calib['nsamples']} windows of {calib['seqlen']} tokens "
        f"from {calib['dataset']}"
    )


def _protocol(group: Group) -> list[str]:
    evaluation = group.evaluation
    limits = ", ".join(
        f"{t}: {'all' if evaluation['limit'][t] is None else evaluation['limit'][t]}"
        for t in evaluation["tasks"]
    )
    lines = [
        f"- evaluation: {', '.join(evaluation['tasks'])}; perplexity windows of "
        f"{evaluation['seqlen']} tokens; limits (first N windows of a perplexity dataset, "
        f"first N items of a task): {limits}"
    ]
    calibrations = {json.dumps(r.cell.calibration, sort_keys=True) for r in group.pruned}
    lines += [_calibration_line(json.loads(c)) for c in sorted(calibrations) if c != "null"]
    data_free = sorted({series_of(r) for r in group.pruned if r.cell.calibration is None})
    if data_free:
        lines.append(f"- no calibration data (data-free): {', '.join(data_free)}")
    seeds = sorted({r.cell.seed for r in group.pruned if r.cell.seed is not None})
    if seeds:
        lines.append(f"- seed: {', '.join(map(str, seeds))}")
    if group.dense is None:
        lines.append("- no dense baseline in the store: ratios and retained accuracy are blank")
    return lines


@dataclass
class Section:
    """A model × protocol part of the report: its text, tables and figures."""

    title: str
    protocol: list[str]
    figures: list[Figure]
    cells: Table
    knees: Table
    rows: list[Row]


def build_sections(groups: list[Group]) -> list[Section]:
    sections = []
    for index, group in enumerate(groups):
        kick = group.task_groups()
        figures = []
        if group.dense is not None and group.pruned:
            figures += [perplexity_figure(group, t) for t in group.perplexity_tasks]
            if kick:
                figures.append(retained_figure(group, kick))
        if group.pruned:
            figures.append(cost_figure(group))
        if len(groups) > 1:
            for figure in figures:
                figure.name = f"{index + 1}_{figure.name}"
        title = group.model + (f" (protocol {index + 1})" if len(groups) > 1 else "")
        sections.append(
            Section(
                title,
                _protocol(group),
                figures,
                cell_table(group, kick),
                knee_table(group, kick),
                group.rows,
            )
        )
    return sections


KNEE_NOTE = (
    "Essential sparsity (Jaiswal et al., 2023): the knee is the sparsity where the slope of "
    "the degradation curve (log perplexity ratio, or 1 − retained accuracy; dense at 0) "
    "increases most, i.e. the largest second difference on the sweep's grid; 'none' when "
    "the slope never increases. The tolerance column gives the largest sparsity before the "
    f"first point worse than the tolerance (perplexity > dense × {1 + PPL_TOLERANCE:g}, or "
    f"more than {ACC_TOLERANCE:.0%} of the dense accuracy lost). Retained accuracy is the "
    "mean over a group's tasks of pruned accuracy / dense accuracy (LLM-Kick grouping)."
)


def render_markdown(title: str, source: str, sections: list[Section], absent: list[str]) -> str:
    stamp = datetime.now(timezone.utc).isoformat(timespec="seconds")
    out = [f"# {title}", "", f"Generated {stamp} from `{source}`.", ""]
    for section in sections:
        out += [f"## {section.title}", "", *section.protocol, ""]
        for figure in section.figures:
            out += [f"![{figure.caption}]({figure.name})", ""]
        out += ["### Cells (dense first)", "", section.cells.markdown(), ""]
        out += ["### Essential sparsity", "", KNEE_NOTE, "", section.knees.markdown(), ""]
    if absent:
        out += ["## Cells not in this report", ""] + [f"- {line}" for line in absent] + [""]
    return "\n".join(out)


STYLE = """
body { font-family: sans-serif; margin: 2em; max-width: 1100px; }
.scroll { overflow-x: auto; max-width: 100%; margin: 1em 0; }
table { border-collapse: collapse; font-size: 13px; }
th, td { border: 1px solid #bbb; padding: 3px 6px; text-align: right; }
th { background: #eee; white-space: normal; }
td:first-child, th:first-child { text-align: left; position: sticky; left: 0;
  background: #fafafa; white-space: nowrap; }
figure { margin: 1em 0; }
img.plot { width: 100%; height: auto; }
"""


def render_html(
    title: str, source: str, sections: list[Section], provenance: Table, absent: list[str]
) -> str:
    stamp = datetime.now(timezone.utc).isoformat(timespec="seconds")
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title><style>{STYLE}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        f"<p>Generated {stamp} from <code>{html.escape(source)}</code>.</p>",
    ]
    for section in sections:
        parts.append(f"<h2>{html.escape(section.title)}</h2><ul>")
        parts += [f"<li>{html.escape(line[2:])}</li>" for line in section.protocol]
        parts.append("</ul>")
        for figure in section.figures:
            data = base64.b64encode(figure.png).decode("ascii")
            parts.append(
                f'<figure><img class="plot" alt="{html.escape(figure.caption)}" '
                f'src="data:image/png;base64,{data}">'
                f"<figcaption>{html.escape(figure.caption)}</figcaption></figure>"
            )
        parts += ["<h3>Cells (dense first)</h3>", section.cells.html()]
        parts += ["<h3>Essential sparsity</h3>", f"<p>{html.escape(KNEE_NOTE)}</p>"]
        parts.append(section.knees.html())
    parts += ["<h2>Provenance</h2>", provenance.html()]
    if absent:
        parts.append("<h2>Cells not in this report</h2><ul>")
        parts += [f"<li>{html.escape(line)}</li>" for line in absent]
        parts.append("</ul>")
    parts.append("</body></html>")
    return "\n".join(parts)


def absent_cells(failed: list[Row], config: SweepConfig | None, done: set[str]) -> list[str]:
    """One line per cell of the sweep without a result: failed ones, and (given the
    sweep's config) those not run yet."""
    lines = [f"{r.cell.label}: failed after {r.attempts} attempt(s): {r.error}" for r in failed]
    if config is not None:
        known = done | {r.key for r in failed}
        unique = {c.key: c for c in config.cells if c.key not in known}
        lines += [f"{c.label}: not run yet" for c in unique.values()]
    return lines


def write_report(
    db: str | Path,
    out: str | Path,
    title: str = "prunekit sweep report",
    config: SweepConfig | None = None,
) -> list[Path]:
    """Write report.md, the PNGs it links, and report.html (self-contained) into `out`.

    With the sweep's `config`, cells of the grid missing from the store are listed.
    """
    with ResultStore(db, read_only=True) as store:
        rows, failed = store.rows("done"), store.rows("failed")
    if not rows:
        raise PrunekitError(f"results store {db} has no finished cells to report")
    absent = absent_cells(failed, config, {r.key for r in rows})
    sections = build_sections(group_rows(rows))
    provenance = provenance_table([row for section in sections for row in section.rows])
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    markdown = render_markdown(title, str(db), sections, absent)
    markdown += "\n## Provenance\n\n" + provenance.markdown() + "\n"
    written = []
    for section in sections:
        for figure in section.figures:
            (out / figure.name).write_bytes(figure.png)
            written.append(out / figure.name)
    (out / "report.md").write_text(markdown, encoding="utf-8")
    (out / "report.html").write_text(
        render_html(title, str(db), sections, provenance, absent), encoding="utf-8"
    )
    return [out / "report.md", out / "report.html", *written]
