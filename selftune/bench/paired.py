"""Whether a method's wins over fixed training, seed by seed, are more than the seeds' noise.

Why: a bench counts the seeds on which a tuned run beats fixed training from the same start ("4/6"),
but on small validation and test sets a rerun of the same seed on another machine, or a change of the
thread count, moves a test loss by as much as the two methods differ (docs/benchmarks/README.md). A
count alone cannot say whether 4 of 6 is a win. This module pairs the runs by seed and asks the
Wilcoxon signed-rank test (scipy's) whether the paired changes lean one way beyond chance.

* The change of a pair is the log of the test-loss ratio, so a seed whose losses are 10x larger (a
  run that blew up) counts by its rank, not its size, and a relative change reads the same on every
  task. A diverged fixed run (no model: infinite loss) ranks as the largest change of all.
* Pairs with equal losses (a method that never moved, or runs that ended bit-identical) drop out, as
  in Wilcoxon's own treatment of zeros.
* With ``n`` pairs, the exact two-sided test can reach no p-value below ``2 / 2**n``: five seeds can
  never show a difference at the 5% level, so such a cell says it has too few seeds rather than
  calling the result noise.
* The direction of a verdict is the side whose ranks weigh more (the test's own statistic); the median
  shown beside it says how large a typical change is.

docs/cli.md (`selftune bench`) explains the column to users.
"""

from __future__ import annotations

import math
import statistics
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

#: The level below which a paired difference counts as more than the seeds' noise (two-sided).
LEVEL = 0.05


def loss_change(new: float, reference: float) -> tuple[float, bool]:
    """How ``new`` compares with ``reference``: ``(percent change, True)`` where both are positive losses
    (cross-entropy, squared error), else ``(new - reference, False)``: a loss of the user's may be 0 (a hinge
    on separable data) or below (a Gaussian NLL, any loss with a constant), where a ratio divides by zero or
    reads backwards (-4.81 against -4.60 is lower, not "4.7% higher")."""
    if reference > 0 and new >= 0:
        return (new / reference - 1) * 100, True
    return new - reference, False


def describe_change(new: float, reference: float) -> str:
    """:func:`loss_change` as ``"+4.7%"`` or ``"-0.2142"`` (a plain difference)."""
    change, relative = loss_change(new, reference)
    return f"{change:+.1f}%" if relative else f"{change:+.4f}"


def smallest_p(n: int) -> float:
    """The smallest two-sided p-value the exact signed-rank test can give for ``n`` pairs (all one way)."""
    return min(1.0, 2.0 / 2 ** n)


@dataclass(frozen=True)
class Paired:
    """What the paired test found.

    Attributes:
        median: the median change (``-0.1``: 10% lower where ``relative``; a plain difference otherwise;
            NaN where diverged runs on both sides leave no middle).
        p: two-sided Wilcoxon signed-rank p-value; ``None`` with fewer than two informative pairs (or no scipy).
        n: informative (unequal) pairs.
        relative: whether the log ratio was tested (every loss positive) or the difference.
        lower: whether the ranks lean toward a lower tuned loss (negative changes outweigh positive ones),
            the direction the test's verdict reads; ``None`` when they balance.
    """

    median: float
    p: float | None
    n: int
    relative: bool
    lower: bool | None


def paired_test(tuned: Sequence[float], fixed: Sequence[float]) -> Paired:
    """Pair ``tuned`` with ``fixed`` test losses of the same seeds, in order (a non-finite loss is a run that
    diverged), and run the signed-rank test on their changes (module docstring)."""
    if len(tuned) != len(fixed):
        raise ValueError(f"paired_test needs one fixed loss per tuned loss; got {len(tuned)} and {len(fixed)}")
    relative = all(v > 0 for v in (*tuned, *fixed) if math.isfinite(v))
    changes = [c for c in (_change(t, f, relative) for t, f in zip(tuned, fixed)) if c != 0.0]
    if not changes:
        return Paired(0.0, None, 0, relative, None)
    middle = statistics.median(changes)
    median = math.expm1(middle) if relative else middle
    # Only ranks matter: a diverged run's infinite change becomes one larger than every finite one.
    top = 2.0 * max((abs(c) for c in changes if math.isfinite(c)), default=1.0) + 1.0
    ranked = [c if math.isfinite(c) else math.copysign(top, c) for c in changes]
    w_plus, w_minus = _rank_sums(ranked)
    lower = None if w_plus == w_minus else w_minus > w_plus
    if len(changes) < 2:
        return Paired(median, None, len(changes), relative, lower)
    try:
        from scipy.stats import wilcoxon
    except ImportError:  # scipy comes with selftune[bench] (scikit-learn needs it too)
        return Paired(median, None, len(changes), relative, lower)
    with warnings.catch_warnings():  # exact p-values are unavailable with tied ranks: scipy warns and approximates
        warnings.simplefilter("ignore")
        p = float(wilcoxon(ranked, zero_method="wilcox", alternative="two-sided", method="auto").pvalue)
    return Paired(median, p, len(changes), relative, lower)


def describe(tuned: Sequence[float], fixed: Sequence[float]) -> str:
    """One table cell: the median change and what the test makes of it, e.g.
    ``-12.4%, p 0.031: better`` or ``+1.0%, p 0.69: inside the seed noise``."""
    if not tuned:
        return "-"
    if all(math.isnan(t) and math.isnan(f) for t, f in zip(tuned, fixed, strict=False)):
        return "no pair to compare: both runs diverged on every seed"
    r = paired_test(tuned, fixed)
    if math.isnan(r.median):
        change = "median undefined (diverged runs on both sides)"
    elif not math.isfinite(r.median):
        change = "-inf" if r.median < 0 else "+inf"
    else:
        change = f"{r.median * 100:+.1f}%" if r.relative else f"{r.median:+.4g}"
    if r.p is None:
        if r.n == 0:
            return "equal on every seed"
        return f"{change}: one unequal pair, no test" if r.n == 1 else \
            f"{change}: no test (scipy is missing: pip install 'selftune[bench]')"
    if smallest_p(r.n) > LEVEL:
        return f"{change}, p {r.p:.2f}: too few seeds ({r.n}) to tell"
    if r.p < LEVEL and r.lower is not None:
        return f"{change}, p {r.p:.3f}: {'better' if r.lower else 'worse'}"
    return f"{change}, p {r.p:.2f}: inside the seed noise"


def _rank_sums(changes: Sequence[float]) -> tuple[float, float]:
    """Wilcoxon's ``W+`` and ``W-``: the sums of the ranks of ``|change|`` (ties share their mean rank) over
    the positive and the negative changes."""
    order = sorted(range(len(changes)), key=lambda i: abs(changes[i]))
    ranks = [0.0] * len(changes)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and abs(changes[order[j + 1]]) == abs(changes[order[i]]):
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    w_plus = sum(r for r, c in zip(ranks, changes) if c > 0)
    return w_plus, sum(ranks) - w_plus


def _change(tuned: float, fixed: float, relative: bool) -> float:
    """``log(tuned / fixed)`` (``relative``) or ``tuned - fixed``; a diverged run (non-finite loss) loses
    to any finite one, and two diverged runs tie."""
    t_ok, f_ok = math.isfinite(tuned), math.isfinite(fixed)
    if not t_ok or not f_ok:
        return 0.0 if not t_ok and not f_ok else (math.inf if not t_ok else -math.inf)
    return math.log(tuned / fixed) if relative else tuned - fixed
