import importlib
import json
import logging
import multiprocessing as mp
import os

import pytest
import torch

import kappatune
from kappatune.cache import CACHE_FORMAT, SCHEMA_VERSION, KappaCache, default_cache_dir, tensor_digest

from .conftest import make_tiny_llama

scan_mod = importlib.import_module("kappatune.scan")


@pytest.fixture
def count_computations(monkeypatch):
    """Count κ computations done by scan (cache misses)."""
    calls = []
    real = scan_mod.kappa_of

    def counting(tensor, **kw):
        calls.append(kw.get("name"))
        return real(tensor, **kw)

    monkeypatch.setattr(scan_mod, "kappa_of", counting)
    return calls


def n_eligible(model):
    return sum(1 for _, p in model.named_parameters() if p.ndim >= 2)


def test_warm_scan_computes_nothing_and_gives_same_table(tmp_path, count_computations):
    model = make_tiny_llama()
    cold = kappatune.scan(model, cache=tmp_path, progress=False)
    assert len(count_computations) == n_eligible(model) == len(cold)
    count_computations.clear()
    warm = kappatune.scan(model, cache=tmp_path, progress=False)
    assert count_computations == []
    assert warm.to_dict() == cold.to_dict()
    data = json.loads((tmp_path / "kappa_cache.json").read_text())
    assert data["format"] == CACHE_FORMAT and data["schema_version"] == SCHEMA_VERSION
    entry = next(iter(data["entries"].values()))
    assert {"kappa", "shape", "dtype", "layout", "sigma_max", "sigma_min"} <= set(entry)


def test_cache_of_model_a_is_not_used_for_model_b(tmp_path, count_computations):
    a, b = make_tiny_llama(seed=0), make_tiny_llama(seed=1)   # same names and shapes, other weights
    kappatune.scan(a, cache=tmp_path, progress=False)
    count_computations.clear()
    tb = kappatune.scan(b, cache=tmp_path, progress=False)
    assert len(count_computations) == n_eligible(b)
    fresh = kappatune.scan(b, cache=None, progress=False)
    assert tb.kappas == fresh.kappas


def test_one_changed_tensor_is_the_only_recomputation(tmp_path, count_computations):
    model = make_tiny_llama()
    kappatune.scan(model, cache=tmp_path, progress=False)
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[0, 0] += 1e-3
    count_computations.clear()
    kappatune.scan(model, cache=tmp_path, progress=False)
    assert count_computations == ["model.layers.1.mlp.up_proj.weight"]


def test_recompute_forces_fresh_values(tmp_path, count_computations):
    model = make_tiny_llama()
    kappatune.scan(model, cache=tmp_path, progress=False)
    count_computations.clear()
    kappatune.scan(model, cache=tmp_path, recompute=True, progress=False)
    assert len(count_computations) == n_eligible(model)


