"""Every κ method of kappatune.kappa held to the 1e-6 guarantee on matrices with known singular values.

The methods (module docstring of kappatune/kappa.py): dense eigvalsh of the Gram matrix,
certified extremes (Cholesky + block Lanczos + Sylvester-inertia certificates), the QR path for
ill-conditioned matrices, and the SVD last resort. Each test checks which method ran.
"""

import math

import numpy as np
import pytest
import torch

import kappatune
import kappatune.kappa
import kappatune.kappa as K

from .test_kappa import with_singular_values




def reference_kappa(t):
    s = np.linalg.svd(t.detach().to(torch.float64).numpy(), compute_uv=False)
    return float(s[0] / s[-1])


def rel(a, b):
    return abs(a - b) / b


class Spy:
    """Records which κ methods ran (and what they returned)."""

    def __init__(self, monkeypatch):
        self.calls = {"certified": [], "dense": [], "qr": [], "svd": []}
        for key, attr in [("certified", "_certified_gram_extremes"), ("dense", "_dense_gram_extremes"),
                          ("qr", "_qr_extremes"), ("svd", "_extremes_from_svdvals")]:
            real = getattr(K, attr)

            def wrapped(*args, _real=real, _key=key):
                out = _real(*args)
                self.calls[_key].append(out)
                return out

            monkeypatch.setattr(K, attr, wrapped)

    def ran(self, key):
        return len(self.calls[key]) > 0

    def certified_ok(self):
        return [bool(x) for out in self.calls["certified"] for x in out[2]]

    def qr_ok(self):
        return [bool(x) for out in self.calls["qr"] for x in out[1]]


@pytest.fixture
def certified(monkeypatch):
    """The certified extremes on the CPU for every side above 16 (off on the CPU by default)."""
    monkeypatch.setattr(K, "_CERTIFIED_MAX_SHORT_CPU", 10 ** 9)
    monkeypatch.setattr(K, "_DENSE_SHORT", 16)
    return Spy(monkeypatch)


def gram_switch_kappa(m, n):
    """κ where ½·sqrt(max(m, n))·ε·κ² reaches the Gram path's budget."""
    return math.sqrt(2 * K._GRAM_REL_ERR_BUDGET / (math.sqrt(max(m, n)) * K._EPS64))


# ------------------------------------------------------------------------------ certified extremes
@pytest.mark.parametrize("kappa", [1.0 + 1e-9, 1.5, 10.0, 300.0, 3000.0])
@pytest.mark.parametrize("shape", [(120, 300), (200, 200), (310, 130)])
def test_certified_extremes_known_singular_values(certified, kappa, shape):
    m, n = shape
    s = np.geomspace(kappa, 1.0, min(m, n)) * 0.37
    w = with_singular_values(m, n, s, seed=m + n)
    got = kappatune.condition_number(w)
    assert rel(got, kappa) < 1e-6 and rel(got, reference_kappa(w)) < 1e-6, (got, kappa)
    assert not certified.ran("svd")
    if kappa >= 10 or kappa < 1.01:  # a spectrum with relative gaps of 4 % (or all within 1e-9)
        assert certified.certified_ok() == [True], "the certificates should hold on a geometric spectrum"
        assert not certified.ran("dense")
    else:  # gaps of 0.7 %: Lanczos may give up within its basis, then the dense method answers
        assert certified.certified_ok() == [True] or certified.ran("dense")


@pytest.mark.parametrize("where", ["top", "bottom", "both"])
@pytest.mark.parametrize("gap", [0.0, 1e-9, 1e-4])
def test_certified_clustered_and_repeated_extremes(certified, where, gap):
    # 6 singular values equal (gap 0: a repeated extreme) or within `gap` of each other at an end.
    k = 150
    s = np.linspace(9.0, 2.0, k)
    if where in ("top", "both"):
        s[:6] = 10.0 * (1 - gap * np.arange(6))
    if where in ("bottom", "both"):
        s[-6:] = 1.0 * (1 + gap * np.arange(6))[::-1]
    s = np.sort(s)[::-1]
    w = with_singular_values(k, 400, s, seed=7)
    got = kappatune.condition_number(w)
    assert rel(got, s[0] / s[-1]) < 1e-6 and rel(got, reference_kappa(w)) < 1e-6
    assert certified.ran("certified")


