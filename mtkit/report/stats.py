"""Statistics behind the report's claims: mean, standard deviation and a 95 % t-interval over seeds, the paired
difference of two models over the seeds they share (multi-task minus single-task, seed by seed) with its t-test
p-value, and Holm's step-down adjustment, which keeps the family-wise error of many such tests at the level; for
rates, Clopper–Pearson's exact interval on counts of independent trials (images) and a cluster bootstrap over
images for shares of pixels (the pixels of one image are not independent trials)."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

LEVEL = 0.95


@dataclass(frozen=True)
class Interval:
    """Mean ± sd of ``n`` values and the two-sided ``level`` t-interval of the mean (NaN bounds for n < 2)."""

    mean: float
    sd: float
    low: float
    high: float
    n: int
    #: two-sided p-value of the one-sample t-test of mean = 0 (NaN for n < 2); it is below 1 - level exactly
    #: when the interval excludes zero
    p: float = math.nan

    @property
    def resolved(self) -> bool:
        """The interval excludes zero."""
        return self.n > 1 and (self.low > 0 or self.high < 0)

    def text(self, unit: str = "") -> str:
        if self.n < 2:
            return f"{self.mean:+.1f}{unit}"
        return f"{self.mean:+.1f}{unit} [{self.low:+.1f}, {self.high:+.1f}]"


def t_interval(values: list[float], level: float = LEVEL,
               bounds: tuple[float, float] = (-math.inf, math.inf)) -> Interval:
    """Mean, sample sd and the t-interval mean ± t_{(1+level)/2, n-1} · sd / √n (NaN values left out), its ends
    clipped to ``bounds``, the range of a bounded quantity (an mIoU in [0, 100] %, Q ≥ 0): the clipped interval
    keeps the t-interval's coverage, since the true value lies in the range."""
    v = [x for x in values if x == x]
    n = len(v)
    if n == 0:
        return Interval(math.nan, math.nan, math.nan, math.nan, 0)
    mean = statistics.fmean(v)
    if n == 1:
        return Interval(mean, 0.0, math.nan, math.nan, 1)
    sd = statistics.stdev(v)
    from scipy.stats import t as student_t  # scipy.stats is slow to import: only for several seeds

    se = sd / math.sqrt(n)
    half = float(student_t.ppf((1 + level) / 2, n - 1)) * se
    p = 1.0 if se == 0 and mean == 0 else 0.0 if se == 0 else float(2 * student_t.sf(abs(mean) / se, n - 1))
    return Interval(mean, sd, max(mean - half, bounds[0]), min(mean + half, bounds[1]), n, p)


def paired_difference(a: dict[int, float], b: dict[int, float], level: float = LEVEL) -> Interval:
    """The t-interval of a - b over the seeds both have (paired: each seed's two models share data and
    evaluation noise, so the seed-to-seed spread common to both cancels)."""
    return t_interval([a[s] - b[s] for s in sorted(set(a) & set(b))], level)


def holm(pvalues: list[float]) -> list[float]:
    """Holm's step-down adjusted p-values (Holm 1979), in the order given: sorted ascending, the i-th smallest
    (from 0) becomes max over j ≤ i of min(1, (m - j) · p_(j)); NaN values (no test) are left out of the family
    and stay NaN. Rejecting where the adjusted p < α keeps the family-wise error rate at α for any dependence."""
    tested = sorted((p, i) for i, p in enumerate(pvalues) if p == p)
    m = len(tested)
    out = [math.nan] * len(pvalues)
    running = 0.0
    for rank, (p, i) in enumerate(tested):
        running = max(running, min(1.0, (m - rank) * p))
        out[i] = running
    return out


def exact_interval(successes: int, trials: int, level: float = LEVEL) -> tuple[float, float]:
    """Clopper–Pearson's exact binomial interval of a rate ``successes`` / ``trials`` (scipy's beta quantiles):
    it stays inside [0, 1] and covers at least ``level`` for every true rate; (nan, nan) without trials."""
    from scipy.stats import beta

    if trials <= 0:
        return math.nan, math.nan
    a = (1 - level) / 2
    low = 0.0 if successes == 0 else float(beta.ppf(a, successes, trials - successes + 1))
    high = 1.0 if successes == trials else float(beta.ppf(1 - a, successes + 1, trials - successes))
    return low, high


def rate_cell(pairs: list[tuple[int, int]]) -> str:
    """Rates over seeds as a table cell in %: the pooled rate Σk/Σn with its exact interval (``exact_interval``)
    and the counts, "–" without trials."""
    k, n = sum(p[0] for p in pairs), sum(p[1] for p in pairs)
    if n == 0:
        return "–"
    low, high = exact_interval(k, n)
    return f"{100 * k / n:.1f} [{100 * low:.1f}, {100 * high:.1f}] ({k}/{n})"


def cluster_bootstrap(clusters: list[tuple[int, int]], level: float = LEVEL, resamples: int = 2000,
                      seed: int = 0) -> tuple[float, float]:
    """The percentile bootstrap interval of a pooled share Σk / Σn whose trials come in clusters (``clusters``:
    one (k, n) per image, its pixels): images are drawn with replacement ``resamples`` times (a fixed seed, so a
    report is reproducible) and the share of each draw is taken over the pixels of the drawn images. Pixels of
    one image succeed or fail together, so a binomial interval over pixels would be far too narrow; this one
    treats the image as the unit (Davison & Hinkley 1997, sec. 3.8). (nan, nan) without two images with
    pixels."""
    import numpy as np

    c = np.array([kn for kn in clusters if kn[1] > 0], dtype=np.float64).reshape(-1, 2)
    if len(c) < 2:
        return math.nan, math.nan
    draw = np.random.default_rng(seed).integers(0, len(c), size=(resamples, len(c)))
    shares = c[draw, 0].sum(1) / c[draw, 1].sum(1)
    a = (1 - level) / 2
    return float(np.quantile(shares, a)), float(np.quantile(shares, 1 - a))


def share_cell(clusters: list[tuple[int, int]]) -> str:
    """A share of pixels as a table cell in %: the pooled share Σk/Σn with its cluster-bootstrap interval over
    images (``cluster_bootstrap``), "–" without pixels."""
    k, n = sum(c[0] for c in clusters), sum(c[1] for c in clusters)
    if n == 0:
        return "–"
    low, high = cluster_bootstrap(clusters)
    return f"{100 * k / n:.1f}" if low != low else f"{100 * k / n:.1f} [{100 * low:.1f}, {100 * high:.1f}]"
