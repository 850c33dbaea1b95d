"""This process's memory, as the records and benchmarks report it (Linux /proc; portable
fallbacks where it is missing)."""

from __future__ import annotations

import os
import re
import resource
from pathlib import Path

STATUS = Path("/proc/self/status")
CLEAR_REFS = Path("/proc/self/clear_refs")


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (MiB; Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def resident_bytes() -> int:
    """This process's resident memory now (0 where /proc is missing)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return 0
    return pages * os.sysconf("SC_PAGE_SIZE")


def reset_peak_rss() -> bool:
    """Set this process's peak RSS (VmHWM) to its current RSS, so a step's peak is measured
    from its start even when several steps share one process; False where the OS cannot."""
    try:
        CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return True


def step_peak_rss_mb() -> float:
    """Peak resident memory (MiB) since the last reset (VmHWM), else of the whole process."""
    try:
        found = re.search(r"VmHWM:\s+(\d+)\s+kB", STATUS.read_text())
    except OSError:
        found = None
    return int(found.group(1)) / 1024 if found else peak_rss_mb()
