"""ONNX export of the deployable segmenter, verified with onnxruntime against PyTorch."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..core.errors import MtkitError
from ..core.io import atomic_path
from .robustness import load_model


def export_segmenter(checkpoint: str | Path, output: str | Path, height: int, width: int,
                     verify: bool = True, atol: float = 1e-3) -> Path:
    """Export the checkpoint's segmenter (gray values 0..255 in, logits out) to ONNX; check it with onnxruntime."""
    seg = load_model(checkpoint).segmenter.eval()
    output = Path(output)
    x = torch.rand(1, 3, height, width) * 255
    with atomic_path(output) as tmp:  # a failed export or check leaves no temporary file
        torch.onnx.export(seg, (x,), str(tmp), input_names=["image"], output_names=["logits"],
                          dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}}, opset_version=17,
                          dynamo=False)
        if verify:
            err = onnx_parity(seg, tmp, x)
            if err > atol:
                raise MtkitError(f"ONNX export differs from PyTorch by {err:.2e} (> {atol})")
    return output


def onnx_parity(model: torch.nn.Module, path: str | Path, x: torch.Tensor) -> float:
    """Max absolute difference between onnxruntime and PyTorch logits."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (onnx_out,) = sess.run(None, {"image": x.numpy()})
    with torch.no_grad():
        ref = model(x).numpy()
    return float(np.abs(onnx_out - ref).max())
