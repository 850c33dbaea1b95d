"""Distillation from the dense model with one model in memory at a time.

`cache_teacher` runs the teacher once over the training batches and stores, per batch,
its top-k next-token logits (values and vocabulary indices) and, optionally, the outputs
of chosen blocks, as safetensors files; the student then reads them step by step.
`kd_loss` is the KL divergence from the teacher's top-k distribution (renormalised over
its k tokens at temperature T) to the student's, times T² (Hinton et al.).
"""

from __future__ import annotations

import gc
import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from prunekit.models.loading import load_model
from prunekit.progress import progress as tqdm

DONE_FILE = "complete.json"


def cache_key(source: str, batches: list[torch.Tensor], top_k: int, blocks: list[int]) -> str:
    """A name for the cache of `source` over `batches` (content hash)."""
    digest = hashlib.sha256(json.dumps([source, top_k, blocks]).encode())
    for batch in batches:
        digest.update(batch.numpy().tobytes())
    return digest.hexdigest()[:16]


def block_outputs(blocks: list[nn.Module], indices: list[int]) -> tuple[dict, Callable]:
    """Forward hooks storing the hidden output of `blocks[i]` for i in `indices` into the
    returned dict (block index -> [B, L, H]); call the returned function to remove them."""
    store: dict[int, torch.Tensor] = {}

    def hook(index: int):
        def fn(module: nn.Module, args: tuple, output) -> None:
            store[index] = output[0] if isinstance(output, tuple) else output

        return fn

    handles = [blocks[i].register_forward_hook(hook(i)) for i in indices]
    return store, lambda: [h.remove() for h in handles]


def cache_teacher(
    source: str,
    batches: list[torch.Tensor],
    top_k: int,
    folder: Path,
    blocks: list[int] | None = None,
    dtype: str = "float32",
) -> Path:
    """Write the teacher's top-k logits (and block outputs) for every batch under
    `folder/<key>/` unless already complete; returns that directory."""
    blocks = blocks or []
    target = folder / cache_key(source, batches, top_k, blocks)
    if (target / DONE_FILE).exists():
        return target
    target.mkdir(parents=True, exist_ok=True)
    lm = load_model(source, dtype=dtype)
    lm.model.eval()
    store, remove = block_outputs(list(lm.adapter.blocks), blocks)
    try:
        with torch.no_grad():
            for i, batch in enumerate(tqdm(batches, desc="teacher logits", leave=False)):
                logits = lm.model(input_ids=batch, use_cache=False).logits.float()
                values, indices = logits.topk(top_k, dim=-1)
                tensors = {"values": values.contiguous(), "indices": indices.int().contiguous()}
                tensors |= {f"block.{b}": store[b].float().contiguous() for b in blocks}
                save_file(tensors, str(target / f"{i:06d}.safetensors"))
    finally:
        remove()
        del lm
        gc.collect()
    (target / DONE_FILE).write_text(json.dumps({"source": source, "batches": len(batches)}))
    return target


def read_batch(cache: Path, index: int) -> dict[str, torch.Tensor]:
    """The teacher tensors of batch `index`."""
    return load_file(str(cache / f"{index:06d}.safetensors"))


def kd_loss(
    student_logits: torch.Tensor, values: torch.Tensor, indices: torch.Tensor, temperature: float
) -> torch.Tensor:
    """KL(teacher top-k ‖ student) per token, averaged, times T². Logits [B, L, V]; teacher
    `values`/`indices` [B, L, k]."""
    teacher = F.log_softmax(values / temperature, dim=-1)
    student = F.log_softmax(student_logits.float() / temperature, dim=-1)
    student = student.gather(-1, indices.long())
    kl = (teacher.exp() * (teacher - student)).sum(-1)
    return kl.mean() * temperature**2


def matched_blocks(kept: list[int] | None, num_student: int, num_teacher: int) -> list[int]:
    """Teacher block whose output student block i should reproduce: the same block when
    no block was removed; for a depth-pruned student, the last teacher block before the
    next kept one (student block i replaced teacher blocks kept[i]..kept[i+1]-1)."""
    if kept is None:
        return list(range(num_student))
    return [kept[i + 1] - 1 for i in range(num_student - 1)] + [num_teacher - 1]
