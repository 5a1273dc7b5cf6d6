"""The recipe schema: typed config objects that a recipe file is validated into (``mtkit.recipe.load`` loads them).

Every key is read by some part of mtkit; an unknown key is an error. Options of registry entries (datasets,
perturbations) are declared by the entries themselves and validated when the recipe loads.
"""

from .base import PAPER_EPSILONS, PlainName, Strict, check_epsilons, config_hash, expand_root, plain_name
from .data import AugmentConfig, DataConfig, DatasetConfig
from .evaluation import DepthEvaluationConfig, DetectionConfig, RobustnessConfig, SanityConfig
from .launcher import LauncherConfig, slurm_minutes
from .recipe import Recipe
from .training import LossConfig, ModelConfig, ModelSpec, TrainConfig

__all__ = ["AugmentConfig", "check_epsilons", "config_hash", "DataConfig", "DatasetConfig", "DepthEvaluationConfig",
           "DetectionConfig", "expand_root", "LauncherConfig", "LossConfig", "ModelConfig", "ModelSpec",
           "PAPER_EPSILONS", "plain_name", "PlainName", "Recipe", "RobustnessConfig", "SanityConfig", "slurm_minutes",
           "Strict", "TrainConfig"]
