"""The Cityscapes label table: labelIds ↔ the 19 trainIds (official table of ``cityscapesscripts``)."""

from __future__ import annotations

import numpy as np
from cityscapesscripts.helpers.labels import labels, trainId2label


def cityscapes_lut() -> np.ndarray:
    """labelId → trainId lookup table from the official Cityscapes label table (255: void)."""
    lut = np.full(256, 255, np.uint8)
    for lab in labels:
        if 0 <= lab.id < 256:
            lut[lab.id] = lab.trainId if 0 <= lab.trainId < 255 else 255
    return lut


def cityscapes_known_ids() -> np.ndarray:
    """(256,) bool: the labelIds of the official table (void classes included); 255 is accepted as void too."""
    known = np.zeros(256, bool)
    for lab in labels:
        if 0 <= lab.id < 256:
            known[lab.id] = True
    known[255] = True
    return known


def labelids_to_trainids(label_ids: np.ndarray) -> np.ndarray:
    return cityscapes_lut()[label_ids]


def trainid_tables() -> tuple[np.ndarray, np.ndarray]:
    """trainId → labelId (256,) and trainId → colour (256, 3) uint8 lookup tables from the official table; void
    and unused trainIds → 0 (unlabeled) and black."""
    ids, colors = np.zeros(256, np.uint8), np.zeros((256, 3), np.uint8)
    for tid, lab in trainId2label.items():
        if 0 <= tid < 255:
            ids[tid], colors[tid] = lab.id, lab.color
    return ids, colors


def trainids_to_labelids(train_ids: np.ndarray) -> np.ndarray:
    """Inverse mapping (for writing synthetic data in the official layouts and predictions for the benchmark);
    void → 0 (unlabeled)."""
    return trainid_tables()[0][train_ids]


def trainids_to_colors(train_ids: np.ndarray) -> np.ndarray:
    """(H, W) trainIds → (H, W, 3) uint8 in the official Cityscapes colours (void black)."""
    return trainid_tables()[1][train_ids]
