"""The architecture families prunekit supports, each as a FamilySpec."""

from __future__ import annotations

from torch import nn

from prunekit.errors import PrunekitError
from prunekit.models.adapter import FamilySpec, ModelAdapter

_LLAMA_LINEARS = {
    "q": "self_attn.q_proj",
    "k": "self_attn.k_proj",
    "v": "self_attn.v_proj",
    "o": "self_attn.o_proj",
    "gate": "mlp.gate_proj",
    "up": "mlp.up_proj",
    "down": "mlp.down_proj",
}
_LLAMA_NORMS = {"attn": "input_layernorm", "mlp": "post_attention_layernorm"}

FAMILIES: tuple[FamilySpec, ...] = (
    FamilySpec(
        model_types=("llama", "mistral", "qwen2", "qwen3"),
        blocks="model.layers",
        final_norm="model.norm",
        embed="model.embed_tokens",
        linears=_LLAMA_LINEARS,
        norms=_LLAMA_NORMS,
    ),
    FamilySpec(  # mixture of experts: attention linears as Llama's, experts in `mlp`
        model_types=("mixtral", "qwen2_moe", "qwen3_moe", "olmoe"),
        blocks="model.layers",
        final_norm="model.norm",
        embed="model.embed_tokens",
        linears={role: _LLAMA_LINEARS[role] for role in ("q", "k", "v", "o")},
        norms=_LLAMA_NORMS,
        moe="mlp",
    ),
    FamilySpec(
        model_types=("gemma",),
        blocks="model.layers",
        final_norm="model.norm",
        embed="model.embed_tokens",
        linears=_LLAMA_LINEARS,
        norms=_LLAMA_NORMS,
        norm_kind="rms_offset",
    ),
    FamilySpec(
        model_types=("gemma2", "gemma3_text"),
        blocks="model.layers",
        final_norm="model.norm",
        embed="model.embed_tokens",
        linears=_LLAMA_LINEARS,
        norms={**_LLAMA_NORMS, "mlp": "pre_feedforward_layernorm"},
        norm_kind="rms_offset",
        output_norms=True,
    ),
    FamilySpec(
        model_types=("phi3",),
        blocks="model.layers",
        final_norm="model.norm",
        embed="model.embed_tokens",
        linears={
            "qkv": "self_attn.qkv_proj",
            "o": "self_attn.o_proj",
            "gate_up": "mlp.gate_up_proj",
            "down": "mlp.down_proj",
        },
        norms=_LLAMA_NORMS,
        qkv_layout="stacked",
        heads_removable=False,
    ),
    FamilySpec(
        model_types=("opt",),
        blocks="model.decoder.layers",
        final_norm="model.decoder.final_layer_norm",
        embed="model.decoder.embed_tokens",
        linears={
            "q": "self_attn.q_proj",
            "k": "self_attn.k_proj",
            "v": "self_attn.v_proj",
            "o": "self_attn.out_proj",
            "up": "fc1",
            "down": "fc2",
        },
        norms={"attn": "self_attn_layer_norm", "mlp": "final_layer_norm"},
        glu=False,
        norm_kind="layer",
    ),
    FamilySpec(
        model_types=("gpt_neox",),
        blocks="gpt_neox.layers",
        final_norm="gpt_neox.final_layer_norm",
        embed="gpt_neox.embed_in",
        linears={
            "qkv": "attention.query_key_value",
            "o": "attention.dense",
            "up": "mlp.dense_h_to_4h",
            "down": "mlp.dense_4h_to_h",
        },
        norms={"attn": "input_layernorm", "mlp": "post_attention_layernorm"},
        glu=False,
        norm_kind="layer",
        qkv_layout="per_head",
    ),
    FamilySpec(
        model_types=("gpt2",),
        blocks="transformer.h",
        final_norm="transformer.ln_f",
        embed="transformer.wte",
        linears={"qkv": "attn.c_attn", "o": "attn.c_proj", "up": "mlp.c_fc", "down": "mlp.c_proj"},
        norms={"attn": "ln_1", "mlp": "ln_2"},
        glu=False,
        norm_kind="layer",
        qkv_layout="stacked",
    ),
)

SUPPORTED_MODEL_TYPES: tuple[str, ...] = tuple(t for f in FAMILIES for t in f.model_types)


def family_of(model_type: str) -> FamilySpec:
    for spec in FAMILIES:
        if model_type in spec.model_types:
            return spec
    raise PrunekitError(
        f"unsupported architecture {model_type!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
    )


def adapter_for(model: nn.Module) -> ModelAdapter:
    """The ModelAdapter of a `transformers` causal LM, or a clear error if unsupported."""
    return ModelAdapter(model, family_of(model.config.model_type))
