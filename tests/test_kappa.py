import math

import numpy as np
import pytest
import torch

import kappatune
import kappatune.kappa
from kappatune.kappa import kappa_of
from kappatune.refs import resolve_layout


def with_singular_values(m, n, s, seed=0):
    """An m×n float64 matrix whose singular values are exactly ``s`` (up to float64 rounding)."""
    rng = np.random.default_rng(seed)
    k = min(m, n)
    assert len(s) == k
    u, _ = np.linalg.qr(rng.standard_normal((m, k)))
    v, _ = np.linalg.qr(rng.standard_normal((n, k)))
    return torch.from_numpy((u * np.asarray(s, dtype=np.float64)) @ v.T)


def reference_kappa(t: torch.Tensor) -> float:
    s = np.linalg.svd(t.detach().to(torch.float64).reshape(t.shape[0], -1).numpy(), compute_uv=False)
    return float(s[0] / s[-1])


@pytest.mark.parametrize("kappa", [1.0 + 1e-9, 1.0001, 10.0, 1e3, 1e4, 1e5, 1e6])
@pytest.mark.parametrize("shape", [(96, 96), (40, 120), (150, 50)])
def test_known_singular_values_match_float64_svd(kappa, shape):
    m, n = shape
    k = min(m, n)
    s = np.geomspace(kappa, 1.0, k) * 0.37  # scale must not matter
    w = with_singular_values(m, n, s, seed=m + n)
    got = kappatune.condition_number(w)
    ref = reference_kappa(w)
    assert abs(got - ref) / ref < 1e-6, (got, ref)
    assert abs(got - kappa) / kappa < 1e-6


@pytest.mark.parametrize("seed", range(6))
def test_random_shapes_and_spectra(seed):
    rng = np.random.default_rng(seed)
    m, n = (int(x) for x in rng.integers(2, 160, size=2))
    k = min(m, n)
    log_kappa = rng.uniform(0, 6)
    s = np.sort(10 ** rng.uniform(0, log_kappa, size=k))[::-1]
    w = with_singular_values(m, n, s, seed=seed)
    got = kappatune.condition_number(w)
    ref = reference_kappa(w)
    assert abs(got - ref) / ref < 1e-6, (m, n, got, ref)


@pytest.mark.parametrize("kappa", [1.0001, 1e3, 1e6, 1e9])
@pytest.mark.parametrize("shape", [(3, 40, 120), (2, 150, 50)])
def test_torch_linalg_path_used_off_cpu_is_as_exact(monkeypatch, kappa, shape):
    # CUDA tensors take torch.linalg (eigvalsh of the Gram matrix, svdvals fallback) instead of
    # numpy's LAPACK: run that code path here on the CPU and hold it to the same guarantee.
    b, m, n = shape
    stack = torch.stack([with_singular_values(m, n, np.geomspace(kappa, 1.0, min(m, n)), seed=i) for i in range(b)])
    calls = []
    monkeypatch.setattr(kappatune.kappa, "_numpy_linalg", lambda a: calls.append(a.device.type) or False)
    got = kappatune.kappa.condition_numbers(stack)
    assert calls, "the torch.linalg path was not taken"
    for k in got.tolist():
        assert abs(k - kappa) / kappa < 1e-6, (k, kappa)


def test_fallback_svd_reads_the_matrix_in_place(monkeypatch):
    # Memory: one upcast copy at most. A float64 weight needs none, and the exact fallback of an
    # ill-conditioned matrix must not copy it again.
    w = with_singular_values(80, 120, np.geomspace(1e6, 1.0, 80))
    seen = []
    real = kappatune.kappa._extremes_from_svdvals
    monkeypatch.setattr(kappatune.kappa, "_extremes_from_svdvals", lambda a: seen.append(a.data_ptr()) or real(a))
    assert abs(kappatune.condition_number(w) - 1e6) / 1e6 < 1e-6
    assert seen == [w.data_ptr()]


def test_beyond_1e6_stays_accurate():
    w = with_singular_values(64, 64, np.geomspace(1e9, 1.0, 64))
    assert abs(kappatune.condition_number(w) - 1e9) / 1e9 < 1e-6


def test_gaussian_float32_matrix():
    w = torch.randn(300, 200, generator=torch.Generator().manual_seed(1))
    assert abs(kappatune.condition_number(w) - reference_kappa(w)) / reference_kappa(w) < 1e-6


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_every_storage_dtype(dtype):
    w = with_singular_values(48, 64, np.geomspace(50.0, 1.0, 48)).to(dtype)
    got = kappatune.condition_number(w)
    ref = reference_kappa(w)  # of the matrix as stored (rounded to dtype)
    assert abs(got - ref) / ref < 1e-6


def test_diagonal_is_exact():
    assert kappatune.condition_number(torch.diag(torch.tensor([4.0, 2.0, 1.0]))) == 4.0


