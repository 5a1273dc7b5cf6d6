"""Synthetic clips: a spec (domain, sequences, frames, size, seed) rendered into arrays, over processes when large."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from .raycast import PARALLEL_PIXELS, render
from .world import DOMAINS, camera_pose, intrinsics, make_scene


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
