r"""Learning–forgetting frontiers: per-run curves, each arm's lower envelope over its grid, and the
numbers read off them. Plain numpy.

**A run's curve.** At each evaluated step :math:`k` a run has a task loss :math:`T_k` and a control
loss :math:`C_k` (means over fixed held-out windows; point 0 is the untouched model). Its frontier
is Δcontrol :math:`D_k = C_k - C_0` against :math:`T_k`. At a task-loss level :math:`L`, the run's
value is read where its task curve *first* reaches :math:`L`, linearly interpolated between the
two evaluated points around the crossing (the endpoint of the forgetting study v2):

.. math::  f(L) = D_{k-1} + \frac{T_{k-1} - L}{T_{k-1} - T_k}\,(D_k - D_{k-1}),
           \qquad k = \min\lbrace k : T_k \le L\rbrace,

and the step at :math:`L` likewise; :math:`f(L)` is undefined (``nan``) when the run never reaches
:math:`L`. Levels are declared as drops :math:`\delta` below the base model's task loss,
:math:`L = T_0 - \delta`.

**The envelope.** An arm run at several learning rates (and ``decay_to_init`` λ) on one seed has,
at each level, the smallest Δcontrol of its runs that reach it (Biderman et al. 2024 compare
methods this way: a method that only looks better at one learning rate is not better):

.. math::  E_s(\delta) = \min_{\text{runs } r \text{ of seed } s} f_r(T_0 - \delta).

**Numbers.** Δcontrol at each declared level on the envelope; the *mean envelope* over a declared
range :math:`[\delta_1, \delta_2]`, :math:`\bar E = \frac{1}{\delta_2 - \delta_1}\int E(\delta)\,d\delta`
(trapezoid rule on :data:`AREA_POINTS` levels; undefined when the envelope does not reach
:math:`\delta_2`), so that the *area between two envelopes* is
:math:`\int (E_a - E_b)\,d\delta = (\delta_2 - \delta_1)(\bar E_a - \bar E_b)`; and the steps the
envelope's run needs to reach each level.

Every function takes curves as arrays with one row per bootstrap replicate (row 0 = every window
once, the point estimate; :func:`replicate_curve` applies window weights to per-window losses), so
the same code gives point values and bootstrap distributions.
"""

from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

__all__ = ["run_points", "blend_run_points", "envelope_index", "crossing_levels", "area_between",
           "mean_over_range"]

AREA_POINTS = 101
r"""Levels of the trapezoid rule over an area's range. Exact where the envelope is linear between two
levels; a kink (two runs' curves crossing, slope change :math:`\Delta s`) inside a step :math:`h` costs at
most :math:`\Delta s\,h^2/8` of the integral, a jump :math:`J` (a non-monotone task curve's first crossing)
at most :math:`J h/2`. Over v3's range (width 0.2 nats, :math:`h` = 0.002) that is at most
:math:`2.5\cdot 10^{-6}\,\Delta s` and :math:`5\cdot 10^{-3} J` of the mean, far below any detectable effect."""
_CHUNK = 4096


def run_points(run: Mapping[str, Any]) -> List[Mapping[str, Any]]:
    r"""The evaluated points of a run's curve (point 0 = the untouched model), in step order.

    A point is evaluated when it holds per-window task losses. Point :math:`k`, with its losses
    :math:`t_{k,i}` on the :math:`n_T` task windows and :math:`c_{k,i}` on the :math:`n_C` control
    windows, gives the curve of the module docstring (:func:`replicate_curve` computes it):

    .. math::  T_k = \frac{1}{n_T} \sum_{i=1}^{n_T} t_{k,i}, \qquad C_k = \frac{1}{n_C} \sum_{i=1}^{n_C} c_{k,i},
               \qquad D_k = C_k - C_0.

    Args:
        run (mapping): a run file's content; its ``curve`` is a list of points, each with ``step``
            and, when evaluated, ``task_curve_pw`` and ``control_curve_pw`` (per-window losses).

    Returns:
        list of mapping: the points of ``run["curve"]`` that hold ``task_curve_pw``, in their order
            (point 0 first).
    """
    return [p for p in run["curve"] if p.get("task_curve_pw") is not None]


