"""Allocations: how a mean sparsity is spread over the blocks (`--allocation SPEC`).

`base.py` holds the `Allocation` class, the registry and `allocate`; every other module
here is one allocation and registers itself on import. Allocations may import the engine,
models and the method request; methods never import an allocation.
"""

import importlib
import pkgutil

from prunekit.allocations.base import (
    ALLOCATIONS,
    Allocated,
    Allocation,
    AllocationConfig,
    allocate,
    get_allocation,
    register_allocation,
)

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = [
    "ALLOCATIONS",
    "Allocated",
    "Allocation",
    "AllocationConfig",
    "allocate",
    "get_allocation",
    "register_allocation",
]
