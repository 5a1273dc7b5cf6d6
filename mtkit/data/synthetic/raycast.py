"""The synthetic data's ray caster: one frame of a scene from a camera pose → RGB, exact depth and labels."""

from __future__ import annotations

import numpy as np

from .world import BUILDING, CAR, ROAD, SIDEWALK, SKY, TERRAIN, VEGETATION, Scene, value_noise

TILE = 32  # pixels per side of the tiles the renderer culls boxes for
PARALLEL_PIXELS = 4_000_000  # rendered pixels from which ``generate`` spreads the clips over processes


def _screen_rects(boxes: np.ndarray, pose: np.ndarray, k: np.ndarray) -> np.ndarray:
    """For each box (M, 6), the pixel rectangle (M, 4: u0, u1, v0, v1) that holds the projection of its 8
    corners, widened by a pixel; the whole image for a box with a corner less than 0.1 m in front of the camera
    (its projection is unbounded). A ray through a pixel outside it cannot meet the box."""
    lo, hi = boxes[:, 0::2], boxes[:, 1::2]  # (M, 3) min and max corners
    corners = np.stack([np.stack([(hi if (c >> a) & 1 else lo)[:, a] for a in range(3)], -1) for c in range(8)], 1)
    cam = (corners - pose[:3, 3]) @ pose[:3, :3]  # world → camera: Rᵀ (p - origin)
    z = cam[..., 2]
    safe = np.where(z > 0.1, z, 1.0)
    u = k[0, 0] * cam[..., 0] / safe + k[0, 2]
    v = k[1, 1] * cam[..., 1] / safe + k[1, 2]
    rects = np.stack([u.min(1) - 1, u.max(1) + 1, v.min(1) - 1, v.max(1) + 1], 1)
    behind = (z <= 0.1).any(1)
    rects[behind] = (-np.inf, np.inf, -np.inf, np.inf)
    return rects


def _hit_boxes(boxes: np.ndarray, idx: np.ndarray, origin: np.ndarray, inv: np.ndarray, pixels: np.ndarray,
               best_t: np.ndarray, best: np.ndarray, axis: np.ndarray) -> None:
    """The slab test of the rays ``pixels`` (their inverse directions ``inv``) against ``boxes[idx]`` (in index
    order): where the nearest box hit is nearer than ``best_t``, record its distance, box and hit axis."""
    b = boxes[idx]
    n = inv.shape[0]
    tnear = np.full((n, idx.size), -np.inf, np.float32)
    tfar = np.full((n, idx.size), np.inf, np.float32)
    near_axis = np.zeros((n, idx.size), np.int8)
    for ax in range(3):  # slab test, one axis at a time on (pixels, boxes) arrays
        t1 = (b[:, 2 * ax][None] - origin[ax]) * inv[:, ax, None]
        t2 = (b[:, 2 * ax + 1][None] - origin[ax]) * inv[:, ax, None]
        lo, hi = np.minimum(t1, t2), np.maximum(t1, t2)
        upd = lo > tnear
        tnear = np.where(upd, lo, tnear)
        near_axis[upd] = ax
        np.minimum(tfar, hi, out=tfar)
    valid = (tfar >= tnear) & (tnear > 1e-3)
    tnear = np.where(valid, tnear, np.inf)
    j = tnear.argmin(1)
    tj = tnear[np.arange(n), j]
    hit = tj < best_t[pixels]
    where = pixels[hit]
    best_t[where], best[where] = tj[hit], idx[j[hit]]
    axis[where] = near_axis[np.arange(n), j][hit]


