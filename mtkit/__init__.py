"""mtkit: robust semantic segmentation by multi-task training with self-supervised monocular depth.

Klingner, Bär, Fingscheidt: "Improved Noise and Attack Robustness for Semantic Segmentation by Using
Multi-Task Training with Self-Supervised Depth Estimation", CVPRW 2020.
"""

__version__ = "0.1.0"

from .core.registry import register  # noqa: E402
from .plugins.hookspecs import hookimpl  # noqa: E402

__all__ = ["__version__", "hookimpl", "register"]
