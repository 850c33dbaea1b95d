"""Multi-stage recipes: pruning stages and healing applied in order."""

from prunekit.recipes.recipe import HealStage, PruneStage, load_recipe, run_recipe

__all__ = ["HealStage", "PruneStage", "load_recipe", "run_recipe"]
