"""`prunekit bench`: config validation, configuration hashes, the SQLite store, resume
(finished cells never rerun), failed cells retried, and the local / Ray executors, on
the real stories260K with tiny settings."""

from __future__ import annotations

import copy
import importlib.util
import sys

import pytest

import prunekit
from prunekit import cli
from prunekit.bench import LocalExecutor, ResultStore, make_executor, parse_config, run_sweep
from prunekit.bench.config import DENSE
from prunekit.errors import PrunekitError

BASE = {
    "models": ["stories260k"],
    "methods": ["wanda"],
    "sparsities": [0.5],
    "calibration": {"dataset": "tinyshakespeare", "nsamples": 4, "seqlen": 64},
    "evaluation": {"tasks": ["tinyshakespeare"], "seqlen": 128, "limit": 4},
    "execution": {"threads": 1, "batch_size": 4},
}


def _config(**changes):
    raw = copy.deepcopy(BASE)
    raw.update(changes)
    return raw


def _pruned_key(raw, version=None) -> str:
    (cell,) = [c for c in parse_config(raw, version).cells if c.method != DENSE]
    return cell.key


def test_grid_expands_with_shared_dense_baseline():
    raw = _config(
        methods=["magnitude", {"name": "sparsegpt", "options": {"blocksize": 32}}],
        sparsities=[0.3, 0.6],
        patterns=["unstructured", "2:4"],
    )
    cells = parse_config(raw).cells
    # per method: 2 sparsities unstructured + one 2:4 cell (its sparsity is implied)
    assert len(cells) == 1 + 2 * 3
    assert cells[0].method == DENSE and cells[0].calibration is None
    assert sorted(c.sparsity for c in cells if c.pattern == "2:4") == [0.5, 0.5]
    assert len({c.key for c in cells}) == len(cells)
    magnitude = [c for c in cells if c.method == "magnitude"]
    assert all(c.calibration is None for c in magnitude)  # data-free: no calibration in key
    # the dense baseline depends only on the model and the evaluation protocol
    other = parse_config(_config(methods=["magnitude"], sparsities=[0.9], seed=7)).cells[0]
    assert other.key == cells[0].key


def test_impossible_combinations_are_skipped_with_their_reason():
    raw = _config(
        methods=["wanda", "shortgpt"],
        patterns=["unstructured", "2:4"],
        allocations=["uniform", "owl"],
    )
    sweep = parse_config(raw)
    labels = {(c.method, c.pattern, c.allocation) for c in sweep.cells if c.method != DENSE}
    # wanda: unstructured x {uniform, owl} and 2:4 x uniform; shortgpt: unstructured only
    assert labels == {
        ("wanda", "unstructured", "uniform"),
        ("wanda", "unstructured", "owl"),
        ("wanda", "2:4", "uniform"),
        ("shortgpt", "unstructured", "uniform"),
    }
    assert any(
        line.startswith("wanda x 2:4 x owl: a non-uniform allocation") for line in sweep.impossible
    )
    assert any(
        line.startswith("shortgpt x 2:4 x uniform: depth methods") for line in sweep.impossible
    )
    with pytest.raises(PrunekitError, match="no combination of the grid can run"):
        parse_config(_config(methods=["shortgpt"], patterns=["2:4"]))


CHANGES = [
    ("models", ["stories260k-copy"]),
    ("methods", ["magnitude"]),
    ("sparsities", [0.4]),
    ("patterns", ["2:4"]),
    ("scope", "layer"),
    ("propagate", "dense"),
    ("seed", 1),
    ("calibration", {"dataset": "wikitext2", "nsamples": 4, "seqlen": 64}),
    ("calibration", {"dataset": "tinyshakespeare", "nsamples": 8, "seqlen": 64}),
    ("calibration", {"dataset": "tinyshakespeare", "nsamples": 4, "seqlen": 32}),
    ("evaluation", {"tasks": ["wikitext2"], "seqlen": 128, "limit": 4}),
    ("evaluation", {"tasks": ["tinyshakespeare"], "seqlen": 64, "limit": 4}),
    ("evaluation", {"tasks": ["tinyshakespeare"], "seqlen": 128, "limit": 5}),
]


@pytest.mark.parametrize(
    ("key", "value"), CHANGES, ids=[f"{k}-{i}" for i, (k, _) in enumerate(CHANGES)]
)
def test_config_hash_changes_with_every_setting(key, value):
    base = _pruned_key(BASE)
    assert _pruned_key(BASE) == base  # deterministic
    changed = parse_config(_config(**{key: value})).cells
    assert base not in {c.key for c in changed}


