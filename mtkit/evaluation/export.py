"""ONNX export of the deployable segmenter, verified with onnxruntime against PyTorch: the logits, the argmax, a
second batch size and, for a dynamic export, a second image size, and the graph's declared output shape."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..core.errors import MtkitError
from ..core.io import atomic_path
from .robustness import load_model

#: the symbolic axes of a dynamic export (``--static`` fixes height and width; the batch stays symbolic)
DYNAMIC_AXES = {0: "batch", 2: "height", 3: "width"}


def export_segmenter(checkpoint: str | Path, output: str | Path, height: int, width: int, static: bool = False,
                     verify: bool = True, atol: float = 1e-3) -> Path:
    """Export the checkpoint's segmenter (gray values 0..255 in, logits out) to ONNX, traced at ``height`` x
    ``width``: any batch size, and any image size unless ``static`` (then only ``height`` x ``width``). Checked
    with onnxruntime (``verify_onnx``); a failed export or check leaves no file."""
    seg = load_model(checkpoint).segmenter.eval()
    output = Path(output)
    x = torch.rand(1, 3, height, width, generator=torch.Generator().manual_seed(0)) * 255
    axes = {0: "batch"} if static else DYNAMIC_AXES
    with atomic_path(output) as tmp:
        torch.onnx.export(seg, (x,), str(tmp), input_names=["image"], output_names=["logits"],
                          dynamic_axes={"image": axes, "logits": axes}, opset_version=17, dynamo=False)
        declare_logits(tmp, logits_shape(_reference(seg, x).shape[1], height, width, static))
        if verify:
            verify_onnx(seg, tmp, height, width, static, atol)
    return output


def logits_shape(classes: int, height: int, width: int, static: bool) -> list[int | str]:
    """The logits' shape as the graph declares it: a symbol for each free axis, a number for each fixed one."""
    return ["batch", classes, height, width] if static else ["batch", classes, "height", "width"]


def declare_logits(path: str | Path, shape: list[int | str]) -> None:
    """Write the logits' declared shape into the graph: the exporter's shape inference cannot follow the decoder's
    upsampling to the input's size and declares e.g. ``[batch, 19, batch, Convlogits_dim_3]`` (the height carrying
    the batch's symbol), which misleads shape-trusting consumers such as TensorRT. The logits are the input's size
    (``verify_onnx`` checks it on onnxruntime at other sizes)."""
    import onnx

    model = onnx.load(str(path))
    out = next(v for v in model.graph.output if v.name == "logits")
    for dim, value in zip(out.type.tensor_type.shape.dim, shape):
        dim.Clear()
        if isinstance(value, str):
            dim.dim_param = value
        else:
            dim.dim_value = value
    onnx.save(model, str(path))


def declared_shape(path: str | Path, name: str = "logits") -> list[int | str]:
    """The shape the ONNX graph declares for its input or output ``name``: a number or a symbol per axis."""
    import onnx

    graph = onnx.load(str(path)).graph
    for value in [*graph.input, *graph.output]:
        if value.name == name:
            return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]
    raise MtkitError(f"{path}: the graph has no input or output '{name}'")


def verify_onnx(model: torch.nn.Module, path: str | Path, height: int, width: int, static: bool = False,
                atol: float = 1e-3) -> dict[str, float]:
    """onnxruntime against PyTorch on the export size with batch 1 and batch 2, and (dynamic) on a second size:
    the largest logit difference (≤ ``atol``), the share of pixels whose argmax agrees (≥ 99.9 %, ties aside),
    and the declared logits shape (batch, classes, height, width: each axis its own symbol or number)."""
    sizes = [(1, height, width), (2, height, width)] + ([] if static else [(2, height + 32, width + 64)])
    worst, agree = 0.0, 1.0
    for b, h, w in sizes:
        x = torch.rand(b, 3, h, w, generator=torch.Generator().manual_seed(b + h + w)) * 255
        ours, ref = onnx_logits(path, x), _reference(model, x)
        if ours.shape != ref.shape:
            raise MtkitError(f"ONNX export gives logits {ours.shape} for input {tuple(x.shape)}, PyTorch {ref.shape}")
        worst = max(worst, float(np.abs(ours - ref).max()))
        agree = min(agree, float((ours.argmax(1) == ref.argmax(1)).mean()))
    if worst > atol or agree < 0.999:
        raise MtkitError(f"ONNX export differs from PyTorch: logits by {worst:.2e} (> {atol}) or argmax on "
                         f"{100 * (1 - agree):.2f} % of the pixels")
    want = logits_shape(ref.shape[1], height, width, static)
    if (got := declared_shape(path)) != want:
        raise MtkitError(f"the ONNX graph declares logits {got}, expected {want}")
    return {"max_abs": worst, "argmax_agreement": agree}


def onnx_logits(path: str | Path, x: torch.Tensor) -> np.ndarray:
    """The exported model's logits for ``x`` (gray values) under onnxruntime's CPU provider."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {"image": x.numpy()})[0]


def _reference(model: torch.nn.Module, x: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return model(x).numpy()
