"""Recovery after pruning: healing by LoRA, masked LoRA, PERP subsets and distillation."""

from prunekit.engine.training import TrainSettings
from prunekit.recovery.healing import HealConfig, heal, heal_model, make_config

__all__ = ["HealConfig", "TrainSettings", "heal", "heal_model", "make_config"]
