"""A sharded HF folder assembled from blocks streamed to disk (`--offload disk`).

Every pruned block was written by the engine to the offload's staging folder as one
safetensors file; here the embedding, final norm and head go to a first shard, the block
files are moved in as the following shards, and `model.safetensors.index.json` maps
every tensor to its shard, so plain `from_pretrained` loads the folder.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from safetensors.torch import save_file

from prunekit.errors import PrunekitError
from prunekit.models.loading import LoadedModel
from prunekit.models.offload import INDEX_FILE


def write_offloaded(lm: LoadedModel, folder: Path) -> None:
    """Write `lm` (blocks staged on disk) into `folder` as a sharded checkpoint + config."""
    offload = lm.adapter.offload
    missing = offload.missing()
    if missing:
        raise PrunekitError(
            f"blocks {missing[:5]} of this offloaded model were never pruned; nothing to save"
        )
    prefix = offload.prefix
    head = {
        name: t.detach().contiguous()
        for name, t in lm.model.state_dict().items()
        if not name.startswith(prefix)
    }
    if getattr(lm.model.config, "tie_word_embeddings", False):
        head = {k: v for k, v in head.items() if not k.startswith("lm_head.")}
    count = 1 + len(lm.adapter.blocks)
    names = [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]
    save_file(head, str(folder / names[0]), metadata={"format": "pt"})
    weight_map = dict.fromkeys(head, names[0])
    total = sum(t.numel() * t.element_size() for t in head.values())
    for index, name in enumerate(names[1:]):  # a staged block holds `names(index)`
        weight_map.update(dict.fromkeys(offload.names(index), name))
        total += offload.block_bytes(index)
        shutil.move(str(offload.staged(index)), folder / name)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    lm.model.config.save_pretrained(folder)
    if lm.model.generation_config is not None:
        lm.model.generation_config.save_pretrained(folder)
