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

from dataclasses import dataclass, field

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
