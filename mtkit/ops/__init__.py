"""The paper's math as small pure tensor functions: the losses of eq. 1-4 (``losses``), the geometry of the
reprojection (``geometry``), the metrics of eq. 9-10 and the depth metrics (``metrics``), and the edge
consistency of the attack detector (``edge_consistency``)."""

from .edge_consistency import consistency_measures, edge_consistency_loss
from .losses import IGNORE_INDEX, dssim, enet_class_weights, weighted_cross_entropy
from .metrics import confusion_counts, confusion_matrix, evaluate_depth, iou_per_class, miou, q_ratio

__all__ = ["IGNORE_INDEX", "confusion_counts", "confusion_matrix", "consistency_measures", "dssim",
           "edge_consistency_loss", "enet_class_weights", "evaluate_depth", "iou_per_class", "miou", "q_ratio",
           "weighted_cross_entropy"]
