"""Condition numbers (and Spectrum's SNR) of weight tensors.

The condition number of a matrix :math:`W \\in \\mathbb{R}^{m\\times n}` is

.. math::  \\kappa(W) = \\sigma_{\\max}(W) / \\sigma_{\\min}(W),

with :math:`\\sigma_{\\min}` the smallest of its :math:`\\min(m, n)` singular values.

Guarantee
---------
For every finite input, in any floating dtype and on any device, every κ this module returns (of
one matrix, of each matrix of a stack, in every layout) agrees with a float64 SVD
(``numpy.linalg.svd``) to better than ``1e-6`` relative for every κ up to ``1e6``, whichever of
the four methods below computes it; beyond ``1e6`` the SVD path is accurate to about
``1e-16 · κ``. Moreover:

* κ is computed in float64 where the tensor is (on the CPU for Apple MPS, which has no float64).
* κ is a deterministic function of the matrix: no random state enters (the Lanczos start block
  is fixed), repeated runs give the same bits, and a matrix in a stack or alone gets the same κ
  up to the rounding of batched BLAS calls (about ``1e-15`` relative).
* Rank-deficient matrices (:math:`\\sigma_{\\min} \\le \\sigma_{\\max}\\,\\max(m,n)\\,\\varepsilon`,
  numpy's ``matrix_rank`` tolerance in float64) and all-zero matrices get ``κ = inf``. The test is
  on the values as stored: a low-rank product rounded to float32 or bf16 is, as stored, full rank
  with a very large but finite κ.
* Weights holding NaN or Inf raise :class:`ValueError` naming the tensor.
* Weights of extreme magnitude (a squared row norm outside :math:`[2^{-600}, 2^{600}]`, i.e.
  weights beyond about ``1e±154``) are first rescaled by an exact power of two (κ unchanged, σ
  scaled back exactly), so nothing overflows or underflows.

Methods
-------
Only the two extreme singular values are computed, never singular vectors. With the float64 Gram
matrix of the short side, :math:`G = W W^\\top` (or :math:`W^\\top W`), whose eigenvalues are
:math:`\\sigma_i^2`,

.. math::  \\kappa = \\sqrt{\\lambda_{\\max}(G) / \\lambda_{\\min}(G)}.

Forming :math:`G` squares the conditioning: rounding perturbs κ by about

.. math::  \\tfrac12 \\sqrt{\\max(m,n)}\\; \\varepsilon\\, \\kappa^2, \\qquad \\varepsilon = 2.2\\cdot10^{-16},

so the methods on :math:`G` are used only while that estimate is at most ``1e-7`` (κ up to about
6000 for a side of 576). The extreme eigenvalues come from the first of these that applies:

1. **Dense**: every eigenvalue of :math:`G`. The default on the CPU, and on every device for
   sides up to 96.
2. **Certified extremes** (off the CPU, sides above 96): block Lanczos gives
   :math:`\\theta \\le \\lambda_{\\max}(G)` and, on :math:`G^{-1}`, :math:`u \\ge \\lambda_{\\min}(G)`;
   the Cholesky factorisations of :math:`\\theta(1+\\tau) I - G` and of :math:`G - u(1-\\tau) I`
   succeeding prove :math:`\\lambda_{\\max} < \\theta(1+\\tau)` and :math:`\\lambda_{\\min} > u(1-\\tau)`
   (Sylvester's law of inertia), :math:`\\tau = 4\\cdot10^{-7}`. A failed certificate or an
   iteration that does not converge sends the matrix to method 1.
3. **QR** (the estimate above ``1e-7``, sides above 96): with :math:`R` the triangular factor of
   the QR factorisation of :math:`W^\\top` (or :math:`W`), :math:`G = R^\\top R`, and
   :math:`\\lambda_{\\min}(G) = 1/\\lambda_{\\max}(H)` with :math:`H = R^{-1} R^{-\\top}`, formed
   without :math:`G` (error about :math:`\\varepsilon\\,\\kappa`, not :math:`\\varepsilon\\,\\kappa^2`);
   block Lanczos on :math:`H`, certified by the Cholesky factorisation of
   :math:`\\theta(1+\\tau) I - H`; :math:`\\lambda_{\\max}` from :math:`G`. Used while
   :math:`\\sqrt{\\max(m,n)}\\,\\varepsilon\\,\\kappa \\le 10^{-7}` and :math:`\\kappa \\le 10^{10}`.
4. **SVD** (everything else: κ beyond the QR path, a failed QR certificate, rank deficiency,
   ill-conditioned matrices with sides up to 96): a values-only float64 SVD, relative error on
   :math:`\\sigma_{\\min}` about :math:`\\varepsilon\\,\\kappa`.

The certificates are statements about the computed :math:`G`; the rounding of the factorisations
is a backward error of the same order as that of the Gram product and is covered by the same
estimate. How each method is carried out, why the CPU uses the dense one, and what each costs:
the documentation's concept page "How κ is computed" and the κ-methods benchmark.

Layouts
-------
* ``"matrix"``: a 2-D weight, used as is.
* ``"flatten"``: an N-D weight such as a convolution kernel ``(out, in, kh, kw)``, reshaped to
  ``(out, -1)``.
* ``"stack"``: a 3-D parameter that stores a stack of matrices, such as the fused expert
  weights of a mixture-of-experts layer ``(num_experts, m, n)``. κ is computed per matrix and
  aggregated with ``"mean"`` (default) or ``"max"``; the per-matrix values are kept.

Spectrum's SNR
--------------
:func:`snr_of` computes the signal-to-noise ratio that Spectrum (Hartford et al., 2024,
arXiv 2406.06623) ranks matrices by, from all :math:`k = \\min(m, n)` singular values
:math:`\\sigma_1 \\ge \\dots \\ge \\sigma_k` of :math:`W \\in \\mathbb{R}^{m\\times n}`:

.. math::

    s = \\frac{Q_{75}(\\sigma) - Q_{25}(\\sigma)}{1.349}, \\qquad
    \\tau = s\\,(1 + \\sqrt{\\beta}), \\quad \\beta = \\frac{\\min(m, n)}{\\max(m, n)}, \\qquad
    \\mathrm{SNR} = \\frac{1}{\\sigma_1}\\,
        \\frac{\\sum_{\\sigma_i > \\tau} \\sigma_i}{\\sum_{\\sigma_i \\le \\tau} \\sigma_i},

:math:`s` the noise scale read off the interquartile range (linear-interpolation quantiles, as
``torch.quantile``; 1.349 is the IQR of a standard normal) and :math:`\\tau` the Marchenko–Pastur
edge of an :math:`m\\times n` noise matrix of that scale. As in Spectrum's code, the noise sum is
1 when no singular value is at or below :math:`\\tau`, and an SNR whose noise sum is 0 is
``inf``; an all-zero matrix has SNR 0 (Spectrum would divide by :math:`\\sigma_1 = 0`). Higher SNR
ranks first. The singular values come from a values-only float64 SVD, each accurate to about
:math:`\\varepsilon\\,\\sigma_1`; the κ methods above are not involved (κ needs two singular
values, the SNR all of them). Layouts as for κ; a stack gets one SNR per matrix, aggregated with
``"mean"`` or ``"max"``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Literal, Optional, Tuple

import numpy as np
import torch

from ._numbers import aggregate_values
from .refs import Layout, dtype_name, resolve_layout
from .table import KappaEntry

__all__ = ["condition_number", "condition_numbers", "kappa_of", "snr_of", "SnrResult"]


def __getattr__(name: str):
    if name == "KappaResult":  # the one record of a κ is the table's row
        import warnings

        warnings.warn("kappatune.kappa.KappaResult is deprecated and goes in the next release: kappa_of returns "
                      "a kappatune.KappaEntry", FutureWarning, stacklevel=2)
        return KappaEntry
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

Aggregate = Literal["mean", "max"]

_EPS64 = torch.finfo(torch.float64).eps
# Relative-error budget of the Gram path (first-order rounding estimate ½·sqrt(max(m, n))·ε·κ²);
# above it the QR path is taken.
_GRAM_REL_ERR_BUDGET = 1e-7
# Relative-error budget of the QR path (sqrt(max(m, n))·ε·κ); above it, or for κ beyond
# _SVD_KAPPA, the float64 SVD (last resort; it also decides rank deficiency).
_QR_REL_ERR_BUDGET = 1e-7
_SVD_KAPPA = 1e10
# Relative width of each certificate: λ_max ∈ [θ, θ(1+τ)] and λ_min ∈ [u(1−τ), u].
_CERT_TAU = 4e-7
# The Krylov iteration stops when its error estimate is below this fraction of the eigenvalue.
_KRYLOV_TOL = 4e-8
# Block size of the block Krylov iteration, its Rayleigh–Ritz checkpoints (basis dimensions
# 24, 48, 96, …) and the largest basis before it gives up: the whole space for sides up to 192,
# else max(96, a quarter of the side) (then the dense eigen-decomposition takes over).
_BLOCK = 8
_FIRST_CHECK = 24
_MAX_BASIS_FRACTION = 0.25
# Which method finds the extreme eigenvalues of a Gram matrix of side s (switch points measured
# on the CPU, 1 thread; see benchmarks/results/kappa_paths):
# * s <= _DENSE_SHORT: the dense eigen-decomposition (LAPACK dsyevd, all eigenvalues);
# * otherwise the certified extremes (Cholesky + block Lanczos + Sylvester-inertia certificates)
#   up to _CERTIFIED_MAX_SHORT_CPU on the CPU (any size on other devices), and the dense
#   eigen-decomposition beyond, where MKL's dsyevd (torch) is cheaper than three Cholesky factorisations.
# On the CPU the dense eigen-decomposition runs through numpy (OpenBLAS) up to
# _TORCH_EIGVALSH_MIN_CPU and through torch (MKL) from there on.
_DENSE_SHORT = 96
_CERTIFIED_MAX_SHORT_CPU = 0
_TORCH_EIGVALSH_MIN_CPU = 1024
# Gram workspace per chunk when analysing a stack of matrices (bytes).
_CHUNK_BYTES = 256 * 1024 * 1024
# Gram diagonals (squared row norms) outside [2^-_SCALE_EXP, 2^_SCALE_EXP] trigger an exact
# power-of-two rescaling of the matrix first (no overflow to inf, no subnormal Gram entries).
_SCALE_EXP = 600
_START_SEED = 0x6B61707061  # fixed start block: κ is a deterministic function of the matrix


def _compute_device(t: torch.Tensor) -> torch.device:
    # float64 linear algebra is unavailable on MPS; everything else computes where the data is.
    return torch.device("cpu") if t.device.type == "mps" else t.device


def _raise_non_finite(t: torch.Tensor, name: str) -> None:
    n_bad = int((~torch.isfinite(t.float())).sum())
    raise ValueError(
        f"{name}: weight holds {n_bad} NaN/Inf value(s); κ is undefined. "
        "Fix or exclude this tensor (e.g. exclude=[...]) before scanning."
    )


def _numpy_linalg(a: torch.Tensor) -> bool:
    """Whether the Gram product, dense eigvalsh and SVD of ``a`` run through numpy's LAPACK (CPU) or torch."""
    return a.device.type == "cpu"


