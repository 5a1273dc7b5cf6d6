"""Recipes: load a YAML file with ``extends`` and overrides and validate its names and options (``load``), turn
its names into objects (``build``, the only place that looks names up), and prepare its datasets into the cache
once, handing the opened datasets on (``prepare``)."""

from .build import build_dataset, build_model, build_perturbations, build_segmentation_loss
from .load import apply_overrides, load_recipe, validate
from .prepare import Prepared, PreparedData, prepare_recipe, prepared_dataset

__all__ = ["Prepared", "PreparedData", "apply_overrides", "build_dataset", "build_model", "build_perturbations",
           "build_segmentation_loss", "load_recipe", "prepare_recipe", "prepared_dataset", "validate"]
