"""Training metrics: JSON lines in ``metrics.jsonl`` (rank 0), mirrored to TensorBoard with ``train.tensorboard``
(``pip install mtkit[tensorboard]``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..core.errors import MtkitError
from ..core.io import atomic_write_text


class MetricsLog:
    """Appends JSON lines (rank 0); with TensorBoard, every numeric field becomes a scalar ``<type>/<field>`` at
    the record's step: ``step/<loss term>``, ``step/lr``, ``step/images_per_s``, ``epoch/val_miou``, ..."""

    def __init__(self, path: Path, enabled: bool, tensorboard: bool) -> None:
        self.path = path
        self.enabled = enabled
        self.tb = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise MtkitError("train.tensorboard is true but tensorboard is not installed: "
                                 "pip install 'mtkit[tensorboard]'") from None
            self.tb = SummaryWriter(str(path.parent / "tensorboard"))

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as fh:
            fh.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for k, v in record.items():
                if isinstance(v, int | float) and k != "step":
                    self.tb.add_scalar(f"{record['type']}/{k}", v, record["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def truncate_log(path: Path, step: int) -> None:
    """Drop the records after ``step`` (a resumed run writes them again): no duplicates after a resume."""
    if not path.is_file():
        return
    keep = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln).get("step", 0) <= step]
    atomic_write_text(path, "".join(ln + "\n" for ln in keep))