def blend_run_points(run: Mapping[str, Any]) -> List[Dict[str, Any]]:
    r"""The blend curve of a run, ordered by :math:`\alpha`: the untouched model (:math:`\alpha = 0`),
    each blend point, the trained model (:math:`\alpha = 1`, its last curve point); the point's
    ``step`` is :math:`\alpha`. A blend point evaluates the weights

    .. math::  W(\alpha) = W_0 + \alpha\,(W_1 - W_0)

    (:math:`W_0` the untouched model's, :math:`W_1` the trained model's), so the curve runs from the
    base model to the trained one and :func:`crossing_levels` reads it like a training curve.

    Args:
        run (mapping): a run file's content: its ``curve`` (:func:`run_points`) and ``blend``, a list of
            points each with ``alpha``, ``task_curve_pw`` and ``control_curve_pw`` (``None`` or empty:
            the run has no blend).

    Returns:
        list of dict: copies of the points with ``step`` set to :math:`\alpha`; empty when the run has
            no blend points.
    """
    if not run.get("blend"):
        return []
    pts = run_points(run)
    mid = sorted(run["blend"], key=lambda b: b["alpha"])
    return ([dict(pts[0], step=0.0)] + [dict(b, step=float(b["alpha"])) for b in mid]
            + [dict(pts[-1], step=1.0)])


