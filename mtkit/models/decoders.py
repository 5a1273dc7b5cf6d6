"""Decoder heads. The segmentation and depth heads share monodepth2's DepthDecoder architecture and differ only
in their last layer (paper sec. 4); an smp FPN decoder is offered as an alternative segmentation head."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..core.registry import register

DECODER_CHANNELS = (16, 32, 64, 128, 256)


class Conv3x3(nn.Module):
    """3x3 convolution with reflection padding (replicate padding for maps of one pixel in height or width,
    which cannot be reflected, e.g. the bottleneck of a 32-pixel-high input). Replicate padding is written as a
    concatenation: torch.compile (inductor, torch 2.13) miscompiles ``replication_pad2d_backward`` on such maps."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if min(x.shape[-2:]) > 1:
            return self.conv(F.pad(x, (1, 1, 1, 1), mode="reflect"))
        x = torch.cat([x[:, :, :1], x, x[:, :, -1:]], 2)
        return self.conv(torch.cat([x[..., :1], x, x[..., -1:]], 3))


class ConvBlock(nn.Sequential):
    """Conv3x3 + ELU."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__(Conv3x3(cin, cout), nn.ELU(inplace=True))


class Monodepth2Decoder(nn.Module):
    """Upsampling decoder with skip connections from each encoder stage (monodepth2's DepthDecoder body).

    The last layer is given by subclasses: ``out_channels`` maps per output scale. Inputs whose size is not
    divisible by the encoder's stride are handled by upsampling each stage to the exact size of its skip
    connection (and the last one to the input size), so every input size works without padding.
    """

    def __init__(self, enc_channels: list[int], out_channels: int, scales: tuple[int, ...]) -> None:
        super().__init__()
        if len(enc_channels) != 5:
            raise ValueError(f"the decoder needs 5 encoder stages, the backbone gives {len(enc_channels)}")
        self.scales = scales
        dec = DECODER_CHANNELS
        self.upconv0 = nn.ModuleList()
        self.upconv1 = nn.ModuleList()
        for i in range(4, -1, -1):
            cin = enc_channels[-1] if i == 4 else dec[i + 1]
            self.upconv0.append(ConvBlock(cin, dec[i]))
            skip = enc_channels[i - 1] if i > 0 else 0
            self.upconv1.append(ConvBlock(dec[i] + skip, dec[i]))
        self.out = nn.ModuleDict({str(s): Conv3x3(dec[s], out_channels) for s in scales})

    def decode(self, features: list[torch.Tensor], size: tuple[int, int]) -> dict[int, torch.Tensor]:
        x = features[-1]
        outputs: dict[int, torch.Tensor] = {}
        for j, i in enumerate(range(4, -1, -1)):
            x = self.upconv0[j](x)
            target = features[i - 1].shape[-2:] if i > 0 else size
            x = F.interpolate(x, size=target, mode="nearest")
            if i > 0:
                x = torch.cat([x, features[i - 1]], 1)
            x = self.upconv1[j](x)
            if i in self.scales:
                outputs[i] = self.out[str(i)](x)
        return outputs


@register("head", "monodepth2")
class SegmentationDecoder(Monodepth2Decoder):
    """monodepth2-style decoder whose last layer outputs |S| logits at the input resolution."""

    task = "segmentation"

    def __init__(self, enc_channels: list[int], num_classes: int, **_: object) -> None:
        super().__init__(enc_channels, num_classes, scales=(0,))

    def forward(self, features: list[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
        return self.decode(features, size)[0]


def at_least_fp32(t: torch.Tensor) -> torch.Tensor:
    """``t`` in fp32 when it is in a half-precision dtype (bf16/fp16 under autocast); fp32 and fp64 unchanged."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def disp_to_depth(sigma: torch.Tensor, min_depth: float, max_depth: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Sigmoid output σ → (scaled inverse depth aσ+b, depth 1/(aσ+b)) with depth in [min_depth, max_depth].

    Paper sec. 4: b = 1/max_depth, a = 1/min_depth - 1/max_depth.
    """
    b = 1.0 / max_depth
    a = 1.0 / min_depth - b
    disp = a * sigma + b
    return disp, 1.0 / disp


@register("head", "monodepth2_depth")
class DepthDecoder(Monodepth2Decoder):
    """monodepth2-style decoder whose last layer is a sigmoid at 4 scales (depth = 1/(aσ+b) ∈ [0.1, 100])."""

    task = "depth"

    def __init__(self, enc_channels: list[int], num_scales: int = 4, **_: object) -> None:
        super().__init__(enc_channels, 1, scales=tuple(range(num_scales)))

    def forward(self, features: list[torch.Tensor], size: tuple[int, int]) -> dict[int, torch.Tensor]:
        # fp32 even under autocast: σ near 0 or 1 decides depths near 100 m or 0.1 m, which bf16 cannot tell apart
        return {s: torch.sigmoid(at_least_fp32(v)) for s, v in self.decode(features, size).items()}


class SmpDecoderHead(nn.Module):
    """A segmentation-models-pytorch decoder + segmentation head, fed by the shared timm encoder's features."""

    task = "segmentation"

    def __init__(self, decoder: nn.Module, channels: int, num_classes: int, upsampling: int) -> None:
        super().__init__()
        from segmentation_models_pytorch.base import SegmentationHead

        self.decoder = decoder
        self.head = SegmentationHead(channels, num_classes, kernel_size=1, upsampling=upsampling)

    def forward(self, features: list[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
        # smp decoders take [input, stage1..stage5]; the input itself is unused by FPN/DeepLabV3+
        dummy = features[0].new_zeros(features[0].shape[0], 3, *size)
        x = self.decoder([dummy, *features])
        if isinstance(x, list | tuple):
            x = x[0]
        logits = self.head(x)
        if logits.shape[-2:] != size:
            logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
        return logits


@register("head", "fpn")
def fpn_head(enc_channels: list[int], num_classes: int, **_: object) -> SmpDecoderHead:
    """segmentation-models-pytorch FPN decoder as the segmentation head."""
    from segmentation_models_pytorch.decoders.fpn.decoder import FPNDecoder

    decoder = FPNDecoder(encoder_channels=[3, *enc_channels], encoder_depth=5, pyramid_channels=128,
                         segmentation_channels=64, dropout=0.0, merge_policy="add")
    return SmpDecoderHead(decoder, 64, num_classes, upsampling=4)
