r"""Statistics of a paired, seeded comparison study (plain numpy; no model, no scipy).

A study runs every *arm* (a way of choosing what to train) with the same seeds and evaluates every
run on the same held-out windows, so each arm is compared with a reference arm **paired** on seeds
and on windows. For an arm :math:`a` and the reference :math:`r` with seeds :math:`s = 1, \dots, S`
the statistic is the mean per-seed difference

.. math::  \bar d = \frac1S \sum_{s=1}^{S} \big(y_{a,s} - y_{r,s}\big),

where :math:`y_{\cdot,s}` is a run's endpoint, a function of its per-window losses. This module
gives, for that statistic:

* the **paired bootstrap over seeds and windows** (:func:`window_weights`, :func:`paired_bootstrap`):
  replicate :math:`b` re-weights the windows with one multinomial draw shared by every run (the arms
  stay paired on windows) and redraws the seeds with replacement; percentile interval, two-sided
  bootstrap p and its Monte-Carlo standard error (:func:`mc_se`);
* the **paired t** over seeds (:func:`paired_t`, :func:`t_interval`), with an exact Student-t
  distribution (:func:`t_cdf`, :func:`t_quantile`);
* **Holm's** step-down correction over a pre-registered family (:func:`holm`) and the Monte-Carlo
  error of the adjusted bootstrap p (:func:`holm_mc_se`);
* the **minimum detectable effect** at a level, Holm's first level included, for both tests
  (:func:`mde`, :func:`mde_t`);
* every arm against the reference in one call (:func:`compare_to_reference`), each comparison
  drawing from its own generator (:func:`comparison_rng`), and a rule that raises the number of
  bootstrap replicates until no verdict can flip by Monte-Carlo noise (:func:`verdict_at_risk`,
  :func:`stable_replicates`).

With few seeds (3 in kappatune's forgetting study) the seed bootstrap has only
:math:`\binom{2S-1}{S} = 10` distinct seed draws: when all per-seed differences share a sign, every
replicate does too (up to window noise) and the bootstrap p sits at its floor :math:`1/B` however
small the effect relative to the spread between seeds. The paired t over the same seeds has
:math:`S - 1 = 2` degrees of freedom and is far more conservative; report both.

Example::

    >>> rng = np.random.default_rng(0)
    >>> W = window_weights(64, 2000, rng)                   # (2001, 64), row 0 = every window once
    >>> arm = {s: W @ losses_arm[s] for s in range(3)}     # each run's endpoint per replicate
    >>> ref = {s: W @ losses_ref[s] for s in range(3)}
    >>> r = paired_bootstrap(arm, ref, 2000, comparison_rng(12345, "primary", "lora"))
    >>> r["ci95"], r["p"], r["p_mc_se"]
"""

from __future__ import annotations

import math
import zlib
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, TypeVar

import numpy as np

__all__ = ["paired_bootstrap", "paired_t", "t_interval", "holm", "mde", "mde_t", "mc_se", "stable_replicates",
           "decide"]

Z975 = 1.959963984540054
"""Standard normal 97.5 % quantile :math:`z_{0.975}` (two-sided α = 0.05)."""
Z80 = 0.8416212335729143
"""Standard normal 80 % quantile :math:`z_{0.8}` (power 80 %)."""

_T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262,
         10: 2.228, 15: 2.131, 20: 2.086, 30: 2.042}


# --------------------------------------------------------------------------- endpoints

