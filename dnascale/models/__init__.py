"""Model families. Reach them through the registry: `get_recipe(name)`, `load_preset(name, preset)`."""

from dnascale.models.registry import ModelRecipe, get_recipe, list_presets, list_recipes, load_preset, register

__all__ = ["ModelRecipe", "get_recipe", "list_presets", "list_recipes", "load_preset", "register"]
