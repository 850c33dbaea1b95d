"""Per-block sparsities read from a JSON file: `{"0": 0.45, "1": 0.5, ...}`.

Keys are block indices (every block exactly once), values ratios in [0, 1). The mean
of the file is recorded; it is the run's real mean sparsity, whatever `--sparsity` said.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from prunekit.allocations.base import Allocated, Allocation, AllocationConfig, register_allocation
from prunekit.errors import PrunekitError, read_text
from prunekit.methods.base import PruneRequest
from prunekit.models.loading import LoadedModel


@dataclass
class FileConfig(AllocationConfig):
    path: str = ""  # JSON file of block index -> sparsity


def read_ratios(path: str | Path, blocks: int) -> list[float]:
    """Ratios of blocks 0..blocks-1 from a JSON object of index -> ratio, validated."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise PrunekitError(f"allocation file not found: {path}")
    try:
        data = json.loads(read_text(path, "allocation file"))
    except json.JSONDecodeError as err:
        raise PrunekitError(f"allocation file {path} is not valid JSON ({err.msg})") from None
    if not isinstance(data, dict):
        raise PrunekitError(f"allocation file {path} must hold an object of block index -> ratio")
    ratios: dict[int, float] = {}
    for key, value in data.items():
        if not str(key).strip().isdigit():
            raise PrunekitError(f"allocation file {path}: key {key!r} is not a block index")
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise PrunekitError(f"allocation file {path}: block {key} ratio {value!r} is no number")
        if not 0.0 <= value < 1.0:
            raise PrunekitError(f"allocation file {path}: block {key} ratio {value} not in [0, 1)")
        ratios[int(key)] = float(value)
    if sorted(ratios) != list(range(blocks)):
        raise PrunekitError(
            f"allocation file {path} must give every block 0..{blocks - 1} exactly once; "
            f"it has {len(ratios)} entries ({sorted(ratios)[:5]}...)"
        )
    return [ratios[i] for i in range(blocks)]


@register_allocation
class FileAllocation(Allocation):
    name = "file"
    summary = "per-block sparsities from a JSON file (file:PATH.json)"
    Config = FileConfig

    @classmethod
    def from_argument(cls, argument: str) -> FileAllocation:
        if not argument:
            raise PrunekitError("allocation file needs a path: file:PATH.json")
        return cls(FileConfig(path=argument))

    @property
    def spec(self) -> str:
        return f"file:{self.config.path}"

    def allocate(
        self, lm: LoadedModel, calib: torch.Tensor | None, request: PruneRequest
    ) -> Allocated:
        ratios = read_ratios(self.config.path, lm.adapter.num_layers)
        mean = sum(ratios) / len(ratios)
        if abs(mean - request.sparsity) > 1e-6:
            warnings.warn(
                f"allocation file mean sparsity {mean:.6f} differs from the requested "
                f"{request.sparsity}; the file's ratios are used as given",
                stacklevel=2,
            )
        return Allocated(ratios, {"file": str(Path(self.config.path).expanduser().resolve())})
