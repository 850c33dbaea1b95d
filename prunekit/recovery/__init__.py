"""Recovery after pruning: healing by LoRA, masked LoRA, PERP subsets and distillation."""

from prunekit.recovery.healing import HealConfig, heal, heal_model, make_config
from prunekit.recovery.loop import TrainSettings

__all__ = ["HealConfig", "TrainSettings", "heal", "heal_model", "make_config"]
