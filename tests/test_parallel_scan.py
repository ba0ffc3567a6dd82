"""The scan's parallel compute step (num_workers): the same table as the serial scan, bit for bit."""

import threading
import time

import numpy as np
import pytest
import torch

import kappatune
import importlib
from kappatune.refs import TensorRef

S = importlib.import_module("kappatune.pipeline")  # the module (kappatune.scan is also the function)


def with_singular_values(m, n, s, seed=0):
    rng = np.random.default_rng(seed)
    k = min(m, n)
    u, _ = np.linalg.qr(rng.standard_normal((m, k)))
    v, _ = np.linalg.qr(rng.standard_normal((n, k)))
    return torch.from_numpy((u * np.asarray(s, dtype=np.float64)) @ v.T).float()


def mixed_state_dict():
    g = torch.Generator().manual_seed(0)
    sd = {
        "a.well": torch.randn(150, 300, generator=g),                                    # dense path
        "b.ill": with_singular_values(200, 200, np.geomspace(1e5, 1.0, 200), seed=1),    # QR path
        "c.svd": with_singular_values(64, 80, np.geomspace(1e9, 1.0, 64), seed=2).double(),  # SVD
        "d.stack": torch.randn(3, 40, 120, generator=g),                                  # 3-D stack
        "e.lowrank": torch.randn(50, 8, generator=g) @ torch.randn(8, 60, generator=g),   # κ = inf (fp32)
        "f.small": torch.randn(7, 5, generator=g, dtype=torch.float64),
        "g.bias": torch.randn(30, generator=g),                                           # skipped
    }
    for i in range(6):
        sd[f"h.layer{i}"] = torch.randn(96 + 16 * i, 200, generator=g).to(torch.bfloat16)
    return sd


def table_rows(t):
    return [(e.name, e.kappa, e.sigma_max, e.sigma_min, e.per_matrix, e.layout) for e in t], t.skipped


@pytest.fixture
def one_blas_thread():
    # The serial scan keeps BLAS's thread count; pin it to one so that serial and parallel run the
    # same arithmetic (a different thread count may change the last bits of a BLAS result).
    from threadpoolctl import threadpool_limits

    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    with threadpool_limits(limits=1, user_api="blas"):
        yield
    torch.set_num_threads(prev)


@pytest.mark.parametrize("workers", [2, 3, 5])
def test_parallel_scan_returns_exactly_the_serial_table(one_blas_thread, workers):
    sd = mixed_state_dict()
    serial = kappatune.scan(sd, cache=None, progress=False, num_workers=1)
    parallel = kappatune.scan(sd, cache=None, progress=False, num_workers=workers)
    assert table_rows(parallel) == table_rows(serial)
    assert [e.name for e in serial][0] and "g.bias" in serial.skipped


def test_parallel_scan_with_a_partly_warm_cache(one_blas_thread, tmp_path):
    sd = mixed_state_dict()
    serial = kappatune.scan(sd, cache=None, progress=False, num_workers=1)
    half = {k: v for i, (k, v) in enumerate(sd.items()) if i % 2 == 0}
    kappatune.scan(half, cache=tmp_path, progress=False, num_workers=2)      # caches every other tensor
    parallel = kappatune.scan(sd, cache=tmp_path, progress=False, num_workers=2)
    assert table_rows(parallel) == table_rows(serial)
    warm = kappatune.scan(sd, cache=tmp_path, progress=False, num_workers=2)  # all from the cache now
    assert table_rows(warm) == table_rows(serial)


def test_default_workers_follow_torch_threads():
    prev = torch.get_num_threads()
    try:
        torch.set_num_threads(3)
        assert S.resolve_workers(None) == 3
        torch.set_num_threads(1)
        assert S.resolve_workers(None) == 1
    finally:
        torch.set_num_threads(prev)
    assert S.resolve_workers(4) == 4


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "2"])
def test_bad_num_workers(bad):
    with pytest.raises(ValueError, match="num_workers must be None or an int >= 1"):
        kappatune.scan({"w": torch.randn(4, 4)}, cache=None, progress=False, num_workers=bad)


def test_threads_are_restored_and_pinned_while_running(monkeypatch):
    prev = torch.get_num_threads()
    seen = []
    real = S._kappa_of

    def spy(ref, tensor=None):
        seen.append(torch.get_num_threads())
        return real(ref, tensor)

    monkeypatch.setattr(S, "_kappa_of", spy)
    torch.set_num_threads(2)
    try:
        kappatune.scan(mixed_state_dict(), cache=None, progress=False, num_workers=2)
        assert set(seen) == {1}
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(prev)


def test_a_worker_error_names_the_tensor():
    sd = mixed_state_dict()
    sd["c.bad"] = torch.randn(20, 30)
    sd["c.bad"][3, 4] = float("nan")
    with pytest.raises(ValueError, match=r"c\.bad.*NaN/Inf"):
        kappatune.scan(sd, cache=None, progress=False, num_workers=2)


def test_tensors_in_hand_stay_bounded(monkeypatch):
    # Peak memory must not grow with the model: at most 2·workers tensors submitted and unfinished.
    loaded = 0
    done = 0
    worst = 0
    lock = threading.Lock()

    def make(i):
        def load():
            nonlocal loaded, worst
            with lock:
                loaded += 1
                worst = max(worst, loaded - done)
            return torch.randn(12, 16, generator=torch.Generator().manual_seed(i))
        return load

    real = S._kappa_of

    def slow(ref, tensor=None):
        nonlocal done
        out = real(ref, tensor)
        time.sleep(0.002)
        with lock:
            done += 1
        return out

    monkeypatch.setattr(S, "_kappa_of", slow)
    refs = [TensorRef(name=f"t{i}", shape=(12, 16), dtype="float32", load=make(i)) for i in range(60)]
    table = S.scan_refs(refs, cache=None, progress=False, num_workers=2)
    assert len(table) == 60
    assert worst <= 2 * 2 + 2


def test_scan_checkpoint_passes_num_workers(one_blas_thread, tmp_path):
    from safetensors.torch import save_file

    sd = {k: v.contiguous() for k, v in mixed_state_dict().items()}
    save_file(sd, str(tmp_path / "model.safetensors"))
    serial = kappatune.scan_checkpoint(tmp_path, cache=None, progress=False, num_workers=1)
    parallel = kappatune.scan_checkpoint(tmp_path, cache=None, progress=False, num_workers=2)
    assert table_rows(parallel) == table_rows(serial)
