"""Paired statistics over seeds: the one place where the course turns runs into a stated difference.

Runs of one seed share their initial weights and data order across methods, so two methods are compared through
the per-seed differences a_i - b_i, with a paired t interval over seeds (scipy.stats.t). A verdict is stated only
when the interval excludes zero; otherwise the comparison is a tie at this number of seeds. Called by
kdutils.results (results.json's "comparisons", notebook 5's verdicts).
"""
from __future__ import annotations

import math
from collections.abc import Sequence

from scipy import stats

INTERVAL_METHOD = "paired t interval over seeds"


def paired_difference(a: Sequence[float], b: Sequence[float], confidence: float = 0.95) -> dict:
    """Mean of a_i - b_i and its paired t interval (None with fewer than 2 pairs); a and b are per-seed values in
    the same seed order."""
    if len(a) != len(b):
        raise ValueError(f"paired values need one per seed on both sides; got {len(a)} and {len(b)}. Compare runs "
                         f"over the same seeds.")
    if not a:
        raise ValueError("no values to compare: pass at least one seed per side.")
    diffs = [x - y for x, y in zip(a, b)]
    n = len(diffs)
    mean = sum(diffs) / n
    out = {"mean_diff": mean, "low": None, "high": None, "n_seeds": n, "confidence": confidence,
           "method": INTERVAL_METHOD}
    if n >= 2:
        sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1))
        half = float(stats.t.ppf(0.5 + confidence / 2, n - 1)) * sd / math.sqrt(n)
        out["low"], out["high"] = mean - half, mean + half
    return out


def verdict(d: dict, a: str, b: str) -> str:
    """What a paired_difference allows one to say about a against b: a direction only when its interval excludes
    zero."""
    if d["low"] is None:
        return "one seed: no interval, no verdict"
    if d["low"] > 0:
        return f"{a} above {b} (the interval excludes 0)"
    if d["high"] < 0:
        return f"{a} below {b} (the interval excludes 0)"
    return "cannot tell (the interval includes 0)"
