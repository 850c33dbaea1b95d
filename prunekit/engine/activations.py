"""Where the sequential engine keeps the calibration activations [n, L, H].

In memory by default. With a spill folder (`DiskBlocks.activations`, set when
`--max-memory` cannot hold them) the buffer is a shared memory map of a file in that
folder: the kernel writes its pages to disk and drops them under memory pressure, so the
activations no longer need to fit in RAM. The file is unlinked as soon as it is mapped,
so nothing is left on disk when the buffer is freed (or the process ends).
"""

from __future__ import annotations

import math
import os
import uuid
from pathlib import Path

import torch


def activation_buffer(
    shape: tuple[int, ...], dtype: torch.dtype, spill: Path | None
) -> torch.Tensor:
    """An uninitialised CPU tensor of `shape`, file-backed in `spill` when given."""
    if spill is None:
        return torch.empty(shape, dtype=dtype)
    spill.mkdir(parents=True, exist_ok=True)
    path = spill / f"activations-{os.getpid()}-{uuid.uuid4().hex[:8]}.bin"
    buffer = torch.from_file(str(path), shared=True, size=math.prod(shape), dtype=dtype)
    path.unlink()  # the mapping stays valid; the space is released with the buffer
    return buffer.view(shape)
