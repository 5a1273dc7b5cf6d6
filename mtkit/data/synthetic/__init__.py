"""The embedded synthetic driving data: the world (``world``: domains, scenes, the camera's path), the ray caster
(``raycast``), clips of a spec (``clips``) and the registered datasets that read them (``sets``)."""

from .clips import SyntheticSpec, generate, render_clip
from .raycast import render
from .world import (
    BUILDING,
    CAR,
    DOMAINS,
    PRESENT_CLASSES,
    ROAD,
    SIDEWALK,
    SKY,
    VOID,
    Domain,
    Scene,
    camera_pose,
    intrinsics,
    make_scene,
    value_noise,
)

__all__ = ["BUILDING", "CAR", "DOMAINS", "PRESENT_CLASSES", "ROAD", "SIDEWALK", "SKY", "VOID", "Domain", "Scene",
           "SyntheticSpec", "camera_pose", "generate", "intrinsics", "make_scene", "render", "render_clip",
           "value_noise"]
