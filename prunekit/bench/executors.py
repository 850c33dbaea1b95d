"""Executors: how pending cells run.

- `local` (default): one after another, each in a fresh Python process;
- `inline`: one after another in this process (no start-up cost: for tiny models; the
  per-cell peak memory needs Linux's peak reset);
- `ray`: each cell a Ray task in a fresh Ray worker process.
"""

from __future__ import annotations

import ctypes
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import prunekit
from prunekit.bench.cell import error_line, run_outcome, run_outcome_from_dicts
from prunekit.bench.config import Cell, Execution
from prunekit.errors import choice_error
from prunekit.export.folder import process_alive
from prunekit.process_memory import reset_peak_rss

Outcome = dict[str, Any]  # {"result": {...}} or {"error": "..."}, plus "wall_time_s"
OnStart = Callable[[Cell | None], None] | None  # told when a cell starts (None: all at once)


def _worker_env() -> dict[str, str]:
    """This environment, with the folder holding this `prunekit` first on PYTHONPATH."""
    env = dict(os.environ)
    root = str(Path(prunekit.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    return env


CELL_PREFIX = "prunekit-cell-"  # + the bench's PID: a worker's job folder in the temp dir
PR_SET_PDEATHSIG = 1  # prctl option: the signal a process gets when its parent dies


def remove_stale_cell_folders() -> None:
    """Remove the job folders of benches that no longer run (killed mid-cell)."""
    for path in Path(tempfile.gettempdir()).glob(f"{CELL_PREFIX}*"):
        pid = path.name[len(CELL_PREFIX) :].partition("-")[0]
        if pid.isdigit() and not process_alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)


def _die_with_parent() -> None:
    """In the worker, before it starts: be killed when the bench process dies (Linux)."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
    except OSError:  # not Linux: the worker finishes its cell on its own
        return
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def run_in_subprocess(cell_dict: dict, execution_dict: dict) -> Outcome:
    """Run one cell in `python -m prunekit.bench.worker`; wall time includes start-up."""
    with tempfile.TemporaryDirectory(prefix=f"{CELL_PREFIX}{os.getpid()}-") as tmp:
        job, out = Path(tmp) / "job.json", Path(tmp) / "out.json"
        job.write_text(json.dumps({"cell": cell_dict, "execution": execution_dict}))
        start = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, "-m", "prunekit.bench.worker", str(job), str(out)],
            env=_worker_env(),
            stdin=subprocess.DEVNULL,
            check=False,
            preexec_fn=_die_with_parent,
        )
        wall = time.perf_counter() - start
        if out.exists():
            outcome = json.loads(out.read_text())
        else:
            outcome = {"error": f"worker process exited with code {proc.returncode}"}
    outcome["wall_time_s"] = wall
    return outcome


class LocalExecutor:
    """Cells one after another on this machine, each in its own process."""

    name = "local"

    def run(
        self, cells: Iterable[Cell], execution: Execution, on_start: OnStart = None
    ) -> Iterator[tuple[Cell, Outcome]]:
        execution_dict = dataclasses.asdict(execution)
        remove_stale_cell_folders()
        for cell in cells:
            if on_start:
                on_start(cell)
            yield cell, run_in_subprocess(cell.as_dict(), execution_dict)


class InlineExecutor:
    """Cells one after another in this process; each cell's peak RSS is reset first."""

    name = "inline"

    def __init__(self) -> None:
        if not reset_peak_rss():
            raise prunekit.PrunekitError(
                "executor 'inline' needs Linux's /proc/self/clear_refs to measure each "
                "cell's peak memory; use executor 'local'"
            )

    def run(
        self, cells: Iterable[Cell], execution: Execution, on_start: OnStart = None
    ) -> Iterator[tuple[Cell, Outcome]]:
        for cell in cells:
            if on_start:
                on_start(cell)
            outcome = run_outcome(cell, execution)
            yield cell, outcome


class RayExecutor:
    """Each cell a Ray task in a fresh Ray worker process (`max_calls=1`); results are
    stored as they complete.

    `address=None` starts a local Ray instance; otherwise connects to that cluster.
    """

    name = "ray"

    def __init__(self, address: str | None = None, num_cpus: int | None = None):
        try:
            import ray
        except ImportError:
            raise prunekit.PrunekitError(
                "executor 'ray' needs the ray package: pip install 'prunekit[ray]'"
            ) from None
        self.ray = ray
        self.address = address
        self.num_cpus = num_cpus

    def run(
        self, cells: Iterable[Cell], execution: Execution, on_start: OnStart = None
    ) -> Iterator[tuple[Cell, Outcome]]:
        ray = self.ray
        started_here = not ray.is_initialized()
        if started_here:
            env = _worker_env()
            env_vars = {k: env[k] for k in ("PYTHONPATH", "PRUNEKIT_DATA_DIR") if k in env}
            kwargs: dict[str, Any] = {"runtime_env": {"env_vars": env_vars}}
            if self.address is None:
                kwargs |= {"num_cpus": self.num_cpus, "include_dashboard": False}
            try:
                ray.init(address=self.address, log_to_driver=True, **kwargs)
            except Exception as err:  # noqa: BLE001 - Ray's start-up failures are many
                raise prunekit.PrunekitError(
                    f"could not start or reach Ray: {error_line(err)}"
                ) from err
        try:
            task = ray.remote(num_cpus=execution.threads, max_calls=1)(run_outcome_from_dicts)
            execution_dict = dataclasses.asdict(execution)
            pending = {task.remote(c.as_dict(), execution_dict): c for c in cells}
            if on_start:
                on_start(None)
            while pending:
                done, _ = ray.wait(list(pending), num_returns=1)
                cell = pending.pop(done[0])
                yield cell, ray.get(done[0])
        finally:
            if started_here:
                ray.shutdown()


EXECUTORS = ("local", "inline", "ray")


def make_executor(name: str, address: str | None = None, num_cpus: int | None = None):
    """The executor called `name`; `address`/`num_cpus` configure Ray."""
    if name == "local":
        return LocalExecutor()
    if name == "inline":
        return InlineExecutor()
    if name == "ray":
        return RayExecutor(address, num_cpus)
    raise choice_error("executor", name, EXECUTORS)