def test_certified_marchenko_pastur_random_init(certified):
    # A random Gaussian matrix: clustered spectrum at both ends (the hard case for Lanczos).
    w = torch.randn(200, 500, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert rel(kappatune.condition_number(w), reference_kappa(w)) < 1e-6


def test_a_wrong_ritz_value_fails_the_certificate(monkeypatch):
    # The certificate is real: a λ_max estimate 1% too low must not be certified.
    w = with_singular_values(150, 300, np.geomspace(20.0, 1.0, 150), seed=1)
    g = K._gram(w[None])
    real = K._krylov_max
    lmin, lmax, ok, dense = K._certified_gram_extremes(g, 150, 300)
    assert bool(ok[0]) and not bool(dense[0])
    monkeypatch.setattr(K, "_krylov_max", lambda *a, **k: (lambda t: (t[0] * 0.99, t[1]))(real(*a, **k)))
    lmin, lmax, ok, dense = K._certified_gram_extremes(g, 150, 300)
    assert not bool(ok[0]) and bool(dense[0])  # both ends off by 1%: neither certificate holds


def test_failed_certificate_falls_back_to_the_dense_method(certified, monkeypatch):
    monkeypatch.setattr(K, "_CERT_TAU", -1e-3)  # shifts on the wrong side: every certificate fails
    w = with_singular_values(150, 300, np.geomspace(50.0, 1.0, 150), seed=2)
    got = kappatune.condition_number(w)
    assert certified.certified_ok() == [False] and certified.ran("dense")
    assert rel(got, 50.0) < 1e-6


def test_iteration_that_gives_up_falls_back_to_the_dense_method(certified, monkeypatch):
    monkeypatch.setattr(K, "_KRYLOV_TOL", 1e-30)       # never converged ...
    monkeypatch.setattr(K, "_MAX_BASIS_FRACTION", 0.1)  # ... within a small basis
    w = with_singular_values(400, 500, np.geomspace(50.0, 1.0, 400), seed=3)
    got = kappatune.condition_number(w)
    assert certified.ran("dense") and rel(got, 50.0) < 1e-6


def test_certified_just_below_and_above_the_gram_switch(certified):
    m, n = 150, 400
    ks = gram_switch_kappa(m, n)
    for kappa, qr_expected in [(0.9 * ks, False), (1.1 * ks, True)]:
        certified.calls["qr"].clear()
        w = with_singular_values(m, n, np.geomspace(kappa, 1.0, m), seed=4)
        got = kappatune.condition_number(w)
        assert rel(got, kappa) < 1e-6 and rel(got, reference_kappa(w)) < 1e-6
        assert certified.ran("qr") == qr_expected, kappa


def test_certified_stack_mixed_paths_and_deterministic(certified):
    mats = [with_singular_values(120, 200, np.geomspace(k, 1.0, 120), seed=i)
            for i, k in enumerate([3.0, 1e5, 40.0])]
    low_rank = torch.randn(120, 30, dtype=torch.float64) @ torch.randn(30, 200, dtype=torch.float64)
    stack = torch.stack(mats + [low_rank])
    got = kappatune.kappa.condition_numbers(stack).tolist()
    for k, want in zip(got[:3], [3.0, 1e5, 40.0]):
        assert rel(k, want) < 1e-6
    assert got[3] == math.inf
    # the same value alone as in the stack (fixed start block), up to batched BLAS rounding
    assert rel(kappatune.kappa.condition_numbers(stack[2:3]).item(), got[2]) < 1e-13
    assert kappatune.kappa.condition_numbers(stack).tolist() == got  # and run to run, bit for bit


# ------------------------------------------------------------------------------ dense (CPU default)
def test_default_cpu_path_is_dense_and_exact(monkeypatch):
    spy = Spy(monkeypatch)
    w = with_singular_values(200, 300, np.geomspace(700.0, 1.0, 200), seed=5)
    assert rel(kappatune.condition_number(w), 700.0) < 1e-6
    assert spy.ran("dense") and not spy.ran("certified") and not spy.ran("qr") and not spy.ran("svd")


def test_dense_just_below_and_above_the_gram_switch(monkeypatch):
    m, n = 200, 450
    ks = gram_switch_kappa(m, n)
    for kappa, qr_expected in [(0.9 * ks, False), (1.1 * ks, True)]:
        spy = Spy(monkeypatch)
        w = with_singular_values(m, n, np.geomspace(kappa, 1.0, m), seed=12)
        got = kappatune.condition_number(w)
        assert rel(got, kappa) < 1e-6 and rel(got, reference_kappa(w)) < 1e-6
        assert spy.ran("dense") and spy.ran("qr") == qr_expected and not spy.ran("svd"), kappa


def test_dense_through_torch_above_its_switch(monkeypatch):
    monkeypatch.setattr(K, "_TORCH_EIGVALSH_MIN_CPU", 100)
    called = []
    real = torch.linalg.eigvalsh
    monkeypatch.setattr(torch.linalg, "eigvalsh", lambda x: called.append(x.shape) or real(x))
    w = with_singular_values(150, 300, np.geomspace(90.0, 1.0, 150), seed=6)
    assert rel(kappatune.condition_number(w), 90.0) < 1e-6 and called


# ------------------------------------------------------------------------------ QR path
@pytest.mark.parametrize("kappa", [2e4, 1e5, 1e6])
@pytest.mark.parametrize("shape", [(150, 400), (300, 120), (200, 200)])
def test_qr_path_known_singular_values(monkeypatch, kappa, shape):
    spy = Spy(monkeypatch)
    m, n = shape
    w = with_singular_values(m, n, np.geomspace(kappa, 1.0, min(m, n)) * 3.0, seed=m)
    got = kappatune.condition_number(w)
    assert rel(got, kappa) < 1e-6 and rel(got, reference_kappa(w)) < 1e-6, (got, kappa)
    assert spy.qr_ok() == [True] and not spy.ran("svd")


def test_qr_path_clustered_small_singular_values(monkeypatch):
    spy = Spy(monkeypatch)
    s = np.r_[1e5, np.geomspace(5e4, 10.0, 190), np.full(9, 1.0) * (1 + 1e-6 * np.arange(9))[::-1]]
    w = with_singular_values(200, 350, s, seed=8)
    got = kappatune.condition_number(w)
    assert rel(got, 1e5) < 1e-6 and spy.ran("qr")


def test_qr_just_below_and_above_its_switch_to_the_svd(monkeypatch):
    m, n = 150, 300
    k_switch = K._QR_REL_ERR_BUDGET / (math.sqrt(max(m, n)) * K._EPS64)
    for kappa, svd_expected in [(0.8 * k_switch, False), (1.25 * k_switch, True)]:
        spy = Spy(monkeypatch)
        w = with_singular_values(m, n, np.geomspace(kappa, 1.0, m), seed=9)
        got = kappatune.condition_number(w)
        assert rel(got, reference_kappa(w)) < 1e-6, kappa
        assert spy.ran("qr") and spy.ran("svd") == svd_expected, kappa


def test_rank_deficient_large_side_is_inf(monkeypatch):
    spy = Spy(monkeypatch)
    w = torch.randn(200, 40, dtype=torch.float64) @ torch.randn(40, 300, dtype=torch.float64)
    assert kappatune.condition_number(w) == math.inf
    assert spy.ran("svd")  # rank deficiency is decided by the SVD, as numpy's matrix_rank does
    assert kappatune.condition_number(torch.zeros(150, 200)) == math.inf


# ------------------------------------------------------------------------------ extreme magnitudes
@pytest.mark.parametrize("path", ["dense", "certified", "torch"])
@pytest.mark.parametrize("scale,kappa", [(1e-161, 30.0), (1e-300, 1e3), (1.5e308 / 1.0, 1.0), (1e200, 40.0),
                                         (1e250, 2e4)])
def test_tiny_and_huge_magnitudes(monkeypatch, path, scale, kappa):
    if path == "certified":
        monkeypatch.setattr(K, "_CERTIFIED_MAX_SHORT_CPU", 10 ** 9)
    if path == "torch":
        monkeypatch.setattr(K, "_numpy_linalg", lambda a: False)
    m, n = 120, 180
    s = np.geomspace(kappa, 1.0, m) / kappa  # σ_max = 1, times scale below
    w = with_singular_values(m, n, s, seed=10) * scale
    assert torch.isfinite(w).all()
    res = kappatune.kappa.kappa_of(w)
    assert rel(res.kappa, kappa) < 1e-6, (res.kappa, kappa)
    assert math.isfinite(res.sigma_max) and rel(res.sigma_max, scale) < 1e-6
    assert rel(res.sigma_min, scale / kappa) < 1e-6


def test_orthogonal_times_max_float_is_not_inf():
    q, _ = np.linalg.qr(np.random.default_rng(0).standard_normal((200, 200)))
    w = torch.from_numpy(q * 1.5e308)
    assert rel(kappatune.condition_number(w), 1.0) < 1e-6


def test_subnormal_gram_entries_do_not_lose_digits():
    # |w| ≈ 1e-161: every square is subnormal (< 2.2e-308) without the rescaling.
    w = with_singular_values(60, 90, np.geomspace(7.0, 1.0, 60), seed=11) * 1e-161
    assert rel(kappatune.condition_number(w), 7.0) < 1e-6


# ------------------------------------------------------------------------------ torch.linalg (CUDA) path on the CPU
@pytest.mark.parametrize("kappa", [1.0001, 50.0, 3e3, 1e5, 1e6, 1e9])
@pytest.mark.parametrize("shape", [(3, 130, 260), (2, 250, 110)])
def test_torch_linalg_path_every_method(monkeypatch, kappa, shape):
    # Off the CPU: certified extremes (batched), QR path and SVD through torch.linalg.
    monkeypatch.setattr(K, "_numpy_linalg", lambda a: False)
    spy = Spy(monkeypatch)
    b, m, n = shape
    stack = torch.stack([with_singular_values(m, n, np.geomspace(kappa, 1.0, min(m, n)), seed=i) for i in range(b)])
    got = kappatune.kappa.condition_numbers(stack)
    for k in got.tolist():
        assert rel(k, kappa) < 1e-6, (k, kappa)
    assert spy.ran("certified")
    if kappa < 0.9 * gram_switch_kappa(m, n):
        assert spy.certified_ok() == [True] * b
    elif kappa <= 1e6:
        assert spy.qr_ok() == [True] * b
    else:
        assert spy.ran("svd")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kappa", [1.0001, 50.0, 3e3, 1e5, 1e6, 1e9])
def test_cuda_every_method_matches_float64_svd(kappa):
    mats = [with_singular_values(300, 700, np.geomspace(kappa, 1.0, 300), seed=i) for i in range(3)]
    stack = torch.stack(mats).float().cuda()
    got = kappatune.kappa.condition_numbers(stack).tolist()
    for k, w in zip(got, mats):
        assert rel(k, reference_kappa(w.float())) < 1e-6


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_bf16_layer_matches_cpu():
    w = torch.randn(2048, 5632, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    assert rel(kappatune.condition_number(w.cuda()), kappatune.condition_number(w)) < 1e-6
