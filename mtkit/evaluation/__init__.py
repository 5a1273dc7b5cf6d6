"""Evaluation: the one robustness path (``robustness``), one model on one set (``sweep``, with its accumulators in
``tally``), the gradient-masking checks (``masking``), depth (``depth``), attack detection (``detection``),
external models (``external``) and the ONNX export (``export``)."""

from .depth import evaluate_depth_model
from .detection import evaluate_detection
from .external import ExternalSegmenter, InputSpec, OutputSpec, build_external
from .masking import masking_checks
from .robustness import LoadedModel, evaluate_checkpoint, evaluate_segmenter, evaluation_sets, load_model
from .sweep import robustness_sweep
from .tally import Sweep, Tally

__all__ = ["ExternalSegmenter", "InputSpec", "LoadedModel", "OutputSpec", "Sweep", "Tally", "build_external",
           "evaluate_checkpoint", "evaluate_depth_model", "evaluate_detection", "evaluate_segmenter",
           "evaluation_sets", "load_model", "masking_checks", "robustness_sweep"]
