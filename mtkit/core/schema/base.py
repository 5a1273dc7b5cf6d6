"""The recipe schema's foundations: strict models, plain names, the ε list rule, the config hash, roots."""

from __future__ import annotations

import hashlib
import json
import math
import os
from typing import Annotated, Any

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
)

PAPER_EPSILONS = [0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0]


class Strict(BaseModel):
    # every number of a recipe is finite: `train.lr: inf` is as wrong as `nan`
    model_config = ConfigDict(extra="forbid", populate_by_name=True, protected_namespaces=(), allow_inf_nan=False,
                              use_attribute_docstrings=True)


def plain_name(value: str) -> str:
    """A name that becomes a folder or file name: not empty, no path separator, not "." or ".."."""
    if not value or value in (".", "..") or any(c in value for c in "/\\\x00"):
        raise ValueError(f"'{value}' is not a plain name: use letters, digits and - _ . without path separators "
                         "or '..' (it names a folder)")
    return value

PlainName = Annotated[str, AfterValidator(plain_name)]


def check_epsilons(v: list[float]) -> list[float]:
    """An ε list: non-empty, positive, finite, each strength once; sorted."""
    if not v:
        raise ValueError("the ε list is empty: give at least one strength, e.g. [0.25, 0.5, 1, 2, 4, 8, 16]")
    bad = [e for e in v if not e > 0]
    if bad:
        raise ValueError(f"ε must be positive gray values, got {bad}")
    if not all(math.isfinite(e) for e in v):
        raise ValueError(f"ε must be finite gray values (the RMS of a perturbation of 0..255 images), got {v}")
    twice = sorted({e for e in v if v.count(e) > 1})
    if twice:
        raise ValueError(f"ε {twice} listed more than once: give each strength once, e.g. {sorted(set(v))}")
    return sorted(v)


def config_hash(*parts: Any) -> str:
    """A short stable hash of JSON-able config pieces (stage caching)."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


def expand_root(root: str | None, env_var: str | None) -> str | None:
    """A dataset root with ``~`` and ``$VARS`` expanded; null falls back to ``env_var``."""
    if root is None and env_var:
        root = os.environ.get(env_var)
    if root is None:
        return None
    return os.path.expanduser(os.path.expandvars(root))