def replicate_curve(points: Sequence[Mapping[str, Any]], Wt: Optional[np.ndarray] = None,
                    Wc: Optional[np.ndarray] = None) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(T, D, steps)`` of a curve under window weights.

    Args:
        points (sequence of mapping): the curve's points, each with ``task_curve_pw``,
            ``control_curve_pw`` (per-window losses) and ``step``; point 0 is the reference of Δcontrol.
        Wt (numpy.ndarray, optional): ``(R, n_task)`` task-window weights (row 0 the identity).
            Default: ``None`` (one row: the plain means).
        Wc (numpy.ndarray, optional): ``(R, n_control)`` control-window weights. Default: ``None``.

    Returns:
        tuple: ``T`` ``(R, K)`` task losses, ``D`` ``(R, K)`` Δcontrol (control loss − point 0's, per
            replicate), ``steps`` ``(K,)``.
    """
    tp = np.asarray([p["task_curve_pw"] for p in points], dtype=np.float64)        # (K, n)
    cp = np.asarray([p["control_curve_pw"] for p in points], dtype=np.float64)
    T = tp.mean(1)[None, :] if Wt is None else Wt @ tp.T
    C = cp.mean(1)[None, :] if Wc is None else Wc @ cp.T
    return T, C - C[:, :1], np.asarray([float(p["step"]) for p in points])


def point_curve(task: Sequence[float], dcontrol: Sequence[float]) -> Tuple[np.ndarray, np.ndarray]:
    """``(T, D)`` of one hand-made curve as one-row arrays (for :func:`crossing_levels`)."""
    return np.asarray(task, dtype=np.float64)[None, :], np.asarray(dcontrol, dtype=np.float64)[None, :]


def levels_for(base_task: np.ndarray, deltas: Sequence[float]) -> np.ndarray:
    r"""Task-loss levels :math:`L = T_0 - \delta` per replicate: ``base_task`` ``(R,)`` (the base model's
    task loss under each replicate's weights) → ``(R, len(deltas))``."""
    return np.asarray(base_task, dtype=np.float64)[:, None] - np.asarray(deltas, dtype=np.float64)[None, :]


def crossing_levels(T: np.ndarray, Y: np.ndarray, levels: np.ndarray) -> np.ndarray:
    """Where each curve first reaches each level, ``Y`` interpolated there (see the module docstring).

    Args:
        T (numpy.ndarray): ``(R, K)`` task losses (one curve per row).
        Y (numpy.ndarray): ``(R, K)`` the quantity read off (Δcontrol, or the steps broadcast).
        levels (numpy.ndarray): ``(R, n)`` levels per row (or ``(n,)`` for every row).

    Returns:
        numpy.ndarray: ``(R, n)``; ``nan`` where a curve never reaches a level; a curve that starts at
            or below a level gives its point 0.
    """
    T = np.asarray(T, dtype=np.float64)
    Y = np.broadcast_to(np.asarray(Y, dtype=np.float64), T.shape)
    R, K = T.shape
    lv = np.asarray(levels, dtype=np.float64)
    lv = np.broadcast_to(lv, (R, lv.shape[-1])) if lv.ndim == 1 else lv
    out = np.full(lv.shape, np.nan)
    for a in range(0, R, _CHUNK):
        t, y, L = T[a:a + _CHUNK], Y[a:a + _CHUNK], lv[a:a + _CHUNK]
        below = t[:, None, :] <= L[:, :, None]                        # (r, n, K)
        hit = below.any(axis=2)
        k = np.argmax(below, axis=2)                                   # first point at or below
        km = np.maximum(k - 1, 0)
        t1 = np.take_along_axis(t, k, axis=1)
        t0 = np.take_along_axis(t, km, axis=1)
        y1 = np.take_along_axis(y, k, axis=1)
        y0 = np.take_along_axis(y, km, axis=1)
        d = t0 - t1
        f = np.where((k == 0) | (d == 0), 0.0, (t0 - L) / np.where(d == 0, 1.0, d))
        v = np.where(k == 0, y1, y0 + f * (y1 - y0))
        out[a:a + _CHUNK] = np.where(hit, v, np.nan)
    return out


def envelope(values: Sequence[np.ndarray]) -> np.ndarray:
    """The lower envelope: elementwise minimum over runs, ignoring runs that miss (``nan``); ``nan``
    where no run has a value.

    Args:
        values (sequence of numpy.ndarray): one array per run, all the same shape.
    """
    arr = np.stack([np.asarray(v, dtype=np.float64) for v in values])
    with np.errstate(all="ignore"):
        return np.fmin.reduce(arr, axis=0)


def envelope_index(values: Sequence[np.ndarray]) -> np.ndarray:
    r"""Which run gives the envelope at each element (the first on a tie); ``-1`` where none has a value.

    With :math:`v_r(x)` run :math:`r`'s value at element :math:`x` and :math:`E(x)` the envelope
    (:func:`envelope`, the minimum over the runs that have a value),

    .. math::  i(x) = \min\lbrace r : v_r(x) = E(x)\rbrace.

    Args:
        values (sequence of numpy.ndarray): one array per run, all the same shape (e.g. Δcontrol at
            each level), ``nan`` where a run has no value (it does not reach the level).

    Returns:
        numpy.ndarray: integer indices into ``values``, of the shape of one of its arrays; ``-1``
            where every run is ``nan``.
    """
    arr = np.stack([np.asarray(v, dtype=np.float64) for v in values])
    filled = np.where(np.isnan(arr), np.inf, arr)
    idx = np.argmin(filled, axis=0)
    return np.where(np.isnan(arr).all(axis=0), -1, idx)


def range_grid(lo: float, hi: float, n: int = AREA_POINTS) -> np.ndarray:
    """``n`` equally spaced drops from ``lo`` to ``hi`` (the levels an area is integrated over)."""
    return np.linspace(float(lo), float(hi), int(n))


def mean_over_range(values: np.ndarray, grid: np.ndarray) -> np.ndarray:
    r"""Mean of a function of the drop over its range, by the trapezoid rule.

    Args:
        values (numpy.ndarray): ``(R, n)`` values at the drops ``grid``.
        grid (numpy.ndarray): ``(n,)`` drops, increasing.

    Returns:
        numpy.ndarray: ``(R,)``
            :math:`\frac{1}{\delta_n - \delta_1}\sum_i \frac{(v_i + v_{i+1})(\delta_{i+1} - \delta_i)}{2}`;
            ``nan`` for a row with any ``nan`` (the envelope does not cover the range).
    """
    v = np.asarray(values, dtype=np.float64)
    g = np.asarray(grid, dtype=np.float64)
    w = np.diff(g)
    integral = ((v[:, 1:] + v[:, :-1]) * w[None, :]).sum(axis=1) / 2.0
    return integral / (g[-1] - g[0])


def area_between(a: np.ndarray, b: np.ndarray, grid: np.ndarray) -> np.ndarray:
    r"""Area between two envelopes over the range of drops ``grid`` (nats²; positive when ``a`` forgets
    more):

    .. math::  \int_{\delta_1}^{\delta_n} (E_a - E_b)\,d\delta = (\delta_n - \delta_1)\,(\bar E_a - \bar E_b),

    with :math:`\bar E` an envelope's trapezoid-rule mean over the range (:func:`mean_over_range`).

    Args:
        a (numpy.ndarray): ``(R, n)`` the first envelope :math:`E_a` at the drops ``grid``, one row per
            bootstrap replicate.
        b (numpy.ndarray): ``(R, n)`` the second envelope :math:`E_b`, likewise.
        grid (numpy.ndarray): ``(n,)`` drops :math:`\delta_1 < \dots < \delta_n` (:func:`range_grid`).

    Returns:
        numpy.ndarray: ``(R,)`` areas; ``nan`` where either envelope does not cover the range (a
            ``nan`` in its row).
    """
    g = np.asarray(grid, dtype=np.float64)
    return (mean_over_range(a, g) - mean_over_range(b, g)) * (g[-1] - g[0])