def test_config_hash_covers_options_version_and_not_execution():
    base = _pruned_key(BASE)
    options = _config(methods=[{"name": "sparsegpt", "options": {"blocksize": 32}}])
    default = _config(methods=["sparsegpt"])
    assert _pruned_key(options) != _pruned_key(default)
    assert _pruned_key(BASE, version="9.9.9") != base
    faster = _config(execution={"threads": 2, "batch_size": 16, "eval_batch_size": 2})
    assert _pruned_key(faster) == base
    # the same limit written per task is the same protocol
    per_task = _config(evaluation={**BASE["evaluation"], "limit": {"tinyshakespeare": 4}})
    assert _pruned_key(per_task) == base


BAD = [
    ({"sparsity": [0.5]}, "unknown key 'sparsity'"),
    ({"methods": ["nosuch"]}, "methods[0]: unknown method 'nosuch'"),
    ({"methods": [{"name": "wanda", "options": {"bogus": 1}}]}, "unknown option 'bogus'"),
    ({"methods": [{"name": "sparsegpt", "options": {"blocksize": "x"}}]}, "blocksize"),
    ({"sparsities": [1.5]}, "sparsities[0]"),
    ({"sparsities": 0.5}, "sparsities: must be a list"),
    ({"sparsities": ["half"]}, "sparsities[0]: needs a number"),
    ({"patterns": ["5:4"]}, "patterns[0]"),
    ({"allocations": ["nosuch"]}, "allocations[0]: unknown 'nosuch'"),
    ({"calibration": {"nsamples": 0}}, "calibration.nsamples"),
    ({"calibration": {"samples": 4}}, "calibration: unknown key 'samples'"),
    ({"evaluation": {"tasks": ["nosuchtask"]}}, "evaluation.tasks[0]: unknown task 'nosuchtask'"),
    ({"evaluation": {"tasks": ["wikitext2"], "limit": {"ptb": 3}}}, "evaluation.limit"),
    ({"execution": {"threads": "two"}}, "execution.threads"),
    ({"scope": "column"}, "scope"),
    ({"propagate": "sideways"}, "propagate: unknown 'sideways'"),
    ({"models": []}, "models"),
]


@pytest.mark.parametrize(("change", "message"), BAD, ids=[m for _, m in BAD])
def test_bad_config_names_the_key(change, message):
    with pytest.raises(PrunekitError) as info:
        parse_config(_config(**change))
    text = str(info.value)
    assert message in text and "\n" not in text


def test_cli_bad_config_is_one_line(tmp_path, monkeypatch, capsys):
    config = tmp_path / "sweep.yaml"
    config.write_text("models: [stories260k]\nmethods: [wanda]\nsparsities: [2]\n")
    monkeypatch.setattr(
        sys, "argv", ["prunekit", "bench", str(config), "--db", str(tmp_path / "r")]
    )
    with pytest.raises(SystemExit) as info:
        cli.main()
    assert info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: sweep config sparsities[0]: sparsity must be in [0, 1), got 2"
    ]
    assert not (tmp_path / "r").exists()  # nothing created for a bad config


def test_local_executor_runs_a_cell_in_a_fresh_process():
    sweep = parse_config(BASE)
    (cell,) = [c for c in sweep.cells if c.method != DENSE]
    ((done, outcome),) = LocalExecutor().run([cell], sweep.execution)
    assert done is cell and "error" not in outcome
    result = outcome["result"]
    assert result["prune"]["overall_sparsity"] == pytest.approx(0.5, abs=0.01)
    assert outcome["wall_time_s"] > result["timing"]["total_s"] > 0  # start-up included
    assert result["peak_rss_mb"] > 50
    assert result["versions"]["prunekit"] == prunekit.__version__


