"""The multi-task network: shared timm encoder, segmentation and depth decoders, pose network (built from a
recipe's names by ``mtkit.recipe.build.build_model``)."""

from .multitask import MultiTaskNet, Segmenter

__all__ = ["MultiTaskNet", "Segmenter"]
