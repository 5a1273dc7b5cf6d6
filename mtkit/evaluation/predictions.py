"""Per-image predictions at the dataset's original resolution: the files the Cityscapes benchmark's scripts and
test server read (labelIds PNGs named ``<city>_<seq>_<frame>*.png``, optionally trainIds and the Cityscapes
colours), written during the one evaluation loop for any perturbation at any ε, and the original-resolution
labels that ``robustness.label_resolution: original`` scores against (the benchmark's protocol).

Layout: ``<folder>/<model>/<dataset key>/<condition>/{labelIds,trainIds,color}/<name>.png``, a condition being
"clean" or "<perturbation>@<ε>"; point cityscapesScripts' ``CITYSCAPES_RESULTS`` at a ``labelIds`` folder
(``official_miou`` runs their evaluation in-process)."""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..core.errors import MtkitError
from ..core.io import atomic_write
from ..data.common import opened_image, read_image
from ..data.labels import cityscapes_lut, trainid_tables


def condition_name(name: str, level: float) -> str:
    """The folder of one condition: "clean", or "<perturbation>@<ε>"."""
    return "clean" if name == "clean" else f"{name}@{level:g}"


def parse_condition(text: str) -> tuple[str, float]:
    """ "clean" → ("clean", 0.0); "fgsm@4" → ("fgsm", 4.0); anything else is an error saying the form."""
    if text == "clean":
        return "clean", 0.0
    name, sep, level = text.partition("@")
    try:
        if not sep or not name:
            raise ValueError
        return name, float(level)
    except ValueError:
        raise MtkitError(f"prediction condition '{text}': write 'clean' or '<perturbation>@<ε>', e.g. fgsm@4") \
            from None


def source_files(dataset, count: int, what: str) -> list[tuple[Path, Path]]:
    """The (image, label) files behind the ``count`` evaluated items of a file-based source dataset (Cityscapes,
    KITTI 2015), in the evaluation's order; an error for generated data, which has no files to name."""
    items = getattr(dataset, "items", None)
    if not items or not all(isinstance(i, tuple) and len(i) == 2 and isinstance(i[0], Path) for i in items):
        raise MtkitError(f"{what}: predictions at the original resolution need a dataset read from files "
                         "(cityscapes, kitti2015); generated data has no files to name them after")
    if len(items) != count:
        raise MtkitError(f"{what}: the prepared set has {count} images, its source {len(items)}: prepare it again "
                         "(mtkit prepare --force) so that predictions are named after the right files")
    return list(items)


def prediction_name(image: Path) -> str:
    """Cityscapes ``<city>_<seq>_<frame>_leftImg8bit.png`` → ``<city>_<seq>_<frame>_pred.png`` (the benchmark
    matches ``<city>_<seq>_<frame>*.png``); any other name (KITTI's ``<id>_10.png``) is kept."""
    stem = image.name.removesuffix("_leftImg8bit.png")
    return f"{stem}_pred.png" if stem != image.name else image.name


def original_size(path: Path) -> tuple[int, int]:
    """(height, width) of an image file, read from its header."""
    with opened_image(path) as im:
        return im.height, im.width


def original_labels(files: list[tuple[Path, Path]], indices: list[int], device: torch.device
                    ) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """The trainId labels of ``indices`` at their original resolution, padded with void (255) to the largest in
    the batch (KITTI's sizes differ by a few pixels), and each image's (height, width)."""
    lut = cityscapes_lut()
    labels = [torch.from_numpy(lut[read_image(files[i][1], "L")].astype(np.int64)) for i in indices]
    sizes = [tuple(lab.shape) for lab in labels]
    h, w = max(s[0] for s in sizes), max(s[1] for s in sizes)
    out = torch.full((len(labels), h, w), 255, dtype=torch.int64)
    for k, lab in enumerate(labels):
        out[k, :lab.shape[0], :lab.shape[1]] = lab
    return out.to(device, non_blocking=True), sizes  # type: ignore[return-value]


