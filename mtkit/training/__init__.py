"""Training: one optimisation step of a recipe's model (``step``), the trainer that has a step engine and holds
the loop (``trainer``), what a checkpoint holds (``state``), the metrics log (``log``) and validation
(``validate``)."""

from .step import StepEngine
from .trainer import Trainer, TrainResult, train

__all__ = ["StepEngine", "TrainResult", "Trainer", "train"]
