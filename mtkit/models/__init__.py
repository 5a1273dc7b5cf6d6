"""The multi-task network: shared timm encoder, segmentation and depth decoders, pose network."""

from .multitask import MultiTaskNet, Segmenter, build_model

__all__ = ["MultiTaskNet", "Segmenter", "build_model"]