def upsampled_argmax(logits: torch.Tensor, sizes: list[tuple[int, int]],
                     pad_to: tuple[int, int] | None = None) -> torch.Tensor:
    """Each image's logits bilinearly upsampled to its own size, then argmax, padded with 0 to ``pad_to`` (default
    the largest of ``sizes``; a batch split into passes pads every pass to the batch's largest, so they stack); the
    padding is void in ``original_labels``, so it never counts. One image at a time: 19 channels at 2048x1024 are
    160 MB."""
    h, w = pad_to or (max(s[0] for s in sizes), max(s[1] for s in sizes))
    dtype = torch.uint8 if logits.shape[1] <= 256 else torch.int64  # 1 byte a pixel: 7 levels x 8 images fit
    out = torch.zeros(logits.shape[0], h, w, dtype=dtype, device=logits.device)
    for k, (hk, wk) in enumerate(sizes):
        up = F.interpolate(logits[k:k + 1].float(), size=(hk, wk), mode="bilinear", align_corners=False)
        out[k, :hk, :wk] = up.argmax(1)[0].to(dtype)
    return out


@dataclass
class PredictionWriter:
    """Writes the predictions of chosen conditions of one (model, dataset) sweep at the original resolution."""

    folder: Path
    files: list[tuple[Path, Path]]
    conditions: set[tuple[str, float]]
    formats: tuple[str, ...] = ("labelIds",)
    sizes: dict[int, tuple[int, int]] = field(default_factory=dict)
    written: int = 0

    def __post_init__(self) -> None:
        self._ids, self._colors = trainid_tables()

    def wants(self, name: str, level: float) -> bool:
        return (name, float(level)) in self.conditions

    def sizes_of(self, indices: list[int]) -> list[tuple[int, int]]:
        for i in indices:
            if i not in self.sizes:
                self.sizes[i] = original_size(self.files[i][0])
        return [self.sizes[i] for i in indices]

    def write(self, indices: list[int], name: str, level: float, preds: torch.Tensor) -> None:
        """``preds`` (B, H, W) trainIds at the original resolution (padded); one PNG per image and format."""
        folder = self.folder / condition_name(name, level)
        for i, pred in zip(indices, preds.to("cpu", torch.uint8).numpy()):
            h, w = self.sizes_of([i])[0]
            train_ids = pred[:h, :w]
            out = {"labelIds": self._ids[train_ids], "trainIds": train_ids, "color": self._colors[train_ids]}
            for fmt in self.formats:
                _save_png(folder / fmt / prediction_name(self.files[i][0]), out[fmt])
            self.written += 1


def _save_png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="png")
    atomic_write(path, lambda fh: fh.write(buf.getvalue()))


@contextlib.contextmanager
def numpy_compat() -> Iterator[None]:
    """cityscapesScripts 2.3.0 calls ``np.in1d``, which numpy 2.4 removed: lend it ``np.isin`` (flattened, as
    in1d returned) while the official scripts run, and take it back after."""
    had = hasattr(np, "in1d")
    if not had:
        np.in1d = lambda a, b, invert=False: np.isin(a, b, invert=invert).ravel()  # type: ignore[attr-defined]
    try:
        yield
    finally:
        if not had:
            del np.in1d  # type: ignore[attr-defined]


def official_miou(predictions: list[Path], ground_truth: list[Path]) -> dict[str, float]:
    """cityscapesScripts' own pixel-level evaluation (``evaluateImgLists``) of labelIds prediction files against
    ``*_gtFine_labelIds.png`` files, in-process and quiet: class IoU by name and the class average ("miou")."""
    with numpy_compat(), contextlib.redirect_stdout(io.StringIO()):
        from cityscapesscripts.evaluation import evalPixelLevelSemanticLabeling as cs

        args = cs.args
        args.quiet, args.evalPixelAccuracy, args.evalInstLevelScore = True, False, False
        args.JSONOutput, args.exportFile = False, None
        result = cs.evaluateImgLists([str(p) for p in predictions], [str(p) for p in ground_truth], args)
    return {**{k: float(v) for k, v in result["classScores"].items()}, "miou": float(result["averageScoreClasses"])}