def test_resume_never_reruns_finished_cells(tmp_path):
    db = tmp_path / "results.sqlite"
    with ResultStore(db) as store:
        first = run_sweep(parse_config(BASE), store, make_executor("inline"))
        assert (first.total, first.skipped, first.ran, first.failed) == (2, 0, 2, [])
        rows = {r.key: r for r in store.rows()}
    dense, pruned = sorted(rows.values(), key=lambda r: r.cell.method != DENSE)
    assert dense.cell.method == DENSE and pruned.cell.method == "wanda"
    assert pruned.prune["overall_sparsity"] == pytest.approx(0.5, abs=0.01)
    ppl = {r.cell.method: r.metrics["tinyshakespeare"]["perplexity"] for r in rows.values()}
    assert ppl["wanda"] > ppl[DENSE]
    for row in rows.values():  # reproducibility facts on every row
        assert row.status == "done" and row.attempts == 1
        assert row.wall_time_s >= row.timing["total_s"] > 0
        assert row.peak_rss_mb > 50
        assert {"prunekit", "torch", "transformers"} <= set(row.versions)
        assert len(row.data_hashes["tinyshakespeare.text_sha256"]) == 64
    assert pruned.cell.seed == 0 and len(pruned.data_hashes["calibration_windows"]) == 64

    # an unchanged sweep runs nothing and leaves the rows as they were
    with ResultStore(db) as store:
        again = run_sweep(parse_config(BASE), store, make_executor("inline"))
        assert (again.skipped, again.ran) == (2, 0)
        assert {r.key: (r.attempts, r.finished_at) for r in store.rows()} == {
            k: (1, r.finished_at) for k, r in rows.items()
        }
        # a larger grid runs only its new cell: dense baseline and 50 % are reused
        bigger = run_sweep(
            parse_config(_config(sparsities=[0.3, 0.5])), store, make_executor("inline")
        )
        assert (bigger.total, bigger.skipped, bigger.ran) == (3, 2, 1)
        after = store.rows()
    assert len(after) == 3
    assert all(r.attempts == 1 for r in after)
    assert {r.cell.sparsity for r in after if r.cell.method == "wanda"} == {0.3, 0.5}


def test_cell_finished_by_another_sweep_is_skipped(tmp_path):
    db = tmp_path / "r.sqlite"
    sweep = parse_config(_config(methods=["magnitude"], sparsities=[0.3, 0.5]))
    inline = make_executor("inline")

    class AnotherSweepFinishesTheLastCell:
        """Runs the cells inline; once the first has started, a second `bench` process
        sharing the store records the last cell as done."""

        def run(self, cells, execution, on_start=None):
            cells = iter(cells)
            first = next(cells)
            with ResultStore(db) as other:
                other.put(sweep.cells[-1], {"result": {"metrics": {}}, "wall_time_s": 1.0})
            yield from inline.run([first, *cells], execution)

    with ResultStore(db) as store:
        summary = run_sweep(sweep, store, AnotherSweepFinishesTheLastCell())
        assert (summary.total, summary.ran, summary.skipped) == (3, 2, 1)
        assert all(r.attempts == 1 for r in store.rows())


def test_failed_cell_is_recorded_and_retried(tmp_path):
    # 3:7 needs input widths divisible by 7; stories260K has 64: the cell fails cleanly
    raw = _config(methods=["magnitude"], patterns=["3:7"], sparsities=[])
    with ResultStore(tmp_path / "r.sqlite") as store:
        summary = run_sweep(parse_config(raw), store, make_executor("inline"))
        assert summary.ran == 2 and len(summary.failed) == 1
        assert "divisible by 7" in summary.failed[0]
        (failed,) = store.rows("failed")
        assert failed.attempts == 1 and "PrunekitError" in failed.error
        retry = run_sweep(parse_config(raw), store, make_executor("inline"))
        assert (retry.skipped, retry.ran) == (1, 1)  # dense kept, failed cell rerun
        assert store.rows("failed")[0].attempts == 2


@pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="ray is not installed")
def test_ray_executor_runs_each_cell_as_a_task(tmp_path):
    raw = _config(methods=["magnitude"], sparsities=[0.5], dense=False)
    with ResultStore(tmp_path / "r.sqlite") as store:
        try:
            summary = run_sweep(parse_config(raw), store, make_executor("ray", num_cpus=1))
        except PrunekitError as err:  # a machine too loaded for Ray's start-up deadlines
            if "timed out during startup" not in str(err):
                raise
            pytest.skip(f"Ray could not start a local node here: {err}")
        assert (summary.ran, summary.failed) == (1, [])
        (row,) = store.rows()
    assert row.cell.method == "magnitude" and row.peak_rss_mb > 50
    assert row.prune["overall_sparsity"] == pytest.approx(0.5, abs=0.01)


def test_unknown_executor_is_one_line():
    with pytest.raises(PrunekitError, match="unknown executor 'dask'; valid: local, inline, ray"):
        make_executor("dask")
