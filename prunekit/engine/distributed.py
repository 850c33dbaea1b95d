"""Many processes (torchrun): the calibration windows split across ranks, statistics merged.

With a `torch.distributed` process group, every rank runs each block on its share of the
calibration windows (`shard_windows`), and the collectors are merged across ranks before a
method reads them (`Collector.merge_ranks`): sums of ‖X_j‖² and of XᵀX are all-reduced,
means and variances are merged exactly (Chan et al.) in rank order. Every rank then holds
the same statistics. Per-linear work (a mask, a SparseGPT or ADMM solve) is assigned to
ranks by cost (`assign_by_cost`) and each result broadcast from its owner; block-level
work runs on every rank. All ranks end with the same model; rank 0 writes it. Works with
gloo on CPU and NCCL on GPUs (one device per rank).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist

from prunekit.errors import PrunekitError


def world() -> tuple[int, int]:
    """(rank, world size); (0, 1) without a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main() -> bool:
    return world()[0] == 0


def init_from_environment(device: str) -> str:
    """Join the process group torchrun describes in the environment (no-op without it);
    returns the device this rank computes on (`cuda:LOCAL_RANK` for CUDA)."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1 or (dist.is_available() and dist.is_initialized()):
        return device
    cuda = device.startswith("cuda")
    if cuda:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        torch.cuda.set_device(device)
    dist.init_process_group(backend="nccl" if cuda else "gloo")
    return device


def shard_windows(windows: torch.Tensor) -> torch.Tensor:
    """This rank's calibration windows [n / ranks, L]: every ranks-th window."""
    rank, size = world()
    if size == 1:
        return windows
    if windows.shape[0] < size:
        raise PrunekitError(
            f"{size} processes need at least {size} calibration windows, got "
            f"{windows.shape[0]}; valid: --nsamples >= {size}"
        )
    return windows[rank::size]


@contextmanager
def _collective() -> Iterator[None]:
    """A failed collective (a peer process ended) becomes one clear line."""
    try:
        yield
    except (RuntimeError, dist.DistBackendError) as err:
        raise PrunekitError(
            f"a process of the distributed job ended ({type(err).__name__}); stopping, "
            "nothing written"
        ) from err


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum `tensor` over ranks in place (on the group's device)."""
    with _collective():
        moved = tensor.to(_group_device())
        dist.all_reduce(moved)
    tensor.copy_(moved.to(tensor.device))
    return tensor


def all_gather(tensor: torch.Tensor) -> list[torch.Tensor]:
    """`tensor` from every rank, in rank order."""
    with _collective():
        moved = tensor.to(_group_device())
        parts = [torch.empty_like(moved) for _ in range(world()[1])]
        dist.all_gather(parts, moved)
    return [p.to(tensor.device) for p in parts]


def broadcast(tensor: torch.Tensor, src: int) -> torch.Tensor:
    """Overwrite `tensor` on every rank with rank `src`'s values (in place)."""
    with _collective():
        moved = tensor.to(_group_device())
        dist.broadcast(moved, src)
    if moved is not tensor:
        tensor.copy_(moved.to(tensor.device))
    return tensor


def gather_objects(obj: object) -> list:
    """A picklable `obj` from every rank, in rank order."""
    with _collective():
        out = [None] * world()[1]
        dist.all_gather_object(out, obj)
    return out


def assign_by_cost(costs: dict[str, float], ranks: int) -> dict[str, int]:
    """Each job to a rank, largest cost first onto the least-loaded rank (LPT): the same
    answer on every rank."""
    load = [0.0] * ranks
    owner = {}
    for name in sorted(costs, key=lambda k: (-costs[k], k)):
        rank = min(range(ranks), key=lambda r: (load[r], r))
        owner[name] = rank
        load[rank] += costs[name]
    return owner


def barrier() -> None:
    if world()[1] > 1:
        with _collective():
            dist.barrier()


def _group_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
