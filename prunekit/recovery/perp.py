"""PERP (Zimmer et al., 2023, "PERP: Rethinking the Prune-Retrain Paradigm in the Era of
LLMs"): after pruning, retrain only a few parameters. The subsets are the paper's:
normalisation scales, biases, the LM head, the embeddings, and its MaskLoRA
(`recovery.lora.add_masked_lora`, part `lora`).
"""

from __future__ import annotations

from torch import nn

from prunekit.errors import PrunekitError

PERP_PARTS = ("norms", "biases", "head", "embed", "lora")


def _is_norm(module: nn.Module | None) -> bool:
    return isinstance(module, nn.LayerNorm) or type(module).__name__.endswith("Norm")


def perp_parameters(model: nn.Module, parts: list[str]) -> dict[str, nn.Parameter]:
    """`{name: parameter}` of the named subsets (`lora` adds parameters instead: not here).
    A requested subset the model lacks (e.g. biases of a Llama) is an error."""
    modules = dict(model.named_modules())
    head, embed = model.get_output_embeddings().weight, model.get_input_embeddings().weight
    chosen: dict[str, nn.Parameter] = {}
    found: set[str] = set()
    for name, param in model.named_parameters():
        owner, _, leaf = name.rpartition(".")
        norm = _is_norm(modules.get(owner))
        kinds = {
            "norms": norm,
            "biases": leaf == "bias" and not norm,
            "head": param is head,
            "embed": param is embed,
        }
        hit = {kind for kind, yes in kinds.items() if yes and kind in parts}
        if hit:
            chosen[name] = param
            found |= hit
    missing = sorted(set(parts) - found - {"lora"})
    if missing:
        raise PrunekitError(f"perp part {', '.join(missing)}: this model has no such parameters")
    return chosen
