"""Make small installed distributions (dist-info + module on a path) for plugin tests."""

from __future__ import annotations

import textwrap
from pathlib import Path


def make_dist(site: Path, dist: str, version: str, module: str, source: str, ep_name: str | None = None) -> Path:
    site.mkdir(parents=True, exist_ok=True)
    (site / f"{module}.py").write_text(textwrap.dedent(source))
    info = site / f"{dist.replace('-', '_')}-{version}.dist-info"
    info.mkdir(exist_ok=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    (info / "entry_points.txt").write_text(f"[mtkit]\n{ep_name or module} = {module}\n")
    (info / "top_level.txt").write_text(f"{module}\n")
    (info / "RECORD").write_text(f"{module}.py,,\n")
    return site


GOOD_PLUGIN = '''
from mtkit.plugin_api import Perturbation, clip_image, hookimpl


class Uniform(Perturbation):
    """Uniform noise on [-a, a] scaled so that its RMS is ε (a test plugin)."""

    def sweep(self, ctx, x, y, epsilons):
        u = ctx.image_noise(x, "rand", "uniform_noise") * 2 - 1  # each image its own draw, on x's device
        return {e: clip_image(x + u * e * 3 ** 0.5) for e in epsilons}


@hookimpl
def mtkit_register(registry):
    registry.add("perturbation", "uniform_noise", Uniform)
'''

BROKEN_PLUGIN = '''
raise RuntimeError("this plugin is broken on purpose")
'''
