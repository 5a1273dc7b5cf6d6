"""mtkit-attacks: MI-FGSM, SegPGD, CosPGD, a universal adversarial perturbation, and the targeted segmentation
attacks (Metzen et al.'s static and dynamic targets, per image and universal; DAG;
data-free GD-UAP) as mtkit perturbations, one module per attack family (as torchattacks): ``mi_fgsm``, ``seg_pgd``,
``cos_pgd``, ``uap``, ``metzen``, ``dag_attack``, ``gd_uap``; this face holds the registration hook alone.

Every attack follows mtkit's convention: images in gray values 0..255, strength ε in gray values (the L∞ budget of
the projection, so the RMS of the perturbation, eq. 7, is at most ε and is measured and recorded by the
evaluation), the result clipped to [0, 255]. Gradients go through ``AttackContext.gradient`` so the evaluation
counts backward passes.

Targeted attacks say what they aim at (``targets``), so the evaluation reports the share of pixels that took their
target and, for dynamic targets, the share of the hidden class removed and of the other pixels kept.
"""

from __future__ import annotations

from mtkit.plugin_api import RegistryView, hookimpl

from .cos_pgd import CosPGD, cospgd, cospgd_loss
from .dag_attack import DAG, dag, dag_objective
from .gd_uap import GDUAP, gd_uap_loss, learn_gd_uap
from .metzen import MetzenDynamic, MetzenDynamicUAP, MetzenStatic, MetzenStaticUAP, fill_hidden, metzen_loss
from .mi_fgsm import MIFGSM, mifgsm
from .seg_pgd import SegPGD, segpgd, segpgd_loss
from .uap import UniversalPerturbation, learn_uap, load_uap, model_fingerprint, save_uap

__version__ = "0.1.0"
__all__ = ["DAG", "GDUAP", "MIFGSM", "CosPGD", "MetzenDynamic", "MetzenDynamicUAP", "MetzenStatic", "MetzenStaticUAP",
           "SegPGD", "UniversalPerturbation", "cospgd", "cospgd_loss", "dag", "dag_objective", "fill_hidden",
           "gd_uap_loss", "learn_gd_uap", "learn_uap", "load_uap", "metzen_loss", "mifgsm", "model_fingerprint",
           "save_uap", "segpgd", "segpgd_loss"]


@hookimpl
def mtkit_register(registry: RegistryView) -> None:
    registry.add("perturbation", "mifgsm", MIFGSM)
    registry.add("perturbation", "segpgd", SegPGD)
    registry.add("perturbation", "cospgd", CosPGD)
    registry.add("perturbation", "uap", UniversalPerturbation)
    registry.add("perturbation", "metzen_static", MetzenStatic)
    registry.add("perturbation", "metzen_dynamic", MetzenDynamic)
    registry.add("perturbation", "metzen_static_uap", MetzenStaticUAP)
    registry.add("perturbation", "metzen_dynamic_uap", MetzenDynamicUAP)
    registry.add("perturbation", "dag", DAG)
    registry.add("perturbation", "gd_uap", GDUAP)
