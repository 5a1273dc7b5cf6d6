"""The gradient-masking sanity checks of a sweep (Carlini et al. 2019, sec. 5): where they fail, the numbers under
attack may overstate robustness."""

from __future__ import annotations

from ..core.results import WORST_CASE, SanityRow
from ..core.schema import SanityConfig
from .tally import Sweep


def masking_checks(sweep: Sweep, config: SanityConfig, iterative: set[str] | None = None) -> list[SanityRow]:
    """The gradient-masking sanity checks of one sweep (Carlini et al. 2019, sec. 5; ``results.SANITY_CHECKS``),
    each of which fails where the model's gradient misleads the attacks, so that their numbers may overstate
    robustness: mIoU does not rise with ε for any gradient attack; each ``iterative`` attack (default: every
    gradient attack but FGSM; a universal perturbation is not one) is at least as strong as FGSM at the same ε;
    the unbounded attack leaves about zero mIoU (a heuristic: its threshold ``config.near_zero`` was calibrated on
    mtkit's own models, and an ordinary external network may keep more after ``config.iterations`` steps); every
    gradient attack is at least as strong as Gaussian noise; and, before any of them, the predictions depend on the
    input at all: at the largest ε (≥ ``INPUT_DEPENDENCE_EPSILON``), some perturbation changes at least
    ``INPUT_DEPENDENCE_SHARE`` of the predicted labels (a model that ignores its input keeps Q = 100 % everywhere).

    A comparison fails when the stronger side is worse by more than ``config.tolerance`` mIoU points; the
    unbounded attack fails above ``config.near_zero`` points. A check without the rows it compares (no FGSM, no
    Gaussian noise, one ε) is not applicable (``passed`` null)."""
    tol = config.tolerance
    clean = sweep.clean
    where = {"model": clean.model, "seed": clean.seed, "dataset": clean.dataset}
    table: dict[str, dict[float, float]] = {}
    for r in sweep.rows:
        if r.is_epsilon and r.miou is not None:
            table.setdefault(r.perturbation, {})[r.level] = 100 * r.miou
    attacks = [p for p in table if p != WORST_CASE and any(
        r.attack for r in sweep.rows if r.perturbation == p)]
    out = []

    def row(check: str, failures: list[str], compared: int, ok: str) -> SanityRow:
        passed = None if not compared else not failures
        detail = "; ".join(failures[:3]) + (f" (+{len(failures) - 3} more)" if len(failures) > 3 else "") \
            if failures else ok if compared else "nothing to compare"
        return SanityRow(**where, check=check, passed=passed, detail=detail)

    fails, n = [], 0
    for p in attacks:
        levels = sorted(table[p])
        for a, b in zip(levels, levels[1:]):
            n += 1
            if table[p][b] > table[p][a] + tol:
                fails.append(f"{p}: {table[p][a]:.1f} → {table[p][b]:.1f} from ε {a:g} to {b:g}")
    out.append(row("monotone", fails, n, f"{len(attacks)} attack(s) over {n} ε steps"))
    def at_least_as_strong(names: list[str], reference: str) -> tuple[list[str], int]:
        """Failures of ``names`` against ``reference`` at each shared ε (higher mIoU beyond the tolerance), and
        the number of (attack, ε) pairs compared."""
        fails, n = [], 0
        for p in (q for q in names if q != reference and reference in table):
            for e in sorted(set(table[p]) & set(table[reference])):
                n += 1
                if table[p][e] > table[reference][e] + tol:
                    fails.append(f"{p} {table[p][e]:.1f} > {reference} {table[reference][e]:.1f} at ε {e:g}")
        return fails, n

    fails, n = at_least_as_strong([q for q in attacks if iterative is None or q in iterative], "fgsm")
    out.append(row("iterative_vs_fgsm", fails, n, f"{n} (attack, ε) pairs"))
    u = sweep.unbounded
    if u is None or u.miou is None:
        out.append(row("unbounded", [], 0, ""))
    else:
        value = 100 * u.miou
        fails = [f"mIoU {value:.1f} > {config.near_zero:g} (the heuristic's threshold, robustness.sanity.near_zero, "
                 f"calibrated on mtkit's models) after {config.iterations} APGD iterations at ε 255: a hint of "
                 "masking, not a proof; a model unlike mtkit's may need more iterations (robustness.sanity."
                 "iterations)"] if value > config.near_zero else []
        out.append(row("unbounded", fails, 1, f"mIoU {value:.1f} ≤ {config.near_zero:g}"))
    fails, n = at_least_as_strong(attacks, "gaussian")
    out.append(row("attack_vs_noise", fails, n, f"{n} (attack, ε) pairs"))
    out.append(input_dependence(sweep, row))
    return out


#: the input-dependence check: at the largest ε, at least this ε, some perturbation must change this share of labels
INPUT_DEPENDENCE_EPSILON, INPUT_DEPENDENCE_SHARE = 4.0, 0.001


def input_dependence(sweep: Sweep, row) -> SanityRow:
    """Whether the model's predictions depend on its input: at the sweep's largest ε (if ≥ 4 gray values), the
    largest share of predicted labels any perturbation changed (``ResultRow.changed``) must reach 0.1 %. Heavy noise
    or an attack changes far more on any model that looks at its input; a model that does not (batch-norm
    statistics that drown the input, a constant output) gets Q = 100 % at every ε, which is no robustness."""
    rows = [r for r in sweep.rows if r.is_epsilon and r.changed is not None]
    top = max((r.level for r in rows), default=0.0)
    if top < INPUT_DEPENDENCE_EPSILON:
        return row("input_dependent", [], 0, "")
    at = {r.perturbation: r.changed for r in rows if r.level == top}
    most = max(at.values())
    shares = ", ".join(f"{p} {100 * v:.2f} %" for p, v in at.items())
    fails = [f"at ε {top:g} no perturbation changed more than {100 * most:.2f} % of the predicted labels ({shares}): "
             "the predictions do not depend on the input"] if most < INPUT_DEPENDENCE_SHARE else []
    return row("input_dependent", fails, 1, f"at ε {top:g} up to {100 * most:.1f} % of the labels changed")
