"""`prunekit report`: the essential-sparsity knee on synthetic curves, one table row per
cell (dense first) in Markdown and HTML, and the HTML checked in headless Chromium."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys

import pytest

from prunekit import cli
from prunekit.bench import ResultStore, parse_config
from prunekit.bench.config import DENSE
from prunekit.bench.knee import knee_sparsity, slope_changes, tolerance_sparsity
from prunekit.bench.report import write_report
from prunekit.errors import PrunekitError

# --- the knee ----------------------------------------------------------------------


def test_knee_is_where_the_slope_increases_most():
    xs = [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7]
    # slow, linear degradation up to 0.4, then ten times steeper
    ys = [0.01 * x if x <= 0.4 else 0.004 + 0.1 * (x - 0.4) for x in xs]
    assert knee_sparsity(xs, ys) == 0.4
    assert knee_sparsity(list(reversed(xs)), list(reversed(ys))) == 0.4  # order-free


def test_knee_uses_the_slope_on_an_uneven_grid():
    # raw second differences of y would pick 0.5; per unit of sparsity the jump is at 0.3
    xs = [0.0, 0.3, 0.5, 0.7]
    ys = [0.0, 0.03, 0.43, 0.83]  # slopes 0.1, 2.0, 2.0
    assert slope_changes(xs, ys) == pytest.approx([1.9, 0.0])
    assert knee_sparsity(xs, ys) == 0.3


def test_no_knee_without_acceleration_or_points():
    assert knee_sparsity([0.0, 0.5, 0.7], [0.0, 0.5, 0.6]) is None  # slope only falls
    assert knee_sparsity([0.0, 0.5], [0.0, 1.0]) is None


def test_tolerance_reading():
    xs, ys = [0.0, 0.3, 0.5, 0.7], [0.0, 0.01, 0.03, 0.5]
    assert tolerance_sparsity(xs, ys, 0.02) == 0.3
    assert tolerance_sparsity(xs, ys, 1.0) == 0.7
    assert tolerance_sparsity(xs[1:], ys[1:], 0.001) is None


# --- a synthetic results store ------------------------------------------------------

RAW = {
    "models": ["stories260k"],
    "methods": ["magnitude", "wanda"],
    "sparsities": [0.3, 0.5, 0.7],
    "evaluation": {"tasks": ["wikitext2", "piqa", "arc_easy"], "seqlen": 128, "limit": 10},
}
DENSE_PPL, DENSE_ACC = 20.0, {"piqa": 0.70, "arc_easy": 0.60}


def _outcome(method: str, sparsity: float | None) -> dict:
    """Plausible results: perplexity grows, accuracy falls, wanda degrades less."""
    s = sparsity or 0.0
    damage = {"magnitude": 3.0, "wanda": 1.5, DENSE: 0.0}[method] * s**3
    metrics = {"wikitext2": {"perplexity": DENSE_PPL * (1 + 10 * damage), "text_sha256": "a" * 64}}
    for task, acc in DENSE_ACC.items():
        metrics[task] = {
            "acc": acc * (1 - damage / 2),
            "acc_norm": acc,
            "n": 10,
            "file_sha256": "b" * 64,
        }
    prune = None if method == DENSE else {"overall_sparsity": s, "wall_time_s": 1.0}
    return {
        "result": {
            "metrics": metrics,
            "prune": prune,
            "timing": {"load_s": 0.1, "prune_s": 2.0 * s, "eval_s": 1.0, "total_s": 1.1 + 2 * s},
            "peak_rss_mb": 300.0 + 100 * s,
            "versions": {"prunekit": "0.1.0", "torch": "2", "transformers": "4"},
            "data_hashes": {"wikitext2.text_sha256": "a" * 64},
        },
        "wall_time_s": 5.0,
    }


@pytest.fixture
def store_path(tmp_path):
    path = tmp_path / "results.sqlite"
    cells = parse_config(RAW).cells
    with ResultStore(path) as store:
        for cell in reversed(cells):  # stored out of order: the report orders them
            store.put(cell, _outcome(cell.method, cell.sparsity))
    return path, [c.key for c in cells]


def _table_keys(markdown: str) -> list[str]:
    section = markdown.split("### Cells (dense first)")[1].split("###")[0]
    return [
        line.rsplit("|", 2)[1].strip()
        for line in section.splitlines()
        if line.startswith("| ") and "---" not in line
    ][1:]


def test_report_has_one_row_per_cell_dense_first(store_path, tmp_path):
    db, keys = store_path
    written = write_report(db, tmp_path / "out")
    names = {p.name for p in written}
    assert {"report.md", "report.html"} <= names
    assert {
        "ppl_stories260k_wikitext2.png",
        "retained_stories260k.png",
        "cost_stories260k.png",
    } <= names
    markdown = (tmp_path / "out" / "report.md").read_text()
    rows = _table_keys(markdown)
    assert len(rows) == len(keys) == 7
    assert sorted(rows) == sorted(k[:12] for k in keys)
    assert rows[0] == keys[0][:12]  # the dense baseline first
    assert "| dense | – | – | 0.00 | 0.0000 | 20.00 | 70.0 | 60.0 | 100.0 | 100.0 |" in markdown
    # wanda at 70 %: damage 1.5 * 0.343 -> ppl x 6.145, accuracy retained 74.3 %
    assert "| wanda | unstructured | uniform | 0.70 | 0.7000 | 122.90 (×6.14) |" in markdown
    assert "74.3 | 74.3 |" in markdown
    # essential sparsity per method and metric; provenance per cell
    assert re.search(r"\| wanda \| wikitext2 log ppl ratio \| 0\.30 \| 0\.00 ", markdown)
    assert markdown.count("| knowledge 1 − retained |") == 2  # arc_easy: one per method
    assert markdown.split("## Provenance")[1].count("| 0.1.0 |") == 7

    html = (tmp_path / "out" / "report.html").read_text()
    assert html.count('<tr class="cell"') == 7
    assert re.findall(r'data-key="([0-9a-f]{64})"', html)[0] == keys[0]
    assert html.count('src="data:image/png;base64,') == 3
    assert not re.search(r'(src|href)="(?!data:)', html)  # nothing external


def test_report_without_dense_leaves_ratios_blank(tmp_path):
    cells = [c for c in parse_config(RAW).cells if c.method != DENSE]
    with ResultStore(tmp_path / "r.sqlite") as store:
        for cell in cells:
            store.put(cell, _outcome(cell.method, cell.sparsity))
    write_report(tmp_path / "r.sqlite", tmp_path / "out")
    markdown = (tmp_path / "out" / "report.md").read_text()
    assert "no dense baseline" in markdown
    assert len(_table_keys(markdown)) == 6


def test_report_lists_failed_and_missing_cells(tmp_path):
    sweep = parse_config(RAW)
    dense, failed, *pending = sweep.cells
    with ResultStore(tmp_path / "r.sqlite") as store:
        store.put(dense, _outcome(DENSE, None))
        store.put(failed, {"error": "PrunekitError: out of luck", "wall_time_s": 1.0})
    write_report(tmp_path / "r.sqlite", tmp_path / "out", config=sweep)
    markdown = (tmp_path / "out" / "report.md").read_text()
    absent = markdown.split("## Cells not in this report")[1].split("##")[0]
    assert f"- {failed.label}: failed after 1 attempt(s): PrunekitError: out of luck" in absent
    assert [line for line in absent.splitlines() if line.endswith("not run yet")] == [
        f"- {cell.label}: not run yet" for cell in pending
    ]
    assert len(_table_keys(markdown)) == 1


def test_report_of_an_empty_store_is_one_line(tmp_path, monkeypatch, capsys):
    ResultStore(tmp_path / "r.sqlite").close()
    with pytest.raises(PrunekitError, match="has no finished cells"):
        write_report(tmp_path / "r.sqlite", tmp_path / "out")
    monkeypatch.setattr(
        sys, "argv", ["prunekit", "report", "--db", str(tmp_path / "x"), "--out", "o"]
    )
    with pytest.raises(SystemExit) as info:
        cli.main()
    assert info.value.code == 2
    assert capsys.readouterr().err.strip() == f"error: results store not found: {tmp_path / 'x'}"


# --- figures: series styles and chance-corrected retention -------------------------

GRID = {
    **RAW,
    "patterns": ["unstructured", "2:4"],
    "allocations": ["uniform", "owl"],
}


def _group(tmp_path, raw, outcome):
    """The one report group of a store filled with `outcome(cell)` for every cell."""
    from prunekit.bench.results import group_rows

    with ResultStore(tmp_path / "g.sqlite") as store:
        for cell in parse_config(raw).cells:
            store.put(cell, outcome(cell))
        (group,) = group_rows(store.rows())
    return group


def test_series_styles_colour_the_method_and_mark_the_variant(tmp_path):
    from prunekit.bench.plots import series_styles

    group = _group(tmp_path, GRID, lambda cell: _outcome(cell.method, cell.sparsity))
    styles = series_styles(group)
    assert set(styles) == {
        "magnitude",
        "magnitude [owl]",
        "magnitude 2:4",
        "wanda",
        "wanda [owl]",
        "wanda 2:4",
    }
    for method in ("magnitude", "wanda"):
        family = [styles[n] for n in styles if n.split()[0] == method]
        assert len({s.color for s in family}) == 1  # one colour per method
    assert styles["magnitude"].color != styles["wanda"].color
    assert styles["wanda 2:4"].is_nm and styles["wanda 2:4"].linestyle == "none"
    uniform, owl = styles["wanda"], styles["wanda [owl]"]
    assert not uniform.is_nm and (uniform.marker, uniform.linestyle) != (owl.marker, owl.linestyle)
    assert styles["magnitude [owl]"].marker == owl.marker  # the variant, not the method


def test_retention_is_chance_corrected_and_chance_level_tasks_are_left_out(tmp_path):
    """piqa: dense 0.70 over chance 0.50, pruned 0.60 keeps (0.60 - 0.50) / (0.70 - 0.50)
    = 50% of the skill; arc_easy: 4-way, dense 0.20 on 20 items is below chance 0.25."""
    accuracies = {DENSE: {"piqa": 0.70, "arc_easy": 0.20}, "wanda": {"piqa": 0.60, "arc_easy": 0.5}}
    chance = {"piqa": 0.5, "arc_easy": 0.25}

    def outcome(cell):
        result = _outcome(cell.method, cell.sparsity)
        for task, acc in accuracies[cell.method].items():
            result["result"]["metrics"][task].update(acc=acc, chance=chance[task], n=20)
        return result

    raw = {**RAW, "methods": ["wanda"], "sparsities": [0.5]}
    group = _group(tmp_path, raw, outcome)
    (row,) = group.pruned
    groups = group.task_groups()
    piqa_group = next(name for name, tasks in groups.items() if "piqa" in tasks)
    arc_group = next(name for name, tasks in groups.items() if "arc_easy" in tasks)
    assert group.chance_floor("arc_easy") == (0.25, True)
    assert group.chance_floor("piqa") == (0.5, False)  # 0.70 > 0.50 + sqrt(.25 / 20)
    assert group.corrected_retained(row, piqa_group) == pytest.approx(0.5)
    assert group.above_chance(arc_group) == ([], ["arc_easy"])
    assert group.corrected_retained(row, arc_group) is None  # no curve from a guessing baseline
    assert group.retained(row, piqa_group) == pytest.approx(0.60 / 0.70)  # LLM-Kick's own ratio


# --- the HTML in a real browser -----------------------------------------------------

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHECK = """<script>
window.addEventListener("load", () => {
  const out = document.createElement("pre");
  out.id = "prunekit-check";
  out.textContent = JSON.stringify({
    images: [...document.images].map((img) => [img.complete, img.naturalWidth, img.naturalHeight]),
    rows: [...document.querySelectorAll("#cells tr.cell")].map((tr) => tr.dataset.key),
    firstMethod: document.querySelector("#cells tr.cell td").textContent,
    pageWidth: document.documentElement.scrollWidth,
    viewport: document.documentElement.clientWidth,
    plotWidths: [...document.images].map((img) => img.getBoundingClientRect().width),
    tableScrolls: getComputedStyle(document.querySelector("#cells").parentElement).overflowX,
    keyPinned: getComputedStyle(document.querySelector("#cells td")).position,
  });
  document.body.appendChild(out);
});
</script>"""


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium)")
def test_html_renders_in_headless_chromium(store_path, tmp_path):
    db, keys = store_path
    write_report(db, tmp_path / "out")
    page = (tmp_path / "out" / "report.html").read_text()
    probe = tmp_path / "probe.html"  # the report plus a script that records what rendered
    probe.write_text(page.replace("</body>", CHECK + "</body>"))
    proc = subprocess.run(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--no-first-run",
            f"--user-data-dir={tmp_path / 'profile'}",
            "--virtual-time-budget=5000",
            "--window-size=900,700",
            "--dump-dom",
            probe.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    found = re.search(r'<pre id="prunekit-check">(.*?)</pre>', proc.stdout, re.S)
    assert found, f"no check output from chromium (exit {proc.returncode}): {proc.stderr[-500:]}"
    check = json.loads(found.group(1).replace("&quot;", '"').replace("&amp;", "&"))
    assert len(check["images"]) == 3
    assert all(
        complete and width > 100 and height > 100 for complete, width, height in check["images"]
    )
    assert sorted(check["rows"]) == sorted(keys) and check["rows"][0] == keys[0]
    assert check["firstMethod"] == "dense"
    # at 900 px the page does not scroll sideways: plots shrink to the page, the cells
    # table scrolls inside its own box with the key column pinned
    assert check["pageWidth"] <= check["viewport"]
    assert all(0 < width <= check["viewport"] for width in check["plotWidths"])
    assert check["tableScrolls"] == "auto" and check["keyPinned"] == "sticky"


def test_monotone_damage_reading():
    from prunekit.bench.knee import is_monotone

    assert is_monotone([0.0, 0.5, 0.3], [0.0, 0.4, 0.1]) is True  # order-free
    assert is_monotone([0.0, 0.3, 0.5], [0.0, 0.2, 0.15]) is False
    assert is_monotone([0.0, 0.3, 0.5], [0.0, 0.2, 0.195], slack=0.01) is True
    assert is_monotone([0.5], [0.1]) is None
