"""GGUF export of Llama-architecture models for llama.cpp, written with the `gguf` package.

The layout follows llama.cpp's `convert_hf_to_gguf.py` for `LlamaForCausalLM`: tensor
names `token_embd`, `blk.N.{attn_norm, attn_q, attn_k, attn_v, attn_output, ffn_norm,
ffn_gate, ffn_up, ffn_down}`, `output_norm`, `output` (omitted when tied), the q and k
rows permuted from Hugging Face's rotary layout to llama.cpp's, and the hyper-parameters
under `llama.*`. The tokenizer is written as a GPT-2 style byte-level BPE (`tokenizer.ggml.
model = gpt2`: tokens, token types, merges, special ids). A depth-pruned model is simply
a model with fewer blocks. A width-pruned model with different widths per block is
written as llama.cpp's `deci` architecture (the Llama layout of Nemotron's NAS models),
whose head counts and feed-forward lengths are per-block arrays; its tensors are named
as Llama's and each block's q / k rows are permuted with that block's head counts.

Weights: `f32`, `f16`, `bf16` or `q8_0` (norms stay float32, as the converter keeps them);
a matrix whose rows q8_0's 32-value blocks do not divide (a pruned width such as 1389) is
written in f16, as llama.cpp's converter falls back.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

from prunekit.errors import PrunekitError
from prunekit.models.loading import LoadedModel

QUANTS = ("f32", "f16", "bf16", "q8_0")
FILE_TYPES = {"f32": 0, "f16": 1, "q8_0": 7, "bf16": 32}
ROLES = {
    "q": "attn_q",
    "k": "attn_k",
    "v": "attn_v",
    "o": "attn_output",
    "gate": "ffn_gate",
    "up": "ffn_up",
    "down": "ffn_down",
}


BIASED = ("o", "down")  # llama.cpp reads optional attn_output / ffn_down biases


def check_exportable(lm: LoadedModel, quant: str) -> None:
    """One-line refusals: not Llama, biases other than o / down, low-rank factors, an
    unknown quant."""
    if quant not in QUANTS:
        raise PrunekitError(f"unknown --quant {quant!r}; valid: {', '.join(QUANTS)}")
    config = lm.model.config
    if config.model_type != "llama":
        raise PrunekitError(f"GGUF export covers Llama models; this is {config.model_type}")
    for block in lm.adapter.blocks:
        for role in ROLES:
            module = lm.adapter.linear(block, role)
            if not isinstance(module, torch.nn.Linear):
                raise PrunekitError("GGUF export needs plain linears (no low-rank factors)")
            if module.bias is not None and role not in BIASED:
                raise PrunekitError(
                    f"GGUF export writes biases on o and down only (FLAP's compensation); "
                    f"this model has a {role} bias"
                )
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if rope.get("rope_type", "default") != "default":
        raise PrunekitError(
            f"GGUF export writes plain rotary embeddings; this model uses {rope['rope_type']}"
        )
    if lm.tokenizer is None or not getattr(lm.tokenizer, "is_fast", False):
        raise PrunekitError("GGUF export needs the model's fast tokenizer (tokenizer.json)")
    model = json.loads(lm.tokenizer.backend_tokenizer.to_str())["model"]
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        raise PrunekitError(
            "GGUF export writes byte-level BPE tokenizers (GPT-2 style); this tokenizer is "
            f"{model.get('type')}{' with byte fallback' if model.get('byte_fallback') else ''}"
        )


def rope_theta(config) -> float:
    """The rotary base: `rope_parameters["rope_theta"]` (transformers 5) or `rope_theta`."""
    parameters = getattr(config, "rope_parameters", None) or {}
    return float(parameters.get("rope_theta") or getattr(config, "rope_theta", None) or 1e4)


def permute_rotary(weight: np.ndarray, heads: int) -> np.ndarray:
    """Hugging Face's rotary row order -> llama.cpp's (the converter's `permute`)."""
    return (
        weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


def _tensor(weight: torch.Tensor, quant: str):
    """(array, raw dtype or None) for the writer."""
    import gguf

    data = weight.detach().float().numpy()
    if quant == "f32" or data.ndim == 1:
        return data.astype(np.float32), None
    if quant == "f16":
        return data.astype(np.float16), None
    kind = {"bf16": gguf.GGMLQuantizationType.BF16, "q8_0": gguf.GGMLQuantizationType.Q8_0}
    try:
        return gguf.quants.quantize(data, kind[quant]), kind[quant]
    except gguf.quants.QuantError:  # rows not a multiple of the block (pruned widths): f16, as the
        return data.astype(np.float16), None  # converter falls back


def _tokenizer(writer, tokenizer) -> None:
    import gguf

    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    vocab = spec["model"]["vocab"]
    tokens = [""] * len(vocab)
    for token, index in vocab.items():
        tokens[index] = token
    special = {t["id"] for t in spec.get("added_tokens", []) if t.get("special")}
    for added in spec.get("added_tokens", []):
        if added["id"] >= len(tokens):
            tokens.extend([""] * (added["id"] + 1 - len(tokens)))
        tokens[added["id"]] = added["content"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    types = [
        gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL
        for i in range(len(tokens))
    ]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for name, value in (
        ("bos", tokenizer.bos_token_id),
        ("eos", tokenizer.eos_token_id),
        ("unk", tokenizer.unk_token_id),
        ("pad", tokenizer.pad_token_id),
    ):
        if value is not None:
            getattr(writer, f"add_{name}_token_id")(int(value))
    writer.add_add_bos_token(False)


def block_shapes(lm: LoadedModel) -> dict[str, list[int]]:
    """Per block: query heads, KV heads and feed-forward length, from the weights."""
    adapter, hd = lm.adapter, lm.adapter.head_dim
    return {
        "heads": [adapter.linear(b, "q").weight.shape[0] // hd for b in adapter.blocks],
        "kv_heads": [adapter.linear(b, "k").weight.shape[0] // hd for b in adapter.blocks],
        "ffn": [adapter.linear(b, "up").weight.shape[0] for b in adapter.blocks],
    }


def export_gguf(lm: LoadedModel, out: str | Path, quant: str = "f16") -> Path:
    """Write `lm` as a GGUF file at `out` (atomically: a temporary name, then renamed):
    architecture `llama` when every block has the same widths, else `deci`."""
    import gguf

    check_exportable(lm, quant)
    out = Path(out)
    config, adapter = lm.model.config, lm.adapter
    shapes = block_shapes(lm)
    uniform = all(len(set(values)) == 1 for values in shapes.values())
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    writer = gguf.GGUFWriter(str(tmp), "llama" if uniform else "deci")
    try:

        def widths(kind: str) -> int | list[int]:
            return shapes[kind][0] if uniform else shapes[kind]

        writer.add_name(Path(str(lm.source)).name or "prunekit")
        writer.add_block_count(len(adapter.blocks))
        writer.add_context_length(int(config.max_position_embeddings))
        writer.add_embedding_length(int(config.hidden_size))
        writer.add_feed_forward_length(widths("ffn"))
        writer.add_head_count(widths("heads"))
        writer.add_head_count_kv(widths("kv_heads"))
        writer.add_rope_dimension_count(int(adapter.head_dim))
        writer.add_key_length(int(adapter.head_dim))
        writer.add_value_length(int(adapter.head_dim))
        writer.add_rope_freq_base(rope_theta(config))
        writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
        writer.add_vocab_size(int(config.vocab_size))
        writer.add_file_type(FILE_TYPES[quant])
        _tokenizer(writer, lm.tokenizer)
        model = lm.model
        tensors = {"token_embd.weight": model.get_input_embeddings().weight}
        for i, block in enumerate(adapter.blocks):
            tensors[f"blk.{i}.attn_norm.weight"] = block.input_layernorm.weight
            tensors[f"blk.{i}.ffn_norm.weight"] = block.post_attention_layernorm.weight
            for role, name in ROLES.items():
                weight = adapter.linear(block, role).weight.detach().float()
                if role in ("q", "k"):
                    count = shapes["heads" if role == "q" else "kv_heads"][i]
                    weight = torch.from_numpy(permute_rotary(weight.numpy(), count))
                tensors[f"blk.{i}.{name}.weight"] = weight
                bias = adapter.linear(block, role).bias
                if bias is not None:
                    tensors[f"blk.{i}.{name}.bias"] = bias
        tensors["output_norm.weight"] = model.model.norm.weight
        head = model.get_output_embeddings().weight
        if not getattr(config, "tie_word_embeddings", False):
            tensors["output.weight"] = head
        for name, weight in tensors.items():
            data, raw = _tensor(weight, "f32" if "norm" in name or "bias" in name else quant)
            if raw is None:
                writer.add_tensor(name, data)
            else:
                writer.add_tensor(name, data, raw_dtype=raw)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, out)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    return out
