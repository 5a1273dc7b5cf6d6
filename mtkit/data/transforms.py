"""The paper's training augmentation (sec. 4): horizontal flip and colour jitter, sampled once per sample and
applied identically to every frame of a triplet and consistently to labels and intrinsics."""

from __future__ import annotations

import random

import torch
import torchvision.transforms.v2.functional as TF
from torchvision.transforms import ColorJitter

from ..config import AugmentConfig


class Augment:
    """Samples flip and jitter parameters; ``colour`` applies the jitter to images in gray values 0..255."""

    def __init__(self, cfg: AugmentConfig, rng: random.Random | None = None) -> None:
        self.cfg = cfg
        # default: the global generators (seeded by the trainer and saved in checkpoints)
        self.rng = rng or random
        self.jitter = ColorJitter(cfg.brightness, cfg.contrast, cfg.saturation, cfg.hue)

    def sample(self) -> dict:
        """One set of parameters: flip, and jitter (order, factors) drawn from torch's generator."""
        flip = self.cfg.hflip and self.rng.random() < 0.5
        order, b, c, s, h = ColorJitter.get_params(self.jitter.brightness, self.jitter.contrast,
                                                   self.jitter.saturation, self.jitter.hue)
        return {"flip": flip, "order": order.tolist(), "b": b, "c": c, "s": s, "h": h}

    @staticmethod
    def colour(images: torch.Tensor, p: dict) -> torch.Tensor:
        """Jitter images (..., 3, H, W) in 0..255 with parameters ``p`` (same for every image)."""
        x = images / 255.0
        for fn in p["order"]:
            if fn == 0 and p["b"] is not None:
                x = TF.adjust_brightness(x, p["b"])
            elif fn == 1 and p["c"] is not None:
                x = TF.adjust_contrast(x, p["c"])
            elif fn == 2 and p["s"] is not None:
                x = TF.adjust_saturation(x, p["s"])
            elif fn == 3 and p["h"] is not None:
                x = TF.adjust_hue(x, p["h"])
        return x.clamp(0, 1) * 255.0


def flip_intrinsics(k: torch.Tensor, width: int) -> torch.Tensor:
    """Intrinsics of the horizontally flipped image: c_x → (W - 1) - c_x."""
    k = k.clone()
    k[0, 2] = (width - 1) - k[0, 2]
    return k


def augment_segmentation(image: torch.Tensor, label: torch.Tensor, aug: Augment
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    p = aug.sample()
    if p["flip"]:
        image, label = image.flip(-1), label.flip(-1)
    return aug.colour(image, p), label


def augment_triplet(frames: torch.Tensor, k: torch.Tensor, aug: Augment
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """frames (3, 3, H, W) → (augmented, un-augmented but flipped, intrinsics)."""
    p = aug.sample()
    if p["flip"]:
        frames = frames.flip(-1)
        k = flip_intrinsics(k, frames.shape[-1])
    return aug.colour(frames, p), frames, k
