import os

import pytest
import torch


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    """Every test gets its own default κ cache folder (never the user's ~/.cache)."""
    monkeypatch.setenv("KAPPATUNE_CACHE_DIR", str(tmp_path / "kappa_cache"))
    yield


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    yield


def make_tiny_llama(seed: int = 0, layers: int = 2, hidden: int = 64, vocab: int = 128, dtype=torch.float32):
    """A tiny LlamaForCausalLM built from a config (no download)."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, vocab_size=vocab, max_position_embeddings=128,
        tie_word_embeddings=False,
    )
    return transformers.LlamaForCausalLM(cfg).to(dtype)


@pytest.fixture
def count_computations(monkeypatch):
    """Count κ computations done by scan (cache misses): the names passed to ``kappatune.pipeline.kappa_of``."""
    import importlib

    scan_mod = importlib.import_module("kappatune.pipeline")
    calls = []
    real = scan_mod.kappa_of

    def counting(tensor, **kw):
        calls.append(kw.get("name"))
        return real(tensor, **kw)

    monkeypatch.setattr(scan_mod, "kappa_of", counting)
    return calls


@pytest.fixture
def tiny_llama():
    return make_tiny_llama()


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False,
                     help="also run tests marked slow (real pretrained model; minutes)")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: needs the real pretrained model or minutes of CPU; run with --runslow")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow") or os.environ.get("KAPPATUNE_RUN_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow: run with --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