def crossing(task: Sequence[float], other: Sequence[float], level: float,
             steps: Optional[Sequence[float]] = None) -> Optional[Tuple[float, float]]:
    r"""Where a curve first reaches ``task <= level``, linearly interpolated between logged points.

    With :math:`k` the first point where :math:`t_k \le L` and :math:`f = (t_{k-1} - L)/(t_{k-1} - t_k)`,
    the value read off is :math:`o_{k-1} + f\,(o_k - o_{k-1})` (and the step likewise).

    Args:
        task (sequence of float): task loss at each logged point (point 0 = before training).
        other (sequence of float): the quantity read off at the crossing (e.g. the control loss),
            one per point.
        level (float): the task-loss level :math:`L`.
        steps (sequence of float, optional): the step of each point. Default: ``0, 1, 2, …``.

    Returns:
        ``(other at level, step at level)``, or ``None`` when the curve never reaches ``level``. A
            curve that starts at or below ``level`` returns point 0.
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


def crossing_batch(task: np.ndarray, other: np.ndarray, level: Any) -> np.ndarray:
    """:func:`crossing` for many curves at once (one per bootstrap replicate).

    Args:
        task (numpy.ndarray): task loss, shape ``(B, K)`` (``K`` logged points per curve).
        other (numpy.ndarray): the quantity read off, shape ``(B, K)``.
        level (float or numpy.ndarray): one level for every curve, or one per curve ``(B,)``.

    Returns:
        numpy.ndarray: ``(B,)`` values of ``other`` at the first crossing, ``nan`` where a curve never
            reaches its level.
    """
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


# --------------------------------------------------------------------------- the bootstrap

def window_weights(n: int, B: int, rng: np.random.Generator) -> np.ndarray:
    r"""Bootstrap weights over ``n`` evaluation windows.

    Row :math:`b \ge 1` is a multinomial draw of ``n`` windows with equal probabilities divided by
    ``n`` (a window drawn twice weighs :math:`2/n`), so ``W @ per_window_losses`` is each replicate's
    mean loss. Share one matrix between every run that is compared, so the runs stay paired on
    windows.

    Args:
        n (int): number of windows.
        B (int): number of bootstrap replicates.
        rng (numpy.random.Generator): draws the windows.

    Returns:
        numpy.ndarray: ``(B + 1, n)`` weights; row 0 is the identity (every window once), the point
            estimate.
    """
    w = rng.multinomial(n, np.full(n, 1.0 / n), size=B).astype(np.float64) / n
    return np.vstack([np.full((1, n), 1.0 / n), w])


def resampled_level(weights: np.ndarray, base_per_window: Sequence[float], level: float) -> np.ndarray:
    r"""A level defined on a reference run's loss (e.g. :math:`L^* = \text{base} - \Delta`) under each
    replicate's window weights.

    .. math::  L^\ast_b = L^\ast + (W_b - W_0)\,\ell_{\text{base}},

    so row 0 is exactly ``level`` and each replicate moves the level with its own resampled base loss
    (a level fixed at the full-sample value would turn window noise into endpoint noise).

    Args:
        weights (numpy.ndarray): ``(B + 1, n)`` window weights (:func:`window_weights`).
        base_per_window (sequence of float): the reference loss of each of the ``n`` windows.
        level (float): the level on the full sample.

    Returns:
        numpy.ndarray: ``(B + 1,)`` levels.
    """
    b = np.asarray(weights, dtype=np.float64) @ np.asarray(base_per_window, dtype=np.float64)
    return level + (b - b[0])


def comparison_rng(seed: int, label: str, arm: str) -> np.random.Generator:
    """The generator one comparison draws its bootstrap seeds from, keyed by ``(seed, label, arm)``.

    Each comparison has its own stream (``numpy.random.default_rng([seed, crc32(f"{label}/{arm}")])``),
    so its interval does not move when runs of other arms or endpoints are added or removed.

    Args:
        seed (int): the study's bootstrap seed.
        label (str): the endpoint or family (e.g. ``"primary"``).
        arm (str): the arm compared with the reference.

    Returns:
        numpy.random.Generator: a fresh generator.
    """
    return np.random.default_rng([seed, zlib.crc32(f"{label}/{arm}".encode())])


def mc_se(p: Optional[float], B: Optional[int], two_sided: bool = True) -> Optional[float]:
    r"""Monte-Carlo standard error of a bootstrap p estimated from ``B`` replicates.

    A one-sided p is a binomial proportion :math:`\hat q` of :math:`B` independent replicates:
    :math:`\mathrm{SE} = \sqrt{q(1-q)/B}`. The two-sided p :math:`p = 2\min(\hat q, 1 - \hat q)` is
    twice such a proportion, so :math:`\mathrm{SE} = 2\sqrt{(p/2)(1-p/2)/B} = \sqrt{p(2-p)/B}`
    (about :math:`\sqrt{2}` times the one-sided formula for small :math:`p`).

    Args:
        p (float, optional): the bootstrap p (``None`` passes through).
        B (int, optional): the replicates it was estimated from (those kept, if some were dropped).
        two_sided (bool, optional): ``p`` is ``2·min(q, 1 − q)``. Default: ``True``.

    Returns:
        float or None: the standard error, ``None`` when ``p`` or ``B`` is ``None``.
    """
    if p is None or B is None:
        return None
    if B < 1:
        raise ValueError(f"mc_se: B must be >= 1 replicate, got {B}")
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"mc_se: p must be in [0, 1], got {p}")
    return float(math.sqrt(p * (2.0 - p) / B) if two_sided else math.sqrt(p * (1.0 - p) / B))


def _quantile_mc_se(stat: np.ndarray, q: float) -> float:
    """Monte-Carlo SE of the ``q`` quantile of ``stat``: half the spread between the quantiles at
    ``q ± sqrt(q(1 − q)/B)`` (the order statistics one binomial SE either side)."""
    d = math.sqrt(q * (1.0 - q) / stat.size)
    lo, hi = np.quantile(stat, [max(0.0, q - d), min(1.0, q + d)])
    return float((hi - lo) / 2.0)


def paired_bootstrap(arm: Mapping[int, np.ndarray], ref: Mapping[int, np.ndarray], B: int,
                     rng: np.random.Generator) -> Dict[str, Any]:
    r"""Paired bootstrap over seeds and windows of :math:`\bar d`, the mean over seeds of arm − reference.

    Replicate :math:`b` takes each seed's difference under window weights :math:`W_b` (already in the
    inputs, :func:`window_weights`) and averages it over :math:`S` seeds drawn with replacement:
    :math:`\bar d^*_b = \frac1S\sum_j (y_{a,s_j,b} - y_{r,s_j,b})`. A replicate in which a drawn
    seed has no value (``nan``: e.g. its curve missed the level) is dropped whole. From the
    :math:`B'` replicates kept:

    * 95 % percentile interval :math:`[Q_{0.025}(\bar d^*), Q_{0.975}(\bar d^*)]`;
    * two-sided p :math:`= 2\min\big(P^*(\bar d^* \le 0), P^*(\bar d^* \ge 0)\big)`, floored at
      :math:`1/B` (``p_at_floor`` says when no replicate fell on the other side of zero);
    * bootstrap SE (the SD of :math:`\bar d^*`), the Monte-Carlo SE of p (:func:`mc_se` with
      :math:`B'`) and of each interval bound (half the spread of the quantiles one binomial SE
      either side, :math:`Q_{q \pm \sqrt{q(1-q)/B'}}`).

    Args:
        arm (mapping of int to numpy.ndarray): each seed's endpoint of the arm under the shared window
            weights, shape ``(B + 1,)``; row 0 is the point estimate (every window once), ``nan`` =
            no value.
        ref (mapping of int to numpy.ndarray): the same for the reference arm.
        B (int): bootstrap replicates (the arrays hold ``B + 1`` rows).
        rng (numpy.random.Generator): draws the seeds (:func:`comparison_rng`).

    Returns:
        dict: ``seeds`` (the paired seeds: both runs have a point value), ``diffs`` (per-seed point
            differences), ``mean_diff``, ``ci95`` ``[lo, hi]``, ``ci95_mc_se`` ``[se_lo, se_hi]``,
            ``p``, ``p_at_floor``, ``p_mc_se``, ``se``, ``t_ci95`` (the paired-t interval over seeds,
            :func:`t_interval`), ``valid`` (fraction of replicates kept) and ``kept`` (their number).
            With fewer than 2 paired seeds only the point values; the bootstrap values stay ``None``.
    """
    seeds = sorted(s for s in arm if s in ref and np.isfinite(arm[s][0]) and np.isfinite(ref[s][0]))
    diffs = [float(arm[s][0] - ref[s][0]) for s in seeds]
    res: Dict[str, Any] = {"seeds": seeds, "diffs": diffs,
                           "mean_diff": float(np.mean(diffs)) if diffs else None,
                           "ci95": None, "ci95_mc_se": None, "p": None, "p_at_floor": None, "p_mc_se": None,
                           "se": None, "t_ci95": None, "valid": None, "kept": None}
    if len(seeds) < 2:
        return res
    D = np.stack([arm[s][1:] - ref[s][1:] for s in seeds], axis=1)       # (B, S)
    pick = rng.integers(0, len(seeds), size=(B, len(seeds)))
    drawn = np.take_along_axis(D, pick, axis=1)
    ok = np.isfinite(drawn).all(axis=1)          # a replicate in which a drawn curve misses the level is dropped
    stat = drawn[ok].mean(axis=1)
    res.update(t_ci95=list(t_interval(diffs)), valid=float(ok.mean()), kept=int(stat.size))
    if stat.size < 2:
        return res
    lo, hi = np.percentile(stat, [2.5, 97.5])
    raw = 2.0 * min(float((stat <= 0).mean()), float((stat >= 0).mean()))
    p = float(min(1.0, max(raw, 1.0 / B)))
    res.update(ci95=[float(lo), float(hi)], ci95_mc_se=[_quantile_mc_se(stat, 0.025), _quantile_mc_se(stat, 0.975)],
               p=p, p_at_floor=bool(raw < 1.0 / B), p_mc_se=mc_se(p, int(stat.size)), se=float(stat.std(ddof=1)))
    return res


# --------------------------------------------------------------------------- Student's t

def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz)."""
    tiny = 1e-300
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 1000):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < 1e-16:
            break
    return h


