"""Embedded synthetic driving video: a procedural, seeded, asset-free ray caster.

A camera with known intrinsics drives forward (with yaw, lateral sway and bumps) along a road with sidewalks,
terrain, building facades with windows, poles with traffic signs, trees, pedestrians, parked and moving cars,
and sky. Every surface is textured by procedural noise in its own surface coordinates, so the texture sticks to
the world and consecutive frames are consistent for the photometric loss. Per frame: RGB uint8, exact metric
depth (z in camera coordinates; 0 for sky), semantic labels in Cityscapes trainIds, the world-from-camera pose.

Two domains mimic the paper's cross-dataset setup: ``city`` (labelled, Cityscapes' role) and ``drive``
(another palette, lighting and camera height; KITTI's role).

Coordinates: x right, y down, z forward; the ground is the plane y = 0, the camera sits at y = -height.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

# Cityscapes trainIds
ROAD, SIDEWALK, BUILDING, WALL, FENCE, POLE, LIGHT, SIGN, VEGETATION, TERRAIN, SKY = range(11)
PERSON, RIDER, CAR = 11, 12, 13
VOID = 255
PRESENT_CLASSES = (ROAD, SIDEWALK, BUILDING, POLE, SIGN, VEGETATION, TERRAIN, SKY, PERSON, CAR)


@dataclass(frozen=True)
class Domain:
    name: str
    camera_height: float
    road_half_width: float
    sidewalk_width: float
    palette: dict[int, tuple[float, float, float]]
    sky_top: tuple[float, float, float]
    sky_horizon: tuple[float, float, float]
    sun: tuple[float, float, float]
    ambient: float
    building_density: float  # probability that a facade slot holds a building
    tree_density: float
    speed: float  # m per frame


DOMAINS: dict[str, Domain] = {
    "city": Domain(
        "city", camera_height=1.3, road_half_width=4.5, sidewalk_width=3.0,
        palette={ROAD: (95, 95, 100), SIDEWALK: (170, 160, 165), BUILDING: (150, 140, 130), POLE: (120, 120, 125),
                 SIGN: (200, 40, 40), VEGETATION: (60, 130, 50), TERRAIN: (140, 150, 90), PERSON: (200, 60, 80),
                 CAR: (40, 70, 160)},
        sky_top=(90, 140, 220), sky_horizon=(200, 215, 235), sun=(-0.5, -0.8, 0.3), ambient=0.55,
        building_density=0.85, tree_density=0.3, speed=0.9),
    "drive": Domain(
        "drive", camera_height=1.65, road_half_width=3.8, sidewalk_width=2.0,
        palette={ROAD: (120, 112, 100), SIDEWALK: (185, 175, 150), BUILDING: (175, 125, 95), POLE: (150, 150, 140),
                 SIGN: (230, 200, 40), VEGETATION: (85, 120, 40), TERRAIN: (160, 140, 90), PERSON: (90, 90, 200),
                 CAR: (170, 50, 40)},
        sky_top=(150, 170, 200), sky_horizon=(235, 225, 210), sun=(0.6, -0.6, 0.5), ambient=0.45,
        building_density=0.55, tree_density=0.6, speed=1.1),
}


def intrinsics(height: int, width: int) -> np.ndarray:
    """KITTI-like 4x4 intrinsics for the given image size (normalized fx=0.58, fy=1.92, centred)."""
    k = np.eye(4, dtype=np.float32)
    k[0, 0], k[1, 1] = 0.58 * width, 1.92 * height
    k[0, 2], k[1, 2] = 0.5 * (width - 1), 0.5 * (height - 1)
    return k


def _hash(i: np.ndarray, j: np.ndarray, seed: float) -> np.ndarray:
    h = np.sin(i * 127.1 + j * 311.7 + seed * 74.7) * 43758.5453
    return h - np.floor(h)


def value_noise(u: np.ndarray, v: np.ndarray, seed: float = 0.0, octaves: int = 3) -> np.ndarray:
    """Smooth value noise in [0, 1) of surface coordinates (bilinear with smoothstep), summed octaves."""
    total = np.zeros_like(u)
    amp, norm, freq = 1.0, 0.0, 1.0
    for o in range(octaves):
        x, y = u * freq, v * freq
        i, j = np.floor(x), np.floor(y)
        fx, fy = x - i, y - j
        fx, fy = fx * fx * (3 - 2 * fx), fy * fy * (3 - 2 * fy)
        s = seed + 17 * o
        a, b = _hash(i, j, s), _hash(i + 1, j, s)
        c, d = _hash(i, j + 1, s), _hash(i + 1, j + 1, s)
        total += amp * ((a * (1 - fx) + b * fx) * (1 - fy) + (c * (1 - fx) + d * fx) * fy)
        norm += amp
        amp *= 0.5
        freq *= 2.0
    return total / norm


@dataclass
class Scene:
    """Boxes (N, 6) as xmin, xmax, ymin, ymax, zmin, zmax; class, colour and texture seed per box; moving cars
    carry a velocity along z (m per frame)."""

    domain: Domain
    boxes: np.ndarray
    classes: np.ndarray
    colors: np.ndarray
    seeds: np.ndarray
    velocity: np.ndarray = field(default_factory=lambda: np.zeros(0))

    def at(self, frame: int) -> np.ndarray:
        b = self.boxes.copy()
        b[:, 4] += self.velocity * frame
        b[:, 5] += self.velocity * frame
        return b


def make_scene(domain: Domain, rng: np.random.Generator, length: float) -> Scene:
    boxes, classes, colors, seeds, vel = [], [], [], [], []

    def add(box, cls, color=None, v=0.0):
        base = np.array(domain.palette[cls] if color is None else color, dtype=np.float32)
        boxes.append(box)
        classes.append(cls)
        colors.append(np.clip(base * rng.uniform(0.8, 1.2, 3), 0, 255))
        seeds.append(rng.uniform(0, 100))
        vel.append(v)

    rw, sw = domain.road_half_width, domain.sidewalk_width
    for side in (-1, 1):
        z = -10.0
        while z < length:  # facades
            size = rng.uniform(8, 18)
            if rng.random() < domain.building_density:
                x0 = rw + sw + rng.uniform(0.0, 1.5)
                depth, height = rng.uniform(6, 12), rng.uniform(7, 20)
                xs = (x0, x0 + depth) if side > 0 else (-x0 - depth, -x0)
                add((*xs, -height, 0.0, z, z + size), BUILDING)
            z += size + rng.uniform(0, 3)
        z = rng.uniform(-5, 10)
        while z < length:  # poles with signs
            x = side * (rw + 0.4)
            h = rng.uniform(3.5, 5.5)
            add((x - 0.08, x + 0.08, -h, 0.0, z - 0.08, z + 0.08), POLE)
            if rng.random() < 0.6:
                add((x - 0.35, x + 0.35, -h + 0.1, -h + 0.8, z - 0.04, z + 0.04), SIGN)
            z += rng.uniform(10, 20)
        z = rng.uniform(-5, 10)
        while z < length:  # trees on the sidewalk's outer half
            if rng.random() < domain.tree_density:
                x = side * (rw + sw - 0.7)
                r, h = rng.uniform(0.9, 1.6), rng.uniform(2.0, 3.0)
                add((x - 0.12, x + 0.12, -h, 0.0, z - 0.12, z + 0.12), VEGETATION, (90, 70, 50))
                add((x - r, x + r, -h - 2 * r, -h + 0.2, z - r, z + r), VEGETATION)
            z += rng.uniform(6, 12)
        z = rng.uniform(0, 15)
        while z < length:  # pedestrians
            x = side * (rw + rng.uniform(0.8, sw - 0.3))
            add((x - 0.25, x + 0.25, -rng.uniform(1.5, 1.9), 0.0, z - 0.2, z + 0.2), PERSON,
                rng.uniform(40, 220, 3))
            z += rng.uniform(8, 25)
        z = rng.uniform(0, 10)
        while z < length:  # parked cars at the curb
            if rng.random() < 0.6:
                x = side * (rw - 1.1)
                add((x - 0.9, x + 0.9, -1.5, 0.0, z, z + 4.2), CAR, rng.uniform(30, 220, 3))
            z += rng.uniform(6, 14)
    z = rng.uniform(10, 30)
    while z < length + 40:  # oncoming traffic in the left lane
        add((-rw / 2 - 0.9, -rw / 2 + 0.9, -1.5, 0.0, z, z + 4.4), CAR, rng.uniform(30, 220, 3),
            v=-rng.uniform(0.3, 1.0))
        z += rng.uniform(15, 40)
    return Scene(domain, np.array(boxes, np.float32), np.array(classes), np.array(colors, np.float32),
                 np.array(seeds, np.float32), np.array(vel, np.float32))


def camera_pose(domain: Domain, frame: int, phase: float) -> np.ndarray:
    """World-from-camera 4x4 pose: forward motion with yaw, sway and bumps (pitch and height)."""
    t = float(frame)
    z = domain.speed * t
    x = 0.5 * domain.road_half_width * 0.3 + 0.4 * np.sin(0.07 * t + phase)
    y = -domain.camera_height + 0.02 * np.sin(1.3 * t + 2 * phase)
    yaw = 0.05 * np.sin(0.05 * t + phase)
    pitch = 0.01 * np.sin(0.9 * t + phase)
    cy, sy, cp, sp = np.cos(yaw), np.sin(yaw), np.cos(pitch), np.sin(pitch)
    r_yaw = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    r_pitch = np.array([[1, 0, 0], [0, cp, -sp], [0, sp, cp]])
    pose = np.eye(4)
    pose[:3, :3] = r_yaw @ r_pitch
    pose[:3, 3] = (x, y, z)
    return pose.astype(np.float32)


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


@dataclass
class SyntheticSpec:
    """What to generate: ``sequences`` clips of ``frames`` frames each, in ``domain``, at height x width."""

    domain: str = "city"
    sequences: int = 10
    frames: int = 12
    height: int = 64
    width: int = 192
    seed: int = 0

    def key(self) -> str:
        import hashlib
        import json

        blob = json.dumps({**asdict(self), "v": 4}, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:12]


def render_clip(spec: SyntheticSpec, s: int) -> dict[str, np.ndarray]:
    """Clip ``s`` of ``spec``: its frames, depth, labels and poses, seeded by (spec.seed, s, domain) alone, so a
    clip is the same whichever process renders it and whatever else is rendered."""
    domain = DOMAINS[spec.domain]
    k = intrinsics(spec.height, spec.width)
    out: dict[str, list] = {key: [] for key in ("images", "depth", "labels", "poses", "sequence", "frame")}
    rng = np.random.default_rng([spec.seed, s, 0 if spec.domain == "city" else 1])
    scene = make_scene(domain, rng, length=domain.speed * spec.frames + 60)
    phase = rng.uniform(0, 2 * np.pi)
    start = int(rng.integers(0, 200))
    for f in range(spec.frames):
        pose = camera_pose(domain, start + f, phase)
        pose[2, 3] -= domain.speed * start  # keep the scene's z origin at the clip's first frame
        rgb, depth, label = render(scene, pose, k, spec.height, spec.width, frame=f)
        for key, val in zip(out, (rgb, depth, label, pose, s, f)):
            out[key].append(val)
    return {key: np.stack([np.asarray(v) for v in vals]) for key, vals in out.items()}


def generate(spec: SyntheticSpec, workers: int = 1, progress=None) -> dict[str, np.ndarray]:
    """Render ``spec`` → arrays images (N,H,W,3) uint8, depth (N,H,W) float32, labels (N,H,W) uint8,
    poses (N,4,4), K (4,4), sequence (N,), frame (N,). Deterministic in ``spec.seed``: one clip per task on
    ``workers`` processes gives the same arrays as one process. ``progress(done, total)`` is called after each
    clip."""
    if spec.domain not in DOMAINS:
        raise ValueError(f"unknown synthetic domain '{spec.domain}', choose one of {sorted(DOMAINS)}")
    workers = max(1, min(workers, spec.sequences))
    if spec.sequences * spec.frames * spec.height * spec.width < PARALLEL_PIXELS:
        workers = 1  # a small job: starting processes would cost more than it saves
    clips: list[dict[str, np.ndarray]] = []
    if workers == 1:
        for s in range(spec.sequences):
            clips.append(render_clip(spec, s))
            if progress:
                progress(s + 1, spec.sequences)
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        # forked workers (no re-import of the caller's script, as spawning would need); the renderer uses no
        # multithreaded BLAS product, whose spinning threads would take the cores from the other processes
        method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context(method)) as pool:
            for s, clip in enumerate(pool.map(render_clip, [spec] * spec.sequences, range(spec.sequences))):
                clips.append(clip)
                if progress:
                    progress(s + 1, spec.sequences)
    arrays = {key: np.concatenate([c[key] for c in clips]) for key in clips[0]}
    arrays["K"] = intrinsics(spec.height, spec.width)
    return arrays
