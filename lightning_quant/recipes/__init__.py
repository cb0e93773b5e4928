"""Recipes: YAML files validated against typed dataclasses before anything runs.

A recipe names the quantizers for weights and activations, which layers to quantize, the schedule and,
for the command-line main job, the fine-tuning settings. Recipes can extend another with ``base:``
and be overridden with ``key=value`` strings. Example::

    recipe = load_recipe("lsq_w4a4", overrides=["weights.bits=3"])
    print(recipe.weights.bits)  # 3

Modules: ``schema`` (the dataclasses), ``safe_yaml`` (bounded reading), ``convert`` (typed conversion with key
paths), ``loader`` (names, ``base`` chains, overrides), ``checks`` (ranges) and ``kinds`` (what each kind uses).
"""

from lightning_quant.nn.surgery import LayerOverride, LayerSelection
from lightning_quant.recipes.checks import DATA_SOURCES, validate_recipe
from lightning_quant.recipes.loader import (
    RecipeLike,
    describe_recipes,
    list_recipes,
    load_recipe,
    override_list,
    recipe_methods,
    recipes_dir,
)
from lightning_quant.recipes.schema import (
    DiagnosticsConfig,
    INQConfig,
    Recipe,
    RecipeError,
    ScheduleConfig,
    TrainingConfig,
)

__all__ = [
    "DATA_SOURCES",
    "DiagnosticsConfig",
    "INQConfig",
    "LayerOverride",
    "LayerSelection",
    "Recipe",
    "RecipeError",
    "RecipeLike",
    "ScheduleConfig",
    "TrainingConfig",
    "describe_recipes",
    "list_recipes",
    "load_recipe",
    "override_list",
    "recipe_methods",
    "recipes_dir",
    "validate_recipe",
]
