"""Input perturbations at equal SNR (paper sec. 3.4, eq. 6-8).

Every perturbation acts on images x in gray values 0..255 (the model normalizes internally) and takes a
strength ε in gray values, the RMS of the perturbation r = x_adv - x over H·W·C (eq. 7), so equal ε means equal
SNR across types. The perturbed image is clipped to [0, 255]; ``measured_epsilon`` gives the RMS after clipping.

A perturbation is a class in the ``perturbation`` registry with typed ``Options`` (validated when the recipe
loads), ``needs_gradient`` (noise types run without autograd) and ``sweep(ctx, x, y, epsilons) -> {ε: x_adv}``:
a sweep may share work between strengths (FGSM's gradient does not depend on ε, so one backward pass serves the
whole sweep).

The package, one concern per module: ``context`` (the attack context, per-image random draws, the measured ε),
``base`` (the perturbation base class), ``noise`` (Gaussian, salt and pepper), ``gradient`` (FGSM, PGD, restarts)
``apgd`` (APGD-CE and the unbounded attack of the masking checks) and ``adaptive`` (O-PGD against the
edge-consistency attack detector). Everything is re-exported here.
"""

from __future__ import annotations

from .adaptive import OPGD, OPGDOptions, opgd
from .apgd import APGD, APGDOptions, Unbounded, apgd_checkpoints, apgd_sweep, wrong_class_probability
from .base import Perturbation, PerturbationOptions, Targets
from .context import AttackContext, clip_image, draw, image_generator, measured_epsilon, repeat_labels
from .gradient import (
    FGSM,
    PGD,
    PGDOptions,
    fgsm,
    fgsm_direction,
    pgd,
    pgd_iterations,
    pgd_sweep,
    project,
    random_start_point,
    strongest,
)
from .noise import (
    Gaussian,
    SaltPepper,
    gaussian_noise,
    salt_and_pepper,
    salt_and_pepper_keyed,
    salt_and_pepper_ordered,
    salt_and_pepper_per_image,
)

__all__ = ["APGD", "FGSM", "OPGD", "PGD", "APGDOptions", "AttackContext", "Gaussian", "OPGDOptions", "PGDOptions",
           "Perturbation", "PerturbationOptions", "SaltPepper", "Unbounded", "apgd_checkpoints", "apgd_sweep",
           "clip_image", "draw", "fgsm", "fgsm_direction", "gaussian_noise", "image_generator", "measured_epsilon",
           "opgd", "pgd", "pgd_iterations", "pgd_sweep", "project", "random_start_point", "repeat_labels",
           "salt_and_pepper", "salt_and_pepper_keyed", "salt_and_pepper_ordered", "salt_and_pepper_per_image",
           "strongest", "Targets", "wrong_class_probability"]