def _extremes_from_svdvals(a: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """σ_max, σ_min of every matrix of ``a`` (B, m, n) by a values-only float64 SVD (the last resort)."""
    if _numpy_linalg(a):
        # LAPACK's dgesdd through numpy, values only: it reduces a wide/tall matrix by QR first,
        # about 2x faster than torch.linalg.svdvals for 576x1536 (same float64 accuracy).
        s = torch.from_numpy(np.linalg.svd(a.numpy(), compute_uv=False))
    else:
        s = torch.linalg.svdvals(a)
    return s[..., 0], s[..., -1]


def _gram(a: torch.Tensor) -> torch.Tensor:
    """The short-side Gram matrices ``W Wᵀ`` (m ≤ n) or ``Wᵀ W`` of a float64 batch (B, m, n)."""
    m, n = a.shape[-2], a.shape[-1]
    if not _numpy_linalg(a):
        return a @ a.mT if m <= n else a.mT @ a
    # On the CPU numpy's ``x @ x.T`` is a symmetric rank-k update (BLAS dsyrk: half the flops of
    # the general product torch runs); same float64 arithmetic.
    an = a.numpy()
    short = min(m, n)
    out = np.empty((an.shape[0], short, short), dtype=np.float64)
    with np.errstate(over="ignore", invalid="ignore"):  # non-finite Grams are handled by the caller
        for i, x in enumerate(an):
            out[i] = x @ x.T if m <= n else x.T @ x
    return torch.from_numpy(out)


class _NonFiniteWeights(ValueError):
    pass


def _kappa_from_extremes(smax: torch.Tensor, smin: torch.Tensor, m: int, n: int) -> torch.Tensor:
    tol = smax * (max(m, n) * _EPS64)
    kappa = smax / smin
    deficient = (smin <= tol) | (smax == 0)
    return torch.where(deficient, torch.full_like(kappa, math.inf), kappa)


def _start_block(n: int, p: int, like: torch.Tensor) -> torch.Tensor:
    # The same start block for every matrix and on every device (generated on the CPU), so that
    # κ of a matrix does not depend on its batch, its chunk or where it is computed. Rows are vectors.
    gen = torch.Generator().manual_seed(_START_SEED)
    x = torch.randn(n, p, generator=gen, dtype=torch.float64)
    return torch.linalg.qr(x).Q.mT.contiguous().to(like.device)


def _orthonormal_next(w: torch.Tensor, basis: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Orthonormal rows spanning the rows of ``w`` (B, p, n) minus their projection on the rows of
    ``basis`` (B, k, n), refilled with fresh directions where the Krylov space is exhausted."""
    for _ in range(2):  # classical Gram–Schmidt twice ("twice is enough"): full reorthogonalisation
        w = w - (w @ basis.mT) @ basis
    q, r = torch.linalg.qr(w.mT)
    weak = r.diagonal(dim1=-2, dim2=-1).abs() <= 1e-10 * scale[:, None]
    if bool(weak.any()):  # an invariant subspace was found: continue with fresh random directions
        gen = torch.Generator().manual_seed(_START_SEED + basis.shape[-2])
        fresh = torch.randn(w.shape[-1], w.shape[-2], generator=gen, dtype=w.dtype).to(w.device)
        v = torch.where(weak[:, None, :], fresh.expand_as(q), q).mT
        for _ in range(2):
            v = v - (v @ basis.mT) @ basis
        q = torch.linalg.qr(v.mT).Q
    return q.mT


def _krylov_max(apply: Callable[[torch.Tensor], torch.Tensor], b: int, n: int, like: torch.Tensor,
                tol: Optional[float] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Largest eigenvalue of the symmetric positive semi-definite operator ``apply`` of each of ``b``
    problems of size ``n``: block Lanczos (block ``_BLOCK``, full reorthogonalisation) with
    Rayleigh–Ritz on the whole basis at dimensions 48, 96, 192, … ``apply`` maps a block of row
    vectors ``X`` (B, p, n) to ``X A`` (= ``(A Xᵀ)ᵀ``, A symmetric).

    Returns ``(theta, converged)``. ``theta`` is the largest Ritz value, a Rayleigh quotient, so
    ``theta ≤ λ_max`` up to rounding. ``converged`` when the Kato–Temple-type estimate
    ``ρ²/gap`` (``ρ`` the residual norm of the Ritz pair, ``gap`` to the next Ritz value; ``ρ`` if the
    gap is smaller) is below ``tol·theta``, or the basis spans the whole space. The estimate only
    decides when to stop: the bound used is certified by the caller (Cholesky of ``aI − A``).
    """
    tol = _KRYLOV_TOL if tol is None else tol
    p = min(_BLOCK, n)
    limit = n if n <= 8 * _FIRST_CHECK else max(4 * _FIRST_CHECK, int(_MAX_BASIS_FRACTION * n))
    limit = max(p, (limit // p) * p) if limit < n else n
    qs = torch.empty(b, limit, n, dtype=torch.float64, device=like.device)
    aqs = torch.empty_like(qs)
    qs[:, :p] = _start_block(n, p, like)
    aqs[:, :p] = apply(qs[:, :p])
    scale = aqs[:, :p].norm(dim=(-2, -1)).clamp_min(1e-300)
    k, check = p, min(_FIRST_CHECK, limit)
    while True:
        while k < check:
            step = min(p, check - k)
            nxt = _orthonormal_next(aqs[:, k - p:k - p + step], qs[:, :k], scale)
            qs[:, k:k + step] = nxt
            aqs[:, k:k + step] = apply(nxt)
            k += step
        q, aq = qs[:, :k], aqs[:, :k]
        t = q @ aq.mT
        evals, evecs = torch.linalg.eigh(0.5 * (t + t.mT))
        theta = evals[..., -1]
        if k >= n:
            return theta, torch.ones_like(theta, dtype=torch.bool)
        y = evecs[..., -1:].mT  # (B, 1, k)
        rho = (y @ aq - theta[:, None, None] * (y @ q)).norm(dim=(-2, -1))
        gap = theta - evals[..., -2]
        err = torch.where(gap > rho, rho * rho / gap.clamp_min(1e-300), rho)
        converged = err <= tol * theta.abs()
        if bool(converged.all()) or k >= limit:
            return theta, converged
        check = min(2 * check, limit)


def _chol_inverse_apply(chol: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """``X ↦ X (L Lᵀ)⁻¹`` for row blocks X, by two triangular solves with the Cholesky factor L."""
    def apply(x: torch.Tensor) -> torch.Tensor:
        z = torch.linalg.solve_triangular(chol.mT, x, upper=True, left=False)   # z Lᵀ = x
        return torch.linalg.solve_triangular(chol, z, upper=False, left=False)  # y L = z
    return apply


def _cholesky_ok(mat: torch.Tensor) -> torch.Tensor:
    """Whether each matrix of the batch is numerically positive definite (Cholesky succeeds)."""
    return torch.linalg.cholesky_ex(mat).info == 0


def _shifted(g: torch.Tensor, diag_add: torch.Tensor, sign: float) -> torch.Tensor:
    """``sign·G + diag_add·I`` for a batch (``diag_add`` of shape (B,))."""
    out = g * sign if sign != 1.0 else g.clone()
    out.diagonal(dim1=-2, dim2=-1).add_(diag_add[:, None])
    return out


def _dense_gram_extremes(g: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """λ_min, λ_max from the full eigen-decomposition of the Gram matrices (small sides, fallback)."""
    if _numpy_linalg(g) and g.shape[-1] < _TORCH_EIGVALSH_MIN_CPU:
        ev = torch.from_numpy(np.linalg.eigvalsh(g.numpy()))
    else:
        ev = torch.linalg.eigvalsh(g)
    return ev[..., 0], ev[..., -1]


def _gram_est_err(kappa_hat: torch.Tensor, m: int, n: int) -> torch.Tensor:
    # First-order error of κ from the Gram path: ½·c·ε·κ², c = sqrt(max(m, n)).
    return 0.5 * math.sqrt(max(m, n)) * _EPS64 * kappa_hat.square()


def _qr_extremes(a: torch.Tensor, lmax: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """σ_min of each matrix from the triangular factor R of its QR (κ not squared); ``ok`` marks
    those whose certificate holds and whose κ is within the QR path's budget."""
    m, n = a.shape[-2], a.shape[-1]
    r = torch.linalg.qr(a.mT if m <= n else a, mode="r").R  # W Wᵀ = Rᵀ R (m ≤ n) or Wᵀ W = Rᵀ R
    b, s = r.shape[0], r.shape[-1]
    diag = r.diagonal(dim1=-2, dim2=-1).abs()
    usable = (diag.amin(-1) > 0) & torch.isfinite(diag).all(-1)
    if not bool(usable.all()):  # an exactly singular R: a harmless stand-in, the SVD decides
        r = torch.where(usable[:, None, None], r, torch.eye(s, dtype=r.dtype, device=r.device))
    h = torch.cholesky_inverse(r, upper=True)  # H = (Rᵀ R)⁻¹ = R⁻¹ R⁻ᵀ, never forming Rᵀ R
    del r
    # H is positive semi-definite, |H_ij| <= sqrt(H_ii H_jj): a finite diagonal means a finite H.
    usable &= torch.isfinite(h.diagonal(dim1=-2, dim2=-1)).all(-1)
    if not bool(usable.all()):
        h = torch.where(usable[:, None, None], h, torch.eye(s, dtype=h.dtype, device=h.device))
    mu, _ = _krylov_max(lambda x: x @ h, b, s, h)
    ok = usable & _cholesky_ok(_shifted(h, mu * (1 + _CERT_TAU), -1.0))
    lmin = 1.0 / mu
    kappa_hat = (lmax / lmin).sqrt()
    ok &= (math.sqrt(max(m, n)) * _EPS64 * kappa_hat <= _QR_REL_ERR_BUDGET) & (kappa_hat <= _SVD_KAPPA)
    return lmin, ok


def _use_certified(g: torch.Tensor) -> bool:
    s = g.shape[-1]
    return s > _DENSE_SHORT and (not _numpy_linalg(g) or s <= _CERTIFIED_MAX_SHORT_CPU)


def _certified_gram_extremes(g: torch.Tensor, m: int, n: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """λ_min, λ_max of each Gram matrix by the certified extremes: ``(lmin, lmax, ok, dense)``.

    ``ok``: both bounds are certified (λ_max ∈ [θ, θ(1+τ)] by the Cholesky factorisation of
    θ(1+τ)I − G, λ_min ∈ [u(1−τ), u] by that of G − u(1−τ)I) and the Gram matrix is accurate
    enough for κ. ``dense``: an iteration did not converge or a certificate failed; those go to
    the dense eigen-decomposition. The rest (G not numerically positive definite, κ² too large
    for the Gram matrix) keep a certified λ_max and go to the QR path.
    """
    b, s = g.shape[0], g.shape[-1]
    # λ_max: block Lanczos on G (θ ≤ λ_max), certified by Cholesky of θ(1+τ)I − G.
    lmax, conv_max = _krylov_max(lambda x: x @ g, b, s, g)
    cert_max = conv_max & _cholesky_ok(_shifted(g, lmax * (1 + _CERT_TAU), -1.0))
    # λ_min: block Lanczos on G⁻¹ through the Cholesky factor of G (u = 1/θ ≥ λ_min).
    chol, info = torch.linalg.cholesky_ex(g)
    pd = info == 0
    lmin = torch.full((b,), math.nan, dtype=g.dtype, device=g.device)
    conv_min = torch.zeros(b, dtype=torch.bool, device=g.device)
    if bool(pd.any()):
        idx = pd.nonzero().squeeze(1)
        mu, conv = _krylov_max(_chol_inverse_apply(chol if len(idx) == b else chol[idx]), len(idx), s, g)
        lmin = lmin.index_copy(0, idx, 1.0 / mu)
        conv_min = conv_min.index_copy(0, idx, conv)
    del chol
    gram_fits = pd & (_gram_est_err((lmax / lmin).sqrt(), m, n) <= _GRAM_REL_ERR_BUDGET)
    ok = gram_fits & conv_min & cert_max
    if bool(ok.any()):
        idx = ok.nonzero().squeeze(1)
        g_ok = g if len(idx) == b else g[idx]
        ok = ok.index_put((idx,), _cholesky_ok(_shifted(g_ok, -lmin[idx] * (1 - _CERT_TAU), 1.0)))
    dense = ~cert_max | (gram_fits & ~ok)
    return lmin, lmax, ok, dense


def _extremes(a: torch.Tensor, g: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """σ_max, σ_min of a finite, well-scaled float64 batch ``a`` (B, m, n) with Gram matrices ``g``."""
    m, n = a.shape[-2], a.shape[-1]
    b = g.shape[0]
    if _use_certified(g):
        lmin, lmax, gram_ok, dense = _certified_gram_extremes(g, m, n)
        if bool(dense.any()):  # the previous method: all eigenvalues of those Gram matrices
            idx = dense.nonzero().squeeze(1)
            lo, hi = _dense_gram_extremes(g[idx])
            lmax = lmax.index_copy(0, idx, hi)
            lmin = lmin.index_copy(0, idx, lo)
            kh = (hi.clamp_min(0) / lo.clamp_min(0)).sqrt()
            gram_ok = gram_ok.index_put((idx,), _gram_est_err(kh, m, n) <= _GRAM_REL_ERR_BUDGET)
    else:
        lmin, lmax = _dense_gram_extremes(g)
        kh = (lmax.clamp_min(0) / lmin.clamp_min(0)).sqrt()
        gram_ok = _gram_est_err(kh, m, n) <= _GRAM_REL_ERR_BUDGET  # False for NaN (λ_min <= 0)
    redo = ~gram_ok
    if bool(redo.any()) and min(m, n) > _DENSE_SHORT:
        # κ² too large for the Gram matrix (or a failed λ_min certificate): the QR path, κ not squared.
        idx = redo.nonzero().squeeze(1)
        lo, qr_ok = _qr_extremes(a if len(idx) == b else a[idx], lmax[idx])
        lmin = lmin.index_copy(0, idx, torch.where(qr_ok, lo, lmin[idx]))
        redo = redo.index_put((idx,), ~qr_ok)
    smax = lmax.clamp_min(0).sqrt()
    smin = lmin.clamp_min(0).sqrt()
    if bool(redo.any()):
        idx = redo.nonzero().squeeze(1)
        # a[idx] would copy the float64 matrices: only when some of the stack needs the SVD.
        smax_e, smin_e = _extremes_from_svdvals(a if len(idx) == a.shape[0] else a[idx])
        smax = smax.index_copy(0, idx, smax_e)
        smin = smin.index_copy(0, idx, smin_e)
    return smax, smin


def _matrices_kappa(a: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """κ, σ_max, σ_min of a float64 batch ``(B, m, n)``; returns float64 tensors of shape ``(B,)``."""
    m, n = a.shape[-2], a.shape[-1]
    g = _gram(a)
    # Every weight enters one diagonal entry (G_ii = Σ_j W_ij²): a NaN/Inf weight shows up here at no
    # cost; so do magnitudes whose squares overflow (|w| > 1e154) or underflow (|w| < 1e-154).
    d = g.diagonal(dim1=-2, dim2=-1)
    dmax = d.amax(-1)
    finite = bool(torch.isfinite(d).all())
    shift = None
    if not finite or bool(((dmax > 2.0 ** _SCALE_EXP) | (dmax < 2.0 ** -_SCALE_EXP)).any()):
        if not finite and not bool(torch.isfinite(a).all()):  # on the float64 copy: every dtype (float8 too)
            raise _NonFiniteWeights
        # Exact power-of-two rescaling so that max|w| ∈ [0.5, 1): κ is unchanged, σ scale back exactly.
        amax = a.abs().amax(dim=(-2, -1))
        shift = torch.where(amax > 0, -torch.frexp(amax).exponent, torch.zeros_like(amax, dtype=torch.int32))
        a = torch.ldexp(a, shift[:, None, None].to(a.dtype))
        g = _gram(a)
    smax, smin = _extremes(a, g)
    kappa = _kappa_from_extremes(smax, smin, m, n)
    if shift is not None:
        back = (-shift).to(smax.dtype)
        smax, smin = torch.ldexp(smax, back), torch.ldexp(smin, back)
    return kappa, smax, smin


def condition_numbers(stack: torch.Tensor, *, name: str = "tensor") -> torch.Tensor:
    """κ of every matrix in a stack ``(B, m, n)`` of same-shaped matrices (any dtype, any device).

    Returns a float64 CPU tensor of shape ``(B,)``, :math:`\\kappa_b = \\sigma_{\\max}(W_b) /
    \\sigma_{\\min}(W_b)` (``inf`` for a rank-deficient :math:`W_b`), with the guarantee of the module
    docstring. The stack is upcast to float64 chunk by chunk, so the workspace stays bounded even
    for large expert stacks.

    Args:
        stack (Tensor): the matrices :math:`W_1, \\dots, W_B`, shape ``(B, m, n)``, floating point.
        name (str, optional): names the tensor in errors. Default: ``"tensor"``.

    Raises:
        ValueError: not 3-D, an empty, complex or non-floating tensor, or NaN/Inf values.

    Example::

        >>> w = torch.randn(8, 64, 32)
        >>> kappatune.kappa.condition_numbers(w).shape
        torch.Size([8])
    """
    return _stack_extremes(stack, name)[0]


def _stack_extremes(stack: torch.Tensor, name: str) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if stack.ndim != 3:
        raise ValueError(f"{name}: expected a stack of matrices (B, m, n), got shape {tuple(stack.shape)}")
    if not (stack.is_floating_point() or stack.is_complex()):
        raise ValueError(f"{name}: κ needs a floating-point tensor, got dtype {stack.dtype}")
    if stack.is_complex():
        raise ValueError(f"{name}: complex weights are not supported")
    b, m, n = stack.shape
    if b == 0 or m == 0 or n == 0:
        raise ValueError(f"{name}: cannot compute κ of an empty tensor of shape {tuple(stack.shape)}")
    dev = _compute_device(stack)
    short = min(m, n)
    per_matrix_bytes = 8 * (m * n + 4 * short * short)  # the matrix, G, its factor, a shifted copy
    chunk = max(1, _CHUNK_BYTES // per_matrix_bytes)
    outs = []
    with torch.no_grad():
        for start in range(0, b, chunk):
            a = stack[start : start + chunk].detach().to(device=dev, dtype=torch.float64)
            try:
                outs.append([x.cpu() for x in _matrices_kappa(a)])
            except _NonFiniteWeights:
                _raise_non_finite(stack, name)
            del a
    return tuple(torch.cat([o[i] for o in outs]) for i in range(3))  # type: ignore[return-value]


def _as_stack(tensor: torch.Tensor, layout: Layout, name: str, aggregate: str) -> Tuple[torch.Tensor, str]:
    """``(stack of matrices, resolved layout)`` of one weight tensor; checks ``aggregate``."""
    if aggregate not in ("mean", "max"):
        raise ValueError(f"aggregate must be 'mean' or 'max', got {aggregate!r}")
    lay = resolve_layout(tuple(tensor.shape), layout, name=name)
    if lay == "stack":
        return tensor, lay
    if lay == "flatten":
        return tensor.reshape(tensor.shape[0], -1).unsqueeze(0), lay
    return tensor.unsqueeze(0), lay


def kappa_of(
    tensor: torch.Tensor,
    *,
    name: str = "tensor",
    layout: Layout = "auto",
    aggregate: Aggregate = "mean",
) -> KappaEntry:
    """κ of one weight tensor with σ_max and σ_min, its layout resolved (see the module docstring), as
    the record a κ table holds (one record type for a κ everywhere).

    Args:
        tensor (Tensor): a weight with at least 2 dimensions, any floating dtype, any device.
        name (str, optional): names the tensor in errors. Default: ``"tensor"``.
        layout (str, optional): ``"auto"``, ``"matrix"``, ``"flatten"`` or ``"stack"``
            (:func:`kappatune.refs.resolve_layout`). Default: ``"auto"``.
        aggregate (str, optional): ``"mean"`` or ``"max"`` over the matrices of a ``"stack"``.
            Default: ``"mean"``.

    Returns:
        KappaEntry: ``name``, ``shape``, ``numel``, ``dtype`` of the tensor, ``kappa`` (the aggregate
            for a stack), ``sigma_max``, ``sigma_min`` (over the stack), the layout used and, for a
            stack, ``per_matrix``.

    Raises:
        ValueError: fewer than 2 dimensions, an empty or non-floating tensor, NaN/Inf values, or a
            layout that does not fit the shape.
    """
    stack, lay = _as_stack(tensor, layout, name, aggregate)
    kappa, smax, smin = _stack_extremes(stack, name)
    about = dict(name=name, shape=tuple(int(d) for d in tensor.shape), numel=tensor.numel(),
                 dtype=dtype_name(tensor.dtype), layout=lay)
    if lay != "stack":
        return KappaEntry(kappa=float(kappa[0]), sigma_max=float(smax[0]), sigma_min=float(smin[0]), **about)
    per = tuple(float(k) for k in kappa)
    return KappaEntry(kappa=aggregate_values(per, aggregate), sigma_max=float(smax.max()), sigma_min=float(smin.min()),
                      per_matrix=per, **about)


def condition_number(
    tensor: torch.Tensor,
    *,
    name: str = "tensor",
    layout: Layout = "auto",
    aggregate: Aggregate = "mean",
) -> float:
    """κ = σ_max / σ_min of a weight tensor, exact to 1e-6 relative (see the module docstring).

    :math:`\\kappa(W) = \\sigma_{\\max}(W) / \\sigma_{\\min}(W)`, with :math:`\\sigma_{\\min}` the smallest of
    the :math:`\\min(m, n)` singular values of the :math:`m \\times n` matrix.

    Any floating dtype (fp16, bf16, fp32, fp64) on any device; computed in float64. ``inf`` for a
    rank-deficient matrix.

    Args:
        tensor (Tensor): a weight with at least 2 dimensions.
        name (str, optional): names the tensor in errors. Default: ``"tensor"``.
        layout (str, optional): how the tensor is read as matrices: ``"auto"`` (2-D as is, 3-D a
            stack, ≥ 4-D flattened to ``(out, -1)``), ``"matrix"``, ``"flatten"`` or ``"stack"``.
            Default: ``"auto"``.
        aggregate (str, optional): ``"mean"`` or ``"max"`` over the matrices of a stack. Default:
            ``"mean"``.

    Raises:
        ValueError: fewer than 2 dimensions, an empty or non-floating tensor, NaN/Inf values, or a
            layout that does not fit the shape.

    Example::

        >>> import torch, kappatune
        >>> kappatune.condition_number(torch.diag(torch.tensor([4.0, 2.0, 1.0])))
        4.0
    """
    return kappa_of(tensor, name=name, layout=layout, aggregate=aggregate).kappa


# -- Spectrum's SNR --------------------------------------------------------------------------------
IQR_TO_SIGMA = 1.349
"""The interquartile range of a standard normal: ``s = IQR / 1.349`` estimates a Gaussian σ."""


@dataclass(frozen=True)
class SnrResult:
    """Spectrum's SNR of one tensor (see the module docstring).

    ``signal`` (:math:`\\sum_{\\sigma_i > \\tau} \\sigma_i`), ``noise``
    (:math:`\\sum_{\\sigma_i \\le \\tau} \\sigma_i`, 1 when empty) and ``threshold`` (τ) are those of
    a single matrix; for a ``"stack"`` layout they are NaN, ``per_matrix`` holds the SNR of each
    matrix, ``snr`` their aggregate and ``sigma_max`` the largest over the stack.

    Attributes:
        snr (float): :math:`\\mathrm{SNR} = \\text{signal}/\\text{noise}/\\sigma_{\\max}` (``inf`` for
            a noise sum of 0, 0 for :math:`\\sigma_{\\max} = 0`); for a ``"stack"``, the aggregate of
            ``per_matrix``.
        sigma_max (float): the largest singular value :math:`\\sigma_{\\max}` (over the stack).
        signal (float): :math:`\\sum_{\\sigma_i > \\tau} \\sigma_i` (NaN for a stack).
        noise (float): :math:`\\sum_{\\sigma_i \\le \\tau} \\sigma_i`, 1 when empty (NaN for a stack).
        threshold (float): τ, :func:`mp_threshold` (NaN for a stack).
        layout (str): the layout used: ``"matrix"``, ``"flatten"`` or ``"stack"``.
        per_matrix (Tuple[float, ...], optional): the SNR of each matrix of a ``"stack"``. Default:
            ``None`` (a single matrix).
    """

    snr: float
    sigma_max: float
    signal: float
    noise: float
    threshold: float
    layout: str
    per_matrix: Optional[Tuple[float, ...]] = None


def mp_threshold(sigma: float, shape: Tuple[int, ...]) -> float:
    """The Marchenko–Pastur edge :math:`\\tau = s\\,(1 + \\sqrt{\\beta})` of a noise matrix.

    Args:
        sigma (float): the noise scale :math:`s`.
        shape (tuple of int): the matrix shape; only the last two sides :math:`(m, n)` are read,
            :math:`\\beta = \\min(m, n) / \\max(m, n)`.

    Returns:
        float: :math:`\\tau`.
    """
    m, n = int(shape[-2]), int(shape[-1])
    return float(sigma) * (1.0 + math.sqrt(min(m, n) / max(m, n)))


def _snr_parts(v: np.ndarray, shape: Tuple[int, ...]) -> Tuple[float, float, float, float, float, bool]:
    """``(snr, sigma_max, signal, noise, threshold, fallback)`` of float64 singular values ``v``,
    largest first; ``fallback``: no value is at or below the threshold, so the noise sum is 1."""
    smax = float(v[0])
    if not smax > 0:  # an all-zero matrix: no signal
        return 0.0, 0.0, 0.0, 1.0, 0.0, True
    q75, q25 = np.quantile(v, [0.75, 0.25])  # linear interpolation, as torch.quantile
    tau = mp_threshold((q75 - q25) / IQR_TO_SIGMA, shape)
    above = v > tau
    signal = float(v[above].sum())
    fallback = bool(above.all())
    noise = 1.0 if fallback else float(v[~above].sum())
    snr = math.inf if noise == 0.0 else signal / noise / smax
    return snr, smax, signal, noise, tau, fallback


def snr_from_singular_values(s, shape: Tuple[int, ...]) -> float:
    """Spectrum's SNR from all the singular values of a matrix (module docstring).

    Args:
        s (iterable of float): the ``min(m, n)`` singular values, in any order.
        shape (tuple of int): the matrix shape ``(m, n)`` (only the last two sides are read).

    Returns:
        float: the SNR,
            :math:`\\frac{1}{\\sigma_1}\\sum_{\\sigma_i > \\tau}\\sigma_i / \\sum_{\\sigma_i \\le \\tau}\\sigma_i`;
            ``0.0`` for an all-zero matrix, ``inf`` when the noise sum is 0.

    Raises:
        ValueError: no singular values, or a negative or non-finite one.
    """
    v = np.sort(np.asarray(list(s), dtype=np.float64))[::-1]
    if v.size == 0:
        raise ValueError("snr_from_singular_values: no singular values given")
    if not (np.isfinite(v).all() and v[-1] >= 0):
        raise ValueError("snr_from_singular_values: singular values must be finite and >= 0")
    return _snr_parts(v, tuple(shape))[0]


def _singular_values(a: torch.Tensor) -> np.ndarray:
    """All singular values, largest first, of each matrix of a finite float64 batch ``a`` (B, m, n)."""
    if _numpy_linalg(a):
        return np.linalg.svd(a.numpy(), compute_uv=False)
    return torch.linalg.svdvals(a).cpu().numpy()


def _stack_snr(stack: torch.Tensor, name: str) -> list:
    """``[(snr, sigma_max, signal, noise, threshold)]`` of every matrix of ``stack`` (B, m, n)."""
    if not stack.is_floating_point():
        raise ValueError(f"{name}: the SNR needs a floating-point tensor, got dtype {stack.dtype}")
    b, m, n = stack.shape
    if b == 0 or m == 0 or n == 0:
        raise ValueError(f"{name}: cannot compute the SNR of an empty tensor of shape {tuple(stack.shape)}")
    dev = _compute_device(stack)
    chunk = max(1, _CHUNK_BYTES // (8 * (2 * m * n + 4 * min(m, n) ** 2)))
    out = []
    with torch.no_grad():
        for start in range(0, b, chunk):
            a = stack[start:start + chunk].detach().to(device=dev, dtype=torch.float64)
            if not bool(torch.isfinite(a).all()):
                _raise_non_finite(stack, name)
            # An exact power-of-two rescaling (max|w| in [0.5, 1)) keeps the SVD and the sums far from
            # overflow and subnormals; σ and the sums scale back exactly (SNR(2^e W) = SNR(W) / 2^e,
            # except where the noise sum is Spectrum's fallback of 1).
            amax = a.abs().amax(dim=(-2, -1))
            shift = torch.where(amax > 0, -torch.frexp(amax).exponent, torch.zeros_like(amax, dtype=torch.int32))
            a = torch.ldexp(a, shift[:, None, None].to(a.dtype))
            for v, e in zip(_singular_values(a), shift.tolist()):
                snr, smax, signal, noise, tau, fallback = _snr_parts(v, (m, n))
                if e:  # back to the tensor's scale; a noise sum of 1 (fallback) is not a sum of σ
                    smax, signal, tau = math.ldexp(smax, -e), math.ldexp(signal, -e), math.ldexp(tau, -e)
                    if not fallback:
                        noise = math.ldexp(noise, -e)
                        snr = math.ldexp(snr, e)
                out.append((snr, smax, signal, noise, tau))
            del a
    return out


def snr_of(
    tensor: torch.Tensor,
    *,
    name: str = "tensor",
    layout: Layout = "auto",
    aggregate: Aggregate = "mean",
) -> SnrResult:
    """Spectrum's SNR of one weight tensor with its layout resolved (see the module docstring).

    Args:
        tensor (torch.Tensor): the weight, any floating dtype, any device (computed in float64).
        name (str, optional): names the tensor in errors. Default: ``"tensor"``.
        layout (str, optional): ``"auto"``, ``"matrix"``, ``"flatten"`` or ``"stack"``, as for κ.
            Default: ``"auto"``.
        aggregate (str, optional): ``"mean"`` or ``"max"`` over the matrices of a stack.
            Default: ``"mean"``.

    Returns:
        SnrResult: the SNR and the parts it is made of.

    Raises:
        ValueError: a NaN/Inf weight (naming ``name``), an empty or non-floating tensor, or a bad
            argument.

    Example::

        >>> w = torch.diag(torch.tensor([10.0, 1.0, 1.0, 1.0, 1.0]))
        >>> kappatune.kappa.snr_of(w).snr   # IQR 0: every σ is signal, noise sum 1 → 14 / 1 / 10
        1.4
    """
    stack, lay = _as_stack(tensor, layout, name, aggregate)
    parts = _stack_snr(stack, name)
    if lay != "stack":
        return SnrResult(*parts[0], layout=lay)
    per = tuple(p[0] for p in parts)
    agg = aggregate_values(per, aggregate)
    nan = math.nan
    return SnrResult(agg, max(p[1] for p in parts), nan, nan, nan, lay, per)
