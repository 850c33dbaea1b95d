"""SliceGPT-sliced causal LMs: a model class written into every sliced folder.

prunekit copies this file into a sliced model folder as `modeling_prunekit_sliced.py` and
points the config's `auto_map` at `Sliced<Base>ForCausalLM`, so
`AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)` loads it with only
torch and transformers installed (`prunekit.load_pruned` uses prunekit's own copy).

A sliced model keeps the base architecture's attention and MLP but its residual stream
has `config.sliced_hidden_size` (d) channels instead of `hidden_size` (D):
- the embedding is [vocab, d], the head reads d channels;
- q/k/v (or qkv) and gate/up (or gate_up) read d channels, o and down write d channels;
- the norms have no scale (folded into the next linears) and divide by D, not d;
- each residual shortcut goes through a [d, d] matrix (Q_inᵀ Q_out of two PCA bases).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import (
    GemmaForCausalLM,
    LlamaForCausalLM,
    MistralForCausalLM,
    Phi3ForCausalLM,
    Qwen2ForCausalLM,
    Qwen3ForCausalLM,
)

MODELING_FILE = "modeling_prunekit_sliced.py"  # this file's name in a saved folder
INPUT_LINEARS = ("q_proj", "k_proj", "v_proj", "qkv_proj", "gate_proj", "up_proj", "gate_up_proj")
OUTPUT_LINEARS = ("o_proj", "down_proj")


class WeightlessRMSNorm(nn.Module):
    """x / sqrt(Σx² / mean_dim + eps): RMSNorm without scale over a possibly sliced x.

    `mean_dim` stays the original hidden size D, so slicing away low-energy directions
    changes the normaliser only by their (small) share of ‖x‖².
    """

    def __init__(self, mean_dim: int, eps: float):
        super().__init__()
        self.mean_dim = mean_dim
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        variance = x.pow(2).sum(-1, keepdim=True) / self.mean_dim
        return (x * torch.rsqrt(variance + self.eps)).to(dtype)

    def extra_repr(self) -> str:
        return f"mean_dim={self.mean_dim}, eps={self.eps}"


class ShortcutDecoderLayer(nn.Module):
    """A pre-norm decoder layer whose residual shortcuts pass through matrices.

    `h -> h @ attn_shortcut + attn(norm(h))`, then `m -> m @ mlp_shortcut + mlp(norm(m))`.
    A shortcut of None is the identity. Submodules keep the base layer's names.
    """

    def __init__(self, layer: nn.Module, input_norm: nn.Module, post_norm: nn.Module):
        super().__init__()
        self.self_attn = layer.self_attn
        self.mlp = layer.mlp
        self.input_layernorm = input_norm
        self.post_attention_layernorm = post_norm
        self.register_parameter("attn_shortcut", None)
        self.register_parameter("mlp_shortcut", None)

    @staticmethod
    def _shortcut(x: torch.Tensor, matrix: nn.Parameter | None) -> torch.Tensor:
        return x if matrix is None else x @ matrix.to(x.dtype)

    def forward(self, hidden_states: torch.Tensor, **kwargs) -> torch.Tensor:
        attn = self.self_attn(hidden_states=self.input_layernorm(hidden_states), **kwargs)[0]
        hidden_states = self._shortcut(hidden_states, self.attn_shortcut) + attn
        mlp = self.mlp(self.post_attention_layernorm(hidden_states))
        return self._shortcut(hidden_states, self.mlp_shortcut) + mlp


def _norm_eps(norm: nn.Module) -> float:
    return float(getattr(norm, "variance_epsilon", None) or norm.eps)


def _resize(linear: nn.Linear, in_features: int, out_features: int) -> None:
    """Give `linear` new (uninitialised) weights of shape [out_features, in_features]."""
    factory = {"device": linear.weight.device, "dtype": linear.weight.dtype}
    linear.weight = nn.Parameter(torch.empty(out_features, in_features, **factory))
    if linear.bias is not None:
        linear.bias = nn.Parameter(torch.empty(out_features, **factory))
    linear.in_features, linear.out_features = in_features, out_features


def make_sliced(model: nn.Module, sliced: int, output: int | None = None) -> None:
    """Turn a base causal LM into the sliced architecture in place (weights uninitialised).

    `sliced` is the residual width d; `output` the width the last block writes and the head
    reads (d, or the full D when the head is not sliced).
    """
    base = model.model
    output = sliced if output is None else output
    last = len(base.layers) - 1
    full = model.config.hidden_size
    eps = _norm_eps(base.norm)
    embed = base.embed_tokens  # resized in place: some families scale it (Gemma)
    factory = {"device": embed.weight.device, "dtype": embed.weight.dtype}
    embed.weight = nn.Parameter(torch.empty(embed.num_embeddings, sliced, **factory))
    embed.embedding_dim = sliced
    for index, layer in enumerate(base.layers):
        for name, module in layer.named_modules():
            leaf = name.rpartition(".")[2]
            if leaf in INPUT_LINEARS:
                _resize(module, sliced, module.out_features)
            elif leaf in OUTPUT_LINEARS:
                width = output if index == last and leaf == "down_proj" else sliced
                _resize(module, module.in_features, width)
        new = ShortcutDecoderLayer(
            layer,
            WeightlessRMSNorm(full, _norm_eps(layer.input_layernorm)),
            WeightlessRMSNorm(full, _norm_eps(layer.post_attention_layernorm)),
        )
        new.attn_shortcut = nn.Parameter(torch.empty(sliced, sliced))
        new.mlp_shortcut = nn.Parameter(torch.empty(sliced, output if index == last else sliced))
        base.layers[index] = new
    base.norm = WeightlessRMSNorm(full, eps)
    head = model.lm_head
    model.lm_head = nn.Linear(output, head.out_features, bias=head.bias is not None)


def _sliced_class(base: type) -> type:
    """`Sliced<Base>`: the base class built with the sliced architecture."""

    def __init__(self, config):
        base.__init__(self, config)
        make_sliced(self, config.sliced_hidden_size, getattr(config, "sliced_output_size", None))

    name = f"Sliced{base.__name__}"
    return type(name, (base,), {"__init__": __init__, "__module__": __name__})


SlicedLlamaForCausalLM = _sliced_class(LlamaForCausalLM)
SlicedMistralForCausalLM = _sliced_class(MistralForCausalLM)
SlicedQwen2ForCausalLM = _sliced_class(Qwen2ForCausalLM)
SlicedQwen3ForCausalLM = _sliced_class(Qwen3ForCausalLM)
SlicedGemmaForCausalLM = _sliced_class(GemmaForCausalLM)
SlicedPhi3ForCausalLM = _sliced_class(Phi3ForCausalLM)
