"""Statistics of the forgetting study v2 (``benchmarks/forgetting.py``): endpoint interpolation,
the paired bootstrap over seeds and evaluation windows, Holm's correction, the minimum detectable
effect. Plain numpy; no model needed.

The endpoint of one run is a function of the per-window losses it logged. A bootstrap replicate
re-weights the evaluation windows (the same multinomial draw for every run: the arms are paired on
windows, as they are on seeds) and redraws the seeds with replacement; each replicate's statistic
is the mean over the drawn seeds of ``arm − reference``.
"""

from __future__ import annotations

import math
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

Z975 = 1.959963984540054
Z80 = 0.8416212335729143


def crossing(task: Sequence[float], other: Sequence[float], level: float,
             steps: Optional[Sequence[float]] = None) -> Optional[Tuple[float, float]]:
    """Where a curve first reaches ``task <= level``, linearly interpolated between logged points.

    Args:
        task (sequence of float): task loss at each logged point (point 0 = before training).
        other (sequence of float): the quantity read off at the crossing (e.g. control loss).
        level (float): the task-loss level ``L*``.
        steps (sequence of float, optional): the step of each point (default ``0, 1, 2, …``).

    Returns:
        ``(other at L*, step at L*)``, or ``None`` when the curve never reaches ``level``. A curve
        that starts at or below ``level`` returns point 0.
    """
    steps = list(range(len(task))) if steps is None else list(steps)
    for k, t in enumerate(task):
        if t <= level:
            if k == 0:
                return float(other[0]), float(steps[0])
            t0, t1 = task[k - 1], t
            f = 0.0 if t0 == t1 else (t0 - level) / (t0 - t1)
            return (float(other[k - 1] + f * (other[k] - other[k - 1])),
                    float(steps[k - 1] + f * (steps[k] - steps[k - 1])))
    return None


def crossing_batch(task: np.ndarray, other: np.ndarray, level) -> np.ndarray:
    """:func:`crossing` over bootstrap replicates: ``task``/``other`` are ``(B, K)``; ``level`` a
    float or one level per replicate ``(B,)`` (L* follows the resampled base loss); returns ``(B,)``
    of ``other`` at the first crossing, ``nan`` where a replicate's curve never reaches its level."""
    task = np.asarray(task, dtype=np.float64)
    other = np.asarray(other, dtype=np.float64)
    B, K = task.shape
    out = np.full(B, np.nan)
    level = np.broadcast_to(np.asarray(level, dtype=np.float64), (B,))
    below = task <= level[:, None]
    any_ = below.any(axis=1)
    k = np.argmax(below, axis=1)
    rows = np.nonzero(any_)[0]
    k = k[rows]
    at0 = k == 0
    r0 = rows[at0]
    out[r0] = other[r0, 0]
    r1, k1 = rows[~at0], k[~at0]
    t0, t1 = task[r1, k1 - 1], task[r1, k1]
    d = t0 - t1
    f = np.where(d == 0, 0.0, (t0 - level[r1]) / np.where(d == 0, 1.0, d))
    out[r1] = other[r1, k1 - 1] + f * (other[r1, k1] - other[r1, k1 - 1])
    return out


def window_weights(n: int, B: int, rng: np.random.Generator) -> np.ndarray:
    """``(B + 1, n)`` bootstrap weights over ``n`` windows (multinomial counts / n); row 0 is the
    identity (every window once), the point estimate."""
    w = rng.multinomial(n, np.full(n, 1.0 / n), size=B).astype(np.float64) / n
    return np.vstack([np.full((1, n), 1.0 / n), w])


ValueFn = Callable[[Mapping[str, np.ndarray]], np.ndarray]
"""A run's endpoint under window weights: ``{set name: (B+1, n) weights}`` → ``(B+1,)`` values."""


