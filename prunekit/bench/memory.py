"""Per-cell peak memory: Linux lets a process reset its peak RSS (VmHWM), so a cell's peak
is measured from its start even when several cells share one process."""

from __future__ import annotations

import re
from pathlib import Path

from prunekit.export.record import peak_rss_mb

STATUS = Path("/proc/self/status")
CLEAR_REFS = Path("/proc/self/clear_refs")


def reset_peak_rss() -> bool:
    """Set this process's peak RSS to its current RSS; False where the OS cannot."""
    try:
        CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return True


def cell_peak_rss_mb() -> float:
    """Peak resident memory (MiB) since the last reset (VmHWM), else of the whole process."""
    try:
        found = re.search(r"VmHWM:\s+(\d+)\s+kB", STATUS.read_text())
    except OSError:
        found = None
    return int(found.group(1)) / 1024 if found else peak_rss_mb()
