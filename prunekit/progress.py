"""Progress bars for long work (per block, per method, per task, per step).

On a terminal they are tqdm's bars. In a log (CI, `| tee`, a file) each update is one
readable line, at most one per `LOG_INTERVAL_S` seconds, instead of one long line of
carriage returns.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from tqdm.auto import tqdm

LOG_INTERVAL_S = 15.0


class _LineWriter:
    """A file for tqdm that turns each carriage-return refresh into a line of its own."""

    def write(self, text: str) -> None:
        line = text.replace("\r", "").strip()
        if line:
            sys.stderr.write(line + "\n")

    def flush(self) -> None:
        sys.stderr.flush()


def progress(iterable: Any = None, **kwargs: Any) -> tqdm:
    """`tqdm(iterable, **kwargs)`, one line per update when stderr is not a terminal; under
    torchrun only rank 0 shows progress."""
    kwargs.setdefault("disable", os.environ.get("RANK", "0") != "0")
    if not sys.stderr.isatty() and "file" not in kwargs:
        kwargs = {
            "file": _LineWriter(),
            "mininterval": LOG_INTERVAL_S,
            "ascii": True,
            "dynamic_ncols": False,
            "ncols": 100,
            **kwargs,
        }
    return tqdm(iterable, **kwargs)
