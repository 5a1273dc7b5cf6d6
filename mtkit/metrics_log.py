"""Training metrics: JSON lines in ``metrics.jsonl`` (rank 0), mirrored to TensorBoard with ``train.tensorboard``
(``pip install mtkit[tensorboard]``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


class MetricsLog:
    """Appends JSON lines (rank 0); mirrors scalars to TensorBoard when asked and installed."""

    def __init__(self, path: Path, enabled: bool, tensorboard: bool) -> None:
        self.path = path
        self.enabled = enabled
        self.tb = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(path.parent / "tensorboard"))
            except ImportError:
                import warnings

                warnings.warn("train.tensorboard is on but tensorboard is not installed: pip install tensorboard",
                              stacklevel=2)

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