def test_default_cache_location_from_env(tmp_path, monkeypatch):
    monkeypatch.setenv("KAPPATUNE_CACHE_DIR", str(tmp_path / "here"))
    assert default_cache_dir() == tmp_path / "here"
    kappatune.scan(make_tiny_llama(), progress=False)  # cache=True by default
    assert (tmp_path / "here" / "kappa_cache.json").is_file()
    monkeypatch.delenv("KAPPATUNE_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "kappatune"


def test_json_file_path_is_accepted(tmp_path):
    f = tmp_path / "my_kappas.json"
    kappatune.scan(make_tiny_llama(), cache=f, progress=False)
    assert len(KappaCache(f)) > 0


def test_corrupt_file_warns_recomputes_and_is_kept_aside(tmp_path, caplog, count_computations):
    path = tmp_path / "kappa_cache.json"
    path.write_text('{"format": "kappatune-kappa-cache", "schema_version": 1, "entries": {tru')
    model = make_tiny_llama()
    with caplog.at_level(logging.WARNING, logger="kappatune"):
        kappatune.scan(model, cache=tmp_path, progress=False)
    assert str(path) in caplog.text and "corrupt" in caplog.text
    assert len(count_computations) == n_eligible(model)
    assert len(KappaCache(tmp_path)) == n_eligible(model)          # a fresh valid file
    assert list(tmp_path.glob("kappa_cache.json.corrupt-*"))       # the bad one kept, not lost


def test_malformed_entries_are_dropped(tmp_path, caplog, count_computations):
    model = make_tiny_llama()
    kappatune.scan(model, cache=tmp_path, progress=False)
    path = tmp_path / "kappa_cache.json"
    data = json.loads(path.read_text())
    key = next(iter(data["entries"]))
    data["entries"][key]["kappa"] = "not a number"
    path.write_text(json.dumps(data))
    count_computations.clear()
    with caplog.at_level(logging.WARNING, logger="kappatune"):
        kappatune.scan(model, cache=tmp_path, progress=False)
    assert "malformed" in caplog.text
    assert len(count_computations) == 1


@pytest.mark.parametrize("content", [
    '{"some": "other tool"}',
    json.dumps({"format": CACHE_FORMAT, "schema_version": SCHEMA_VERSION + 1, "entries": {}}),
])
def test_foreign_or_newer_file_is_neither_used_nor_overwritten(tmp_path, caplog, content):
    path = tmp_path / "kappa_cache.json"
    path.write_text(content)
    with caplog.at_level(logging.WARNING, logger="kappatune"):
        table = kappatune.scan(make_tiny_llama(), cache=tmp_path, progress=False)
    assert len(table) > 0
    assert path.read_text() == content
    assert "not be overwritten" in caplog.text


def test_old_schema_is_ignored_and_rewritten(tmp_path, caplog):
    path = tmp_path / "kappa_cache.json"
    path.write_text(json.dumps({"format": CACHE_FORMAT, "schema_version": 0, "entries": {"x": {}}}))
    with caplog.at_level(logging.WARNING, logger="kappatune"):
        kappatune.scan(make_tiny_llama(), cache=tmp_path, progress=False)
    assert "old schema" in caplog.text
    assert json.loads(path.read_text())["schema_version"] == SCHEMA_VERSION


def test_interrupted_write_leaves_previous_file_intact(tmp_path, monkeypatch):
    model = make_tiny_llama()
    kappatune.scan(model, cache=tmp_path, progress=False)
    path = tmp_path / "kappa_cache.json"
    before = path.read_bytes()

    real_dump = json.dump

    def crash(obj, f, **kw):
        f.write('{"format": "kappatune-kappa-cache", "entr')   # half a file, then die
        raise KeyboardInterrupt("simulated crash mid-write")

    monkeypatch.setattr(json, "dump", crash)
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.weight.mul_(2.5)
    with pytest.raises(KeyboardInterrupt):
        kappatune.scan(model, cache=tmp_path, progress=False)
    monkeypatch.setattr(json, "dump", real_dump)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_unwritable_location_warns_and_scan_succeeds(tmp_path, caplog):
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("a file where the cache folder should be")
    cache = KappaCache(blocker / "sub")  # parent is a file: cannot be created, even as root
    with caplog.at_level(logging.WARNING, logger="kappatune"):
        table = kappatune.scan(make_tiny_llama(), cache=cache, progress=False)
    assert len(table) > 0
    assert "could not be written" in caplog.text and "sub" in caplog.text


def test_cache_path_that_is_a_plain_file_is_rejected(tmp_path):
    f = tmp_path / "cachefile"
    f.write_text("x")
    with pytest.raises(ValueError, match="does not end in .json"):
        KappaCache(f)


def _writer(path, worker, n_entries, rounds):
    cache = KappaCache(path)
    for r in range(rounds):
        for i in range(n_entries // rounds):
            idx = r * (n_entries // rounds) + i
            cache.put(f"w{worker}-{idx}|matrix", kappa=1.0 + idx, sigma_max=1.0, sigma_min=1.0,
                      shape=[2, 2], dtype="float32", layout="matrix")
        assert cache.save()


def test_concurrent_writers_merge_every_entry(tmp_path):
    ctx = mp.get_context("fork" if hasattr(os, "fork") else "spawn")
    procs = [ctx.Process(target=_writer, args=(str(tmp_path), w, 60, 6)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    data = json.loads((tmp_path / "kappa_cache.json").read_text())
    assert len(data["entries"]) == 4 * 60
    assert {f"w{w}-{i}|matrix" for w in range(4) for i in range(60)} == set(data["entries"])


def test_digest_depends_on_bytes_dtype_and_shape_only():
    x = torch.randn(6, 4)
    assert tensor_digest(x) == tensor_digest(x.clone())
    assert tensor_digest(x.t().contiguous().t()) == tensor_digest(x)   # layout in memory does not matter
    assert tensor_digest(x) != tensor_digest(x.reshape(4, 6))
    assert tensor_digest(x) != tensor_digest(x.double())
    y = x.clone()
    y[5, 3] = torch.nextafter(y[5, 3], torch.tensor(float("inf")))    # one ulp in one element
    assert tensor_digest(x) != tensor_digest(y)
    assert tensor_digest(x.to(torch.bfloat16)) != tensor_digest(x.to(torch.float16))