def paired_bootstrap(arm: Mapping[int, np.ndarray], ref: Mapping[int, np.ndarray], B: int,
                     rng: np.random.Generator) -> Dict[str, object]:
    """Paired bootstrap of ``mean over seeds (arm − ref)``.

    Args:
        arm, ref (mapping seed → ndarray): each run's endpoint under the shared window weights,
            shape ``(B + 1,)`` (row 0 = all windows once; ``nan`` = endpoint not reached).
        B (int): bootstrap replicates (the arrays hold ``B + 1`` rows).
        rng (numpy Generator): draws the seeds.

    Returns:
        dict with ``seeds`` (the paired seeds), ``diffs`` (per-seed point differences),
        ``mean_diff``, ``ci95`` ``[lo, hi]`` (percentile interval), ``p`` (two-sided bootstrap p:
        ``2·min(P*(d ≤ 0), P*(d ≥ 0))``, at least ``1/B``), ``se`` (bootstrap SD), ``t_ci95`` (paired
        t interval over seeds, a conservative companion for few seeds) and ``valid`` (fraction of
        replicates kept: a replicate is dropped when any of its drawn seeds has no value, as
        pre-registered). With fewer than 2 paired seeds only the point values.
    """
    seeds = sorted(s for s in arm if s in ref and np.isfinite(arm[s][0]) and np.isfinite(ref[s][0]))
    diffs = [float(arm[s][0] - ref[s][0]) for s in seeds]
    res: Dict[str, object] = {"seeds": seeds, "diffs": diffs,
                              "mean_diff": float(np.mean(diffs)) if diffs else None,
                              "ci95": None, "p": None, "se": None, "t_ci95": None, "valid": None}
    if len(seeds) < 2:
        return res
    D = np.stack([arm[s][1:] - ref[s][1:] for s in seeds], axis=1)       # (B, S)
    pick = rng.integers(0, len(seeds), size=(B, len(seeds)))
    drawn = np.take_along_axis(D, pick, axis=1)
    ok = np.isfinite(drawn).all(axis=1)          # a replicate in which a drawn curve misses L* is dropped
    stat = drawn[ok].mean(axis=1)
    res.update(t_ci95=list(t_interval(diffs)), valid=float(ok.mean()))
    if stat.size < 2:
        return res
    lo, hi = np.percentile(stat, [2.5, 97.5])
    p = 2.0 * min(float((stat <= 0).mean()), float((stat >= 0).mean()))
    res.update(ci95=[float(lo), float(hi)], p=float(min(1.0, max(p, 1.0 / B))), se=float(stat.std(ddof=1)))
    return res


def t_quantile_975(df: int) -> float:
    """Student-t 97.5 % quantile for ``df`` degrees of freedom (table for small df, normal beyond)."""
    table = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262,
             10: 2.228, 15: 2.131, 20: 2.086, 30: 2.042}
    if df in table:
        return table[df]
    if df > max(table):
        return Z975
    return table[max(k for k in table if k < df)]      # the next smaller tabulated df: a wider interval


def t_interval(xs: Sequence[float]) -> Tuple[float, float]:
    """The paired-t 95 % interval ``mean ± t_{0.975, n−1} · sd / √n`` of ``xs`` (n ≥ 2)."""
    x = np.asarray(xs, dtype=np.float64)
    if x.size < 2:
        raise ValueError("t_interval needs at least 2 values")
    h = t_quantile_975(x.size - 1) * x.std(ddof=1) / math.sqrt(x.size)
    return float(x.mean() - h), float(x.mean() + h)


def holm(pvals: Mapping[str, Optional[float]], m: Optional[int] = None) -> Dict[str, Optional[float]]:
    """Holm–Bonferroni adjusted p-values (step-down, monotone, capped at 1); ``None`` stays ``None``.

    With ``m`` p-values sorted ``p_(1) ≤ … ≤ p_(m)``: ``p̃_(i) = max_{j ≤ i} min(1, (m − j + 1) p_(j))``.
    ``m`` (default: the number of known p-values) is the size of the pre-registered family: a
    comparison without a p-value yet (too few seeds) still counts, which keeps the correction from
    loosening while the study is incomplete.
    """
    known = sorted(((p, k) for k, p in pvals.items() if p is not None), key=lambda x: (x[0], x[1]))
    if m is None:
        m = len(known)
    elif m < len(known):
        raise ValueError(f"holm: family size m={m} is smaller than the {len(known)} p-values given")
    out: Dict[str, Optional[float]] = {k: None for k in pvals}
    run = 0.0
    for i, (p, k) in enumerate(known):
        run = max(run, min(1.0, (m - i) * p))
        out[k] = run
    return out


def mde(se: Optional[float], alpha_z: float = Z975, power_z: float = Z80) -> Optional[float]:
    """Minimum detectable effect of a two-sided test at level α with power 1 − β: ``(z_{1−α/2} + z_{1−β}) · SE``
    (2.80 · SE at α = 0.05, 80 % power)."""
    return None if se is None else float((alpha_z + power_z) * se)


def z_for_alpha(alpha: float) -> float:
    """Two-sided normal quantile ``z_{1 − α/2}`` (bisection on ``erf``; no scipy needed)."""
    lo, hi = 0.0, 10.0
    target = 1.0 - alpha / 2.0
    for _ in range(80):
        mid = (lo + hi) / 2
        if 0.5 * (1 + math.erf(mid / math.sqrt(2))) < target:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2