def render(scene: Scene, pose: np.ndarray, k: np.ndarray, height: int, width: int, frame: int = 0
           ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Ray-cast one frame → (rgb uint8 (H, W, 3), depth float32 (H, W), label uint8 (H, W))."""
    d = scene.domain
    v, u = np.mgrid[0:height, 0:width].astype(np.float32)
    rays_cam = np.stack([(u - k[0, 2]) / k[0, 0], (v - k[1, 2]) / k[1, 1], np.ones_like(u)], -1).reshape(-1, 3)
    rot, origin = pose[:3, :3], pose[:3, 3]
    # world directions with camera-z component 1 (t along the ray = depth); written out, not a BLAS product:
    # BLAS's threads would spin against the other rendering processes
    dirs = rays_cam[:, 0:1] * rot[:, 0] + rays_cam[:, 1:2] * rot[:, 1] + rays_cam[:, 2:3] * rot[:, 2]
    n = dirs.shape[0]
    best_t = np.full(n, np.inf, np.float32)
    best = np.full(n, -2, np.int64)  # -2 sky, -1 ground, else box index
    axis = np.zeros(n, np.int64)
    # ground plane y = 0
    with np.errstate(divide="ignore", invalid="ignore"):
        tg = np.where(dirs[:, 1] > 1e-6, -origin[1] / dirs[:, 1], np.inf)
    hit = tg < best_t
    best_t[hit], best[hit] = tg[hit], -1
    # boxes (slab test), culled to those ahead of the camera, then per image tile to those whose projection
    # can reach it: each pixel meets the same boxes in the same order as without tiles, so the frame is the same
    boxes = scene.at(frame)
    keep = (boxes[:, 5] > origin[2] - 2) & (boxes[:, 4] < origin[2] + 150)
    idx = np.nonzero(keep)[0]
    if idx.size:
        with np.errstate(divide="ignore", invalid="ignore"):
            inv = (1.0 / np.where(np.abs(dirs) < 1e-9, 1e-9, dirs)).astype(np.float32)
        rects = _screen_rects(boxes[idx], pose, k)
        pixel = np.arange(n).reshape(height, width)
        for r0 in range(0, height, TILE):
            for c0 in range(0, width, TILE):
                tile = pixel[r0:r0 + TILE, c0:c0 + TILE].ravel()
                r1, c1 = min(r0 + TILE, height) - 1, min(c0 + TILE, width) - 1
                near = (rects[:, 0] <= c1) & (rects[:, 1] >= c0) & (rects[:, 2] <= r1) & (rects[:, 3] >= r0)
                if near.any():
                    _hit_boxes(boxes, idx[near], origin, inv[tile], tile, best_t, best, axis)
    points = origin + dirs * np.where(np.isfinite(best_t), best_t, 0)[:, None]
    label = np.full(n, SKY, np.uint8)
    color = np.zeros((n, 3), np.float32)
    normal = np.zeros((n, 3), np.float32)
    # sky gradient by elevation
    sky = best == -2
    elev = np.clip(-dirs[sky, 1] / np.linalg.norm(dirs[sky], axis=1) * 3, 0, 1)[:, None]
    color[sky] = np.array(d.sky_horizon) * (1 - elev) + np.array(d.sky_top) * elev
    # ground
    g = best == -1
    gx, gz = points[g, 0], points[g, 2]
    ax = np.abs(gx)
    cls = np.where(ax < d.road_half_width, ROAD, np.where(ax < d.road_half_width + d.sidewalk_width, SIDEWALK, TERRAIN))
    label[g] = cls
    base = np.stack([np.array(d.palette[c], np.float32) for c in (ROAD, SIDEWALK, TERRAIN)])[
        np.searchsorted([ROAD, SIDEWALK, TERRAIN], cls)]
    noise = value_noise(gx * 1.5, gz * 1.5, seed=3.0)
    shade = 0.75 + 0.5 * noise
    tiles = (np.abs(np.sin(np.pi * gx)) < 0.06) | (np.abs(np.sin(np.pi * gz)) < 0.06)
    shade = np.where((cls == SIDEWALK) & tiles, shade * 0.7, shade)
    marking = (cls == ROAD) & (np.abs(gx) < 0.12) & (np.mod(gz, 6.0) < 3.0)
    col = base * shade[:, None]
    col[marking] = 235.0
    color[g] = col
    normal[g] = (0, -1, 0)
    # boxes
    bm = best >= 0
    bi = best[bm]
    label[bm] = scene.classes[bi]
    p = points[bm]
    a = axis[bm]
    # surface coordinates: the two world axes other than the hit axis
    uu = np.where(a == 0, p[:, 2], p[:, 0])
    vv = np.where(a == 1, p[:, 2], p[:, 1])
    seed = scene.seeds[bi]
    cls_b = scene.classes[bi]
    freq = np.where(cls_b == VEGETATION, 3.0, np.where(cls_b == BUILDING, 0.8, 1.5)).astype(np.float32)
    shade = 0.7 + 0.6 * value_noise(uu * freq + seed, vv * freq, seed=5.0)
    col = scene.colors[bi] * shade[:, None]
    facade = (cls_b == BUILDING) & (a == 0)
    win = facade & (np.mod(uu + seed, 3.0) > 1.0) & (np.mod(vv, 3.2) > 1.2) & (vv < -1.0)
    col[win] = col[win] * 0.35 + np.array([40, 60, 90], np.float32)
    car_window = (cls_b == CAR) & (vv < -1.05)
    col[car_window] = col[car_window] * 0.3 + 20
    color[bm] = col
    sign = np.where(np.take_along_axis(dirs[bm], a[:, None], 1)[:, 0] > 0, -1.0, 1.0)
    nb = np.zeros((bm.sum(), 3), np.float32)
    nb[np.arange(nb.shape[0]), a] = sign
    normal[bm] = nb
    # lighting on solid surfaces
    solid = ~sky
    sun = np.array(d.sun, np.float32) / np.linalg.norm(d.sun)
    ns = normal[solid]
    lambert = np.clip(ns[:, 0] * -sun[0] + ns[:, 1] * -sun[1] + ns[:, 2] * -sun[2], 0, 1)
    color[solid] *= (d.ambient + (1 - d.ambient) * lambert)[:, None] * 1.25
    depth = np.where(sky, 0.0, best_t).astype(np.float32)
    rgb = np.clip(color, 0, 255).round().astype(np.uint8).reshape(height, width, 3)
    return rgb, depth.reshape(height, width), label.reshape(height, width)