@pytest.mark.parametrize("w", [
    torch.zeros(8, 8),
    torch.ones(8, 5),                                          # rank 1
    torch.randn(6, 3, dtype=torch.float64) @ torch.randn(3, 7, dtype=torch.float64),  # rank 3 of 6x7
    torch.randn(4, 9, 3, dtype=torch.float64) @ torch.randn(4, 3, 9, dtype=torch.float64),  # stack, rank 3
])
def test_rank_deficient_is_inf(w):
    assert kappatune.condition_number(w) == math.inf


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_raises_with_name(bad):
    w = torch.randn(5, 5)
    w[2, 3] = bad
    with pytest.raises(ValueError, match=r"layers\.0\.q_proj\.weight.*NaN/Inf"):
        kappatune.condition_number(w, name="layers.0.q_proj.weight")


@pytest.mark.parametrize("path", ["numpy", "torch"])
@pytest.mark.parametrize("shape", [(3, 6, 20), (3, 20, 6)])      # wide and tall: every weight is checked
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_every_non_finite_position_is_caught(monkeypatch, path, shape, bad):
    if path == "torch":
        monkeypatch.setattr(kappatune.kappa, "_numpy_linalg", lambda a: False)
    b, m, n = shape
    for i, j, k in [(0, 0, 0), (1, m - 1, n - 1), (2, m // 2, n - 1), (2, m - 1, 0)]:
        w = torch.randn(shape, dtype=torch.bfloat16)
        w[i, j, k] = bad
        with pytest.raises(ValueError, match=r"experts\.w1.*NaN/Inf"):
            kappatune.kappa.condition_numbers(w, name="experts.w1")


def test_huge_finite_float64_weights_are_not_mistaken_for_inf():
    # Squares of |w| > 1e154 overflow float64 in the Gram matrix; such a weight is finite, and
    # its κ comes from the (rescaling) SVD instead.
    w = with_singular_values(30, 50, np.geomspace(40.0, 1.0, 30)) * 1e200
    assert abs(kappatune.condition_number(w) - 40.0) / 40.0 < 1e-6


def test_conv_weight_is_flattened_to_out_channels():
    w = torch.randn(16, 3, 3, 3, generator=torch.Generator().manual_seed(0))
    res = kappa_of(w)
    assert res.layout == "flatten"
    assert abs(res.kappa - reference_kappa(w)) / res.kappa < 1e-6
    # a 3-D conv1d kernel, flattened on request
    w1 = torch.randn(8, 4, 5)
    assert abs(kappatune.condition_number(w1, layout="flatten") - reference_kappa(w1)) / reference_kappa(w1) < 1e-6


def test_stack_of_matrices_keeps_per_matrix_values():
    mats = [with_singular_values(24, 40, np.geomspace(k, 1, 24), seed=i) for i, k in enumerate([2.0, 30.0, 400.0])]
    stack = torch.stack(mats).float()
    res = kappa_of(stack)
    assert res.layout == "stack"
    expected = [reference_kappa(m.float()) for m in mats]
    np.testing.assert_allclose(res.per_matrix, expected, rtol=1e-6)
    assert res.kappa == pytest.approx(np.mean(expected), rel=1e-6)
    assert kappatune.condition_number(stack, aggregate="max") == pytest.approx(max(expected), rel=1e-6)
    np.testing.assert_allclose(kappatune.kappa.condition_numbers(stack).numpy(), expected, rtol=1e-6)


def test_stack_chunking_gives_same_values(monkeypatch):
    import kappatune.kappa as km

    stack = torch.randn(7, 30, 20, generator=torch.Generator().manual_seed(3))
    whole = kappatune.kappa.condition_numbers(stack)
    monkeypatch.setattr(km, "_CHUNK_BYTES", 1)  # one matrix per chunk
    np.testing.assert_allclose(kappatune.kappa.condition_numbers(stack).numpy(), whole.numpy(), rtol=1e-12)


def test_bad_arguments():
    with pytest.raises(ValueError, match="at least 2 dimensions"):
        kappatune.condition_number(torch.randn(5), name="norm.weight")
    with pytest.raises(ValueError, match="layout='matrix' needs a 2-D"):
        resolve_layout((2, 3, 4), "matrix")
    with pytest.raises(ValueError, match="layout must be"):
        resolve_layout((2, 3), "diagonal")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="aggregate must be"):
        kappatune.condition_number(torch.randn(2, 3, 4), aggregate="median")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="floating-point"):
        kappatune.condition_number(torch.ones(3, 3, dtype=torch.int64))


def test_gradients_are_not_tracked():
    w = torch.randn(10, 10, requires_grad=True)
    assert isinstance(kappatune.condition_number(w), float)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    w = with_singular_values(64, 96, np.geomspace(1e5, 1, 64)).float()
    assert kappatune.condition_number(w.cuda()) == pytest.approx(kappatune.condition_number(w), rel=1e-9)


def test_float8_weights_are_upcast_too():
    w = with_singular_values(16, 24, np.geomspace(8.0, 1.0, 16)).to(torch.float8_e4m3fn)
    assert kappatune.condition_number(w) == pytest.approx(reference_kappa(w.float()), rel=1e-6)