def _betainc(a: float, b: float, x: float) -> float:
    """Regularized incomplete beta function :math:`I_x(a, b)`."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    lbt = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(lbt) * _betacf(a, b, x) / a
    return 1.0 - math.exp(lbt) * _betacf(b, a, 1.0 - x) / b


def _check_df(df: float, who: str) -> None:
    if not df > 0:
        raise ValueError(f"{who}: df must be > 0, got {df}")


def t_pvalue(t: float, df: float) -> float:
    r"""Two-sided p of Student's t: :math:`P(|T_\nu| \ge |t|) = I_{\nu/(\nu + t^2)}(\nu/2, 1/2)`.

    Computed with the regularized incomplete beta function (continued fraction), exact to about
    1e-14; no scipy needed.

    Args:
        t (float): the t statistic (``±inf`` gives 0).
        df (float): degrees of freedom :math:`\nu > 0`.

    Returns:
        float: the two-sided p.
    """
    _check_df(df, "t_pvalue")
    if math.isinf(t):
        return 0.0
    return float(min(1.0, _betainc(df / 2.0, 0.5, df / (df + t * t))))


def t_cdf(t: float, df: float) -> float:
    r"""Student's t distribution function :math:`P(T_\nu \le t)`.

    .. math::  F_\nu(t) = 1 - \tfrac12 I_{\nu/(\nu+t^2)}(\nu/2, 1/2) \quad (t \ge 0), \qquad
               F_\nu(-t) = 1 - F_\nu(t).

    Args:
        t (float): the value.
        df (float): degrees of freedom :math:`\nu > 0`.

    Returns:
        float: :math:`F_\nu(t)`.
    """
    tail = t_pvalue(t, df) / 2.0
    return 1.0 - tail if t >= 0 else tail


def t_quantile(q: float, df: float) -> float:
    r"""Student's t quantile :math:`t_{q,\nu}` (the inverse of :func:`t_cdf`, by bisection to 1e-12
    relative).

    Args:
        q (float): probability, ``0 < q < 1``.
        df (float): degrees of freedom :math:`\nu > 0`.

    Returns:
        float: ``t`` with :math:`F_\nu(t) = q`.
    """
    _check_df(df, "t_quantile")
    if not 0.0 < q < 1.0:
        raise ValueError(f"t_quantile: q must be in (0, 1), got {q}")
    if q == 0.5:
        return 0.0
    if q < 0.5:
        return -t_quantile(1.0 - q, df)
    tail = 2.0 * (1.0 - q)                     # two-sided p of the answer: decreasing in t
    hi = 1.0
    while t_pvalue(hi, df) > tail:
        hi *= 2.0
    lo = 0.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if t_pvalue(mid, df) > tail:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-12 * hi:
            break
    return 0.5 * (lo + hi)


def t_quantile_975(df: int) -> float:
    """Student-t 97.5 % quantile as tabulated to 3 decimals (the pre-registered interval's: 4.303 at
    2 degrees of freedom); an untabulated ``df`` takes the next smaller tabulated one (a wider
    interval), and above 30 the normal 1.960.

    Args:
        df (int): degrees of freedom, at least 1.

    Returns:
        float: the tabulated quantile.
    """
    if df < 1:
        raise ValueError(f"t_quantile_975: df must be >= 1, got {df}")
    if df in _T975:
        return _T975[df]
    if df > max(_T975):
        return Z975
    return _T975[max(k for k in _T975 if k < df)]


def t_interval(xs: Sequence[float]) -> Tuple[float, float]:
    r"""The paired-t 95 % interval :math:`\bar x \pm t_{0.975,\,n-1}\, s/\sqrt n` of ``xs``.

    :math:`s` is the sample SD (:math:`n - 1` in the denominator); the quantile is
    :func:`t_quantile_975`'s (tabulated to 3 decimals, as pre-registered).

    Args:
        xs (sequence of float): the per-seed differences, at least 2.

    Returns:
        tuple of float: ``(lo, hi)``.
    """
    x = np.asarray(xs, dtype=np.float64)
    if x.size < 2:
        raise ValueError(f"t_interval needs at least 2 values, got {x.size}")
    h = t_quantile_975(x.size - 1) * x.std(ddof=1) / math.sqrt(x.size)
    return float(x.mean() - h), float(x.mean() + h)


def paired_t(diffs: Sequence[float]) -> Dict[str, Any]:
    r"""The paired t test over seeds: :math:`t = \bar d / (s_d/\sqrt n)` with :math:`\nu = n - 1`.

    Args:
        diffs (sequence of float): per-seed differences arm − reference, at least 2.

    Returns:
        dict: ``mean``, ``se`` (:math:`s_d/\sqrt n`), ``df``, ``t``, ``p`` (two-sided, exact,
            :func:`t_pvalue`; with :math:`s_d = 0` it is 0 for a non-zero mean and 1 otherwise) and
            ``ci95`` (:func:`t_interval`). The interval uses the tabulated quantile (4.303 at
            :math:`\nu = 2`, exact 4.3027), so interval and p agree except when :math:`|t|` lies within
            that rounding of the quantile.
    """
    x = np.asarray(diffs, dtype=np.float64)
    if x.size < 2:
        raise ValueError(f"paired_t needs at least 2 paired differences, got {x.size}")
    mean, se, df = float(x.mean()), float(x.std(ddof=1) / math.sqrt(x.size)), int(x.size - 1)
    if se == 0.0:
        t, p = (math.copysign(math.inf, mean), 0.0) if mean != 0.0 else (0.0, 1.0)
    else:
        t = mean / se
        p = t_pvalue(t, df)
    return {"mean": mean, "se": se, "df": df, "t": float(t), "p": float(p), "ci95": list(t_interval(x))}


# --------------------------------------------------------------------------- Holm, MDE

def _holm_order(pvals: Mapping[str, Optional[float]]) -> List[Tuple[float, str]]:
    return sorted(((p, k) for k, p in pvals.items() if p is not None), key=lambda x: (x[0], x[1]))


def _family_size(m: Optional[int], known: int) -> int:
    if m is None:
        return known
    if m < known:
        raise ValueError(f"holm: family size m={m} is smaller than the {known} p-values given")
    return m


def holm(pvals: Mapping[str, Optional[float]], m: Optional[int] = None) -> Dict[str, Optional[float]]:
    r"""Holm–Bonferroni adjusted p-values (step-down, monotone, capped at 1).

    With the known p-values sorted :math:`p_{(1)} \le \dots \le p_{(k)}` (ties by key):

    .. math::  \tilde p_{(i)} = \max_{j \le i} \min\big(1, (m - j + 1)\, p_{(j)}\big).

    Rejecting where :math:`\tilde p < \alpha` controls the family-wise error rate at :math:`\alpha`.

    Args:
        pvals (mapping of str to float or None): the family's p-values; ``None`` (no p-value yet)
            stays ``None`` in the result.
        m (int, optional): the size of the pre-registered family. A comparison without a p-value
            yet still counts, which keeps the correction from loosening while a study is
            incomplete. Default: the number of known p-values.

    Returns:
        dict: the adjusted p-value of each key.
    """
    known = _holm_order(pvals)
    m = _family_size(m, len(known))
    out: Dict[str, Optional[float]] = {k: None for k in pvals}
    run = 0.0
    for i, (p, k) in enumerate(known):
        run = max(run, min(1.0, (m - i) * p))
        out[k] = run
    return out


def holm_mc_se(pvals: Mapping[str, Optional[float]], ses: Mapping[str, Optional[float]],
               m: Optional[int] = None) -> Dict[str, Optional[float]]:
    r"""Monte-Carlo SE of each Holm-adjusted p (delta method through the step that sets it).

    :math:`\tilde p_{(i)}` equals :math:`(m - j^* + 1)\,p_{(j^*)}` for the :math:`j^* \le i` that
    attains the running maximum of :func:`holm`, so its Monte-Carlo SE is
    :math:`(m - j^* + 1)\,\mathrm{SE}(p_{(j^*)})` (on a tie, the larger of the tied candidates).

    Args:
        pvals (mapping of str to float or None): the family's unadjusted p-values.
        ses (mapping of str to float or None): the Monte-Carlo SE of each (:func:`mc_se`); a missing
            one counts as 0.
        m (int, optional): the pre-registered family size (as in :func:`holm`). Default: the number
            of known p-values.

    Returns:
        dict: the SE of each adjusted p-value, ``None`` where the p-value is ``None``.
    """
    known = _holm_order(pvals)
    m = _family_size(m, len(known))
    out: Dict[str, Optional[float]] = {k: None for k in pvals}
    run, run_se = -1.0, 0.0
    for i, (p, k) in enumerate(known):
        val, se = min(1.0, (m - i) * p), (m - i) * float(ses.get(k) or 0.0)
        if val > run:
            run, run_se = val, se
        elif val == run:
            run_se = max(run_se, se)
        out[k] = run_se
    return out


def z_for_alpha(alpha: float) -> float:
    r"""Two-sided standard normal quantile :math:`z_{1-\alpha/2}` (bisection on ``erf``; no scipy).

    Args:
        alpha (float): two-sided level, ``0 < alpha < 1``.

    Returns:
        float: :math:`z_{1-\alpha/2}` (1.95996 at α = 0.05).
    """
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"z_for_alpha: alpha must be in (0, 1), got {alpha}")
    lo, hi = 0.0, 40.0
    target = 1.0 - alpha / 2.0
    for _ in range(200):
        mid = (lo + hi) / 2
        if 0.5 * math.erfc(-mid / math.sqrt(2)) < target:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def mde(se: Optional[float], alpha_z: float = Z975, power_z: float = Z80) -> Optional[float]:
    r"""Minimum detectable effect of a two-sided z-type test: :math:`(z_{1-\alpha/2} + z_{1-\beta})\,\mathrm{SE}`.

    2.80 · SE at α = 0.05 and 80 % power; at Holm's first level :math:`\alpha/m` pass
    ``alpha_z=z_for_alpha(alpha / m)``.

    Args:
        se (float, optional): standard error of the difference (``None`` passes through).
        alpha_z (float, optional): :math:`z_{1-\alpha/2}`. Default: :data:`Z975`.
        power_z (float, optional): :math:`z_{1-\beta}`. Default: :data:`Z80`.

    Returns:
        float or None: the effect detected with the given power.
    """
    return None if se is None else float((alpha_z + power_z) * se)


def mde_t(se: Optional[float], df: Optional[int], alpha: float = 0.05, power: float = 0.8) -> Optional[float]:
    r"""Minimum detectable effect of the paired t test:
    :math:`(t_{1-\alpha/2,\nu} + t_{\text{power},\nu})\,s_d/\sqrt n`.

    The usual central-t approximation of the power (e.g. 5.36 · SE at :math:`\nu = 2`, α = 0.05,
    80 % power); at Holm's first level pass ``alpha=alpha / m``.

    Args:
        se (float, optional): :math:`s_d/\sqrt n` (``None`` passes through).
        df (int, optional): degrees of freedom :math:`\nu = n - 1` (``None`` passes through).
        alpha (float, optional): two-sided level. Default: ``0.05``.
        power (float, optional): power. Default: ``0.8``.

    Returns:
        float or None: the effect detected with the given power.
    """
    if se is None or df is None:
        return None
    return float((t_quantile(1.0 - alpha / 2.0, df) + t_quantile(power, df)) * se)


# --------------------------------------------------------------------------- one family of comparisons

def decide(ci: Optional[Sequence[float]], p_holm: Optional[float], alpha: float = 0.05) -> int:
    """The verdict rule: ``+1`` (arm above the reference) or ``-1`` (below) only where the 95 % interval
    excludes zero **and** the Holm-adjusted p is below ``alpha``; otherwise ``0`` (no difference
    detected).

    Args:
        ci (sequence of float, optional): ``[lo, hi]``.
        p_holm (float, optional): the Holm-adjusted p.
        alpha (float, optional): family-wise level. Default: ``0.05``.

    Returns:
        int: ``+1``, ``-1`` or ``0``.
    """
    if ci is None or p_holm is None or not p_holm < alpha:
        return 0
    lo, hi = ci
    return 1 if lo > 0 else -1 if hi < 0 else 0


def compare_to_reference(values: Mapping[str, Mapping[int, np.ndarray]], ref: str, B: int, seed: int, label: str,
                         family: Sequence[str], alpha: float = 0.05, power: float = 0.8) -> Dict[str, Dict[str, Any]]:
    r"""Every arm against ``ref``: paired bootstrap and paired t, each with Holm over the family.

    Each arm's comparison is :func:`paired_bootstrap` with its own generator
    (:func:`comparison_rng` keyed by ``(seed, label, arm)``), plus :func:`paired_t` on the same
    per-seed differences. Holm runs over the pre-registered family of :math:`m` comparisons (every arm
    of ``family`` but ``ref``, whether or not it has a p-value yet), once on the bootstrap p-values
    and once on the paired-t ones. MDEs are given at :math:`\alpha` and at Holm's first level
    :math:`\alpha/m`.

    Args:
        values (mapping of str to mapping of int to numpy.ndarray): ``{arm: {seed: (B + 1,) endpoint}}``
            under shared window weights (row 0 the point estimate).
        ref (str): the reference arm.
        B (int): bootstrap replicates.
        seed (int): the study's bootstrap seed.
        label (str): the endpoint (keys the generators).
        family (sequence of str): the pre-registered arms of this family (``ref`` may be among them).
        alpha (float, optional): family-wise level. Default: ``0.05``.
        power (float, optional): power of the MDEs. Default: ``0.8``.

    Returns:
        dict: per arm, :func:`paired_bootstrap`'s keys plus ``p_holm``, ``p_holm_mc_se``, ``holm_m``,
            ``mde``, ``mde_holm`` (bootstrap, z-based on its SE), ``t_stat``, ``t_df``, ``t_se``, ``t_p``,
            ``t_p_holm``, ``t_mde``, ``t_mde_holm`` (paired t), and ``decision`` / ``t_decision``
            (:func:`decide` on the bootstrap interval with its Holm p, and on the t interval with its).
    """
    m = max(1, len([a for a in family if a != ref]))
    if ref not in values:
        return {}
    res = {a: paired_bootstrap(v, values[ref], B, comparison_rng(seed, label, a))
           for a, v in values.items() if a != ref}
    for r in res.values():
        t = paired_t(r["diffs"]) if len(r["diffs"]) >= 2 else None
        r.update(t_stat=None if t is None else t["t"], t_df=None if t is None else t["df"],
                 t_se=None if t is None else t["se"], t_p=None if t is None else t["p"])
    adj = holm({a: r["p"] for a, r in res.items()}, m=m)
    adj_se = holm_mc_se({a: r["p"] for a, r in res.items()}, {a: r["p_mc_se"] for a, r in res.items()}, m=m)
    adj_t = holm({a: r["t_p"] for a, r in res.items()}, m=m)
    z_a, z_h, z_p = z_for_alpha(alpha), z_for_alpha(alpha / m), z_for_alpha(2.0 * (1.0 - power))
    for a, r in res.items():
        r.update(p_holm=adj[a], p_holm_mc_se=adj_se[a], holm_m=m, t_p_holm=adj_t[a],
                 mde=mde(r["se"], z_a, z_p), mde_holm=mde(r["se"], z_h, z_p),
                 t_mde=mde_t(r["t_se"], r["t_df"], alpha, power),
                 t_mde_holm=mde_t(r["t_se"], r["t_df"], alpha / m, power),
                 decision=decide(r["ci95"], adj[a], alpha), t_decision=decide(r["t_ci95"], adj_t[a], alpha))
    return res


# --------------------------------------------------------------------------- enough replicates

def verdict_at_risk(comparison: Mapping[str, Any], alpha: float = 0.05, k: float = 3.0) -> bool:
    r"""Whether Monte-Carlo noise could flip a comparison's bootstrap verdict (:func:`decide`).

    At risk when :math:`|\tilde p - \alpha| \le k\,\mathrm{SE}_{MC}(\tilde p)` (``p_holm``,
    ``p_holm_mc_se``), or, for a comparison below ``alpha``, when the interval bound nearest zero is
    within :math:`k` of its Monte-Carlo SEs (``ci95``, ``ci95_mc_se``) of zero or on the other side.

    Args:
        comparison (mapping): one comparison of :func:`compare_to_reference`.
        alpha (float, optional): family-wise level. Default: ``0.05``.
        k (float, optional): Monte-Carlo SEs of margin. Default: ``3.0``.

    Returns:
        bool: ``True`` when the verdict is within ``k`` Monte-Carlo SEs of flipping.
    """
    p, se = comparison.get("p_holm"), comparison.get("p_holm_mc_se")
    if p is None:
        return False
    if abs(p - alpha) <= k * (se or 0.0):
        return True
    ci, cse = comparison.get("ci95"), comparison.get("ci95_mc_se")
    if p < alpha and ci is not None:
        lo, hi = ci
        se_lo, se_hi = cse if cse is not None else (0.0, 0.0)
        if lo > 0:
            return lo <= k * se_lo
        if hi < 0:
            return -hi <= k * se_hi
        return True                              # p_holm below alpha with an interval holding zero
    return False


_T = TypeVar("_T")


def stable_replicates(evaluate: Callable[[int], _T], comparisons: Callable[[_T], Mapping[str, Mapping[str, Any]]],
                      B: int = 2000, B_max: int = 256_000, alpha: float = 0.05, k: float = 3.0,
                      growth: int = 2) -> Tuple[_T, Dict[str, Any]]:
    r"""Raise the bootstrap replicates until no verdict can flip by Monte-Carlo noise.

    Runs ``evaluate(B)`` for :math:`B = B_0, g B_0, g^2 B_0, \dots` (capped at ``B_max``) and stops at
    the first :math:`B` where no comparison is :func:`verdict_at_risk`, or at ``B_max``, which is then
    reported as not stable with the comparisons still at risk. The Monte-Carlo SE of a p falls as
    :math:`1/\sqrt B`, so a comparison whose exact bootstrap p is at distance :math:`\delta` from
    :math:`\alpha` needs about :math:`B > k^2 p(2-p)/\delta^2` replicates; one sitting on
    :math:`\alpha` is never resolved.

    Args:
        evaluate (callable): ``B`` → the analysis at ``B`` replicates.
        comparisons (callable): the analysis → ``{name: comparison}`` (each with ``p_holm``,
            ``p_holm_mc_se``, ``ci95``, ``ci95_mc_se``).
        B (int, optional): the first replicate count. Default: ``2000``.
        B_max (int, optional): the most replicates tried. Default: ``256000``.
        alpha (float, optional): family-wise level. Default: ``0.05``.
        k (float, optional): Monte-Carlo SEs of margin. Default: ``3.0``.
        growth (int, optional): factor between successive counts. Default: ``2``.

    Returns:
        tuple: ``(analysis at the last B, info)``; ``info`` holds ``B`` (the last count), ``B_start``,
            ``B_max``, ``alpha``, ``k``, ``stable`` (bool), ``at_risk`` (names still at risk) and
            ``history`` (``[{"B": …, "at_risk": […]}, …]``).
    """
    if B < 2:
        raise ValueError(f"stable_replicates: B must be >= 2, got {B}")
    if B_max < B:
        raise ValueError(f"stable_replicates: B_max={B_max} is below the first replicate count B={B}")
    if growth < 2:
        raise ValueError(f"stable_replicates: growth must be an integer >= 2, got {growth}")
    b, history = B, []
    while True:
        result = evaluate(b)
        risky = sorted(name for name, c in comparisons(result).items() if verdict_at_risk(c, alpha, k))
        history.append({"B": b, "at_risk": risky})
        if not risky or b >= B_max:
            break
        b = min(B_max, b * growth)
    return result, {"B": b, "B_start": B, "B_max": B_max, "alpha": alpha, "k": k, "stable": not risky,
                    "at_risk": risky, "history": history}
