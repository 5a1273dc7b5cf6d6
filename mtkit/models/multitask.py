"""The multi-task network of the paper (Fig. 2): shared encoder, segmentation and depth decoders, pose net."""

from __future__ import annotations

import torch
from torch import nn

from ..core.errors import MtkitError
from ..core.precision import fp32
from ..core.schema import ModelConfig
from .decoders import SmpDecoderHead, at_least_fp32, disp_to_depth
from .gradscale import scale_features
from .pose import PoseNet
from .tasks import AuxiliaryTask


class Normalize(nn.Module):
    """Zero-mean normalization inside the model (paper sec. 4): callers and attacks use gray values 0..255."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class Segmenter(nn.Module):
    """The deployable segmentation network (Fig. 3): normalization, encoder, segmentation decoder.

    Shares its parameters with the multi-task model it came from; gray values 0..255 in, logits out.
    """

    def __init__(self, normalize: nn.Module, encoder: nn.Module, seg_head: nn.Module) -> None:
        super().__init__()
        self.normalize = normalize
        self.encoder = encoder
        self.seg_head = seg_head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_size(self.seg_head, x)
        return self.seg_head(self.encoder(self.normalize(x)), tuple(x.shape[-2:]))


def _check_size(head: nn.Module, x: torch.Tensor) -> None:
    if isinstance(head, SmpDecoderHead) and (x.shape[-1] % 32 or x.shape[-2] % 32):
        raise MtkitError(
            f"the smp segmentation head needs height and width divisible by 32, got {tuple(x.shape[-2:])}; "
            "resize (e.g. 192x640) or use the monodepth2 head, which takes any size"
        )


class MultiTaskNet(nn.Module):
    """Shared encoder with a segmentation head and, for multi-task models, a depth head and a pose network.

    ``forward(seg_images, depth_images)`` runs ONE encoder pass over both batches (paper sec. 5.1: the depth
    images shape the encoder's batch-norm statistics), inserts the eq. 5 gradient scaling on every
    encoder→decoder connection (λ for segmentation, 1-λ for depth) and decodes each batch with its own head.
    """

    def __init__(self, cfg: ModelConfig, encoder: nn.Module, seg_head: nn.Module, tasks: tuple[str, ...],
                 lam: float = 1.0, depth_head: nn.Module | None = None, pose_net: PoseNet | None = None,
                 aux_tasks: dict[str, AuxiliaryTask] | None = None, task_scales: dict[str, float] | None = None
                 ) -> None:
        """The parts come built (``mtkit.recipe.build.build_model`` turns a recipe's names into them)."""
        super().__init__()
        self.cfg = cfg
        self.tasks = tuple(tasks)
        self.lam = float(lam)
        self.normalize = Normalize(cfg.mean, cfg.std)
        self.encoder = encoder
        self.seg_head = seg_head
        self.depth_head = depth_head
        self.pose_net = pose_net
        # plugin tasks: a head each on the segmentation batch's features, gradient scale task_scales or 1-λ
        self.aux_tasks = dict(aux_tasks or {})
        channels = list(encoder.channels)
        self.aux_heads = nn.ModuleDict({t: task.build_head(channels, cfg) for t, task in self.aux_tasks.items()})
        self.aux_scales = {t: float((task_scales or {}).get(t, 1.0 - self.lam)) for t in self.aux_tasks}

    @property
    def has_depth(self) -> bool:
        return self.depth_head is not None

    def forward(self, seg_images: torch.Tensor, depth_frames: torch.Tensor | None = None
                ) -> dict[str, object]:
        """seg_images (B_s, 3, H, W); depth_frames (B_d, 3, 3, H, W) = [x_{t-1}, x_t, x_{t+1}], gray values.

        Returns ``seg_logits``; with depth frames also ``disp`` and ``sigma`` (scale → (B_d, 1, h_s, w_s)) for
        x_t and ``poses`` {-1: T_{t→t-1}, 1: T_{t→t+1}}; with auxiliary (plugin) tasks ``aux`` {task: output}.
        """
        _check_size(self.seg_head, seg_images)
        n_seg = seg_images.shape[0]
        if depth_frames is not None and not self.has_depth:
            raise MtkitError("this model has no depth task; build it with tasks [segmentation, depth]")
        depth_images = None if depth_frames is None else depth_frames[:, 1]
        x = seg_images if depth_images is None else torch.cat([seg_images, depth_images], 0)
        if seg_images.dim() == 4 and seg_images.is_contiguous(memory_format=torch.channels_last) \
                and not seg_images.is_contiguous():  # torch.cat with a slice of the frames drops channels_last
            x = x.contiguous(memory_format=torch.channels_last)
        feats = self.encoder(self.normalize(x))
        size = tuple(seg_images.shape[-2:])
        seg_feats = [f[:n_seg] for f in feats]
        # eq. 5 scaling only where another task shares the encoder (a single-task model trains unscaled)
        shared = depth_images is not None or bool(self.aux_heads)
        out: dict[str, object] = {"seg_logits": self.seg_head(scale_features(seg_feats, self.lam) if shared
                                                              else seg_feats, size)}
        if self.aux_heads:
            out["aux"] = {t: head(scale_features(seg_feats, self.aux_scales[t]), size)
                          for t, head in self.aux_heads.items()}
        if depth_images is None:
            return out
        depth_feats = scale_features([f[n_seg:] for f in feats], 1.0 - self.lam)
        sigmas = self.depth_head(depth_feats, tuple(depth_images.shape[-2:]))  # type: ignore[misc]
        with fp32(x.device.type):  # aσ+b spans 0.01..10: fp32 even under autocast
            sigmas = {s: at_least_fp32(v) for s, v in sigmas.items()}
            out["disp"] = {s: disp_to_depth(v, self.cfg.min_depth, self.cfg.max_depth)[0] for s, v in sigmas.items()}
        out["sigma"] = sigmas
        out["poses"] = self.predict_poses([depth_frames[:, 0], depth_frames[:, 1], depth_frames[:, 2]])
        return out

    def predict_depth(self, images: torch.Tensor) -> torch.Tensor:
        """Depth (B, 1, H, W) in [min_depth, max_depth] for images in gray values (scale 0)."""
        if self.depth_head is None:
            raise MtkitError("this model has no depth head")
        feats = self.encoder(self.normalize(images))
        sigma = self.depth_head(feats, tuple(images.shape[-2:]))[0]
        with fp32(images.device.type):
            return disp_to_depth(at_least_fp32(sigma), self.cfg.min_depth, self.cfg.max_depth)[1]

    def predict(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Segmentation logits and depth (B, 1, H, W) of images in gray values, from one encoder pass (what the
        attack detector compares)."""
        logits, sigmas = self.predict_scales(images)
        with fp32(images.device.type):
            depth = disp_to_depth(at_least_fp32(sigmas[0]), self.cfg.min_depth, self.cfg.max_depth)[1]
        return logits, depth

    def predict_scales(self, images: torch.Tensor) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """Segmentation logits and the depth decoder's sigmoid output σ at each of its scales (scale s at 1/2^s of
        the input size), from one encoder pass."""
        if self.depth_head is None:
            raise MtkitError("this model has no depth head")
        feats = self.encoder(self.normalize(images))
        size = tuple(images.shape[-2:])
        return self.seg_head(feats, size), self.depth_head(feats, size)

    def predict_poses(self, frames: list[torch.Tensor]) -> dict[int, torch.Tensor]:
        """T_{t→t'} for frames [x_{t-1}, x_t, x_{t+1}] (gray values): {-1: ..., +1: ...}, both pairs in one pass
        of the pose net (``PoseNet.around``)."""
        if self.pose_net is None:
            raise MtkitError("this model has no pose network")
        return self.pose_net.around(*frames)

    def segmenter(self) -> Segmenter:
        """The segmentation-only network (depth head and pose net dropped), sharing these parameters."""
        return Segmenter(self.normalize, self.encoder, self.seg_head)
