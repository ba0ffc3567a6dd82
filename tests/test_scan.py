import logging
import math

import numpy as np
import pytest
import torch
from torch import nn

import kappatune
from kappatune.selection import KappaEntry, KappaTable

from .conftest import make_tiny_llama


def ref_kappa(t):
    s = np.linalg.svd(t.detach().double().reshape(t.shape[0], -1).numpy(), compute_uv=False)
    return s[0] / s[-1]


def test_scan_covers_every_matrix_lowest_kappa_first(tiny_llama):
    table = kappatune.scan(tiny_llama, cache=None, progress=False)
    params = dict(tiny_llama.named_parameters())
    assert set(table.names) == {n for n, p in params.items() if p.ndim >= 2}
    assert set(table.skipped) == {n for n, p in params.items() if p.ndim < 2}
    assert set(table.skipped.values()) == {"ndim<2"}
    kappas = [e.kappa for e in table]
    assert kappas == sorted(kappas)
    for e in table:
        assert e.kappa == pytest.approx(ref_kappa(params[e.name]), rel=1e-6)
        assert e.shape == tuple(params[e.name].shape) and e.numel == params[e.name].numel()


def test_tied_weights_counted_once():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=64,
                                   tie_word_embeddings=True)
    model = transformers.LlamaForCausalLM(cfg)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    table = kappatune.scan(model, cache=None, progress=False)
    assert sum(1 for n in table.names if "embed_tokens" in n or "lm_head" in n) == 1


def test_ties_are_broken_by_name():
    eye = torch.eye(4)
    table = kappatune.scan({"b.weight": eye.clone(), "a.weight": eye.clone(), "c.weight": 2 * eye},
                           cache=None, progress=False)
    assert table.names == ["a.weight", "b.weight", "c.weight"]


def test_filters_and_skip_reasons(tiny_llama):
    table = kappatune.scan(tiny_llama, cache=None, progress=False, max_dim=100,
                           include=[r"layers\.", r"lm_head"], exclude=r"v_proj")
    sk = table.skipped
    assert sk["model.embed_tokens.weight"] == "not included"
    assert sk["model.layers.0.self_attn.v_proj.weight"] == "excluded"
    assert sk["model.layers.0.mlp.up_proj.weight"] == "max_dim"      # 128 x 64
    assert sk["lm_head.weight"] == "max_dim"                          # 128 x 64
    assert sk["model.layers.0.input_layernorm.weight"] == "ndim<2"
    assert set(table.names) == {n for n, p in tiny_llama.named_parameters()
                                if p.ndim == 2 and "layers." in n and "v_proj" not in n and max(p.shape) <= 100}
    with pytest.raises(ValueError, match="include: invalid regular expression"):
        kappatune.scan(tiny_llama, cache=None, include="(", progress=False)
    with pytest.raises(ValueError, match="max_dim must be"):
        kappatune.scan(tiny_llama, cache=None, max_dim=0, progress=False)
    with pytest.raises(TypeError, match="nn.Module or a mapping"):
        kappatune.scan([torch.eye(3)], cache=None)


def test_min_ndim_keeps_only_higher_rank():
    sd = {"w2": torch.randn(4, 4), "w3": torch.randn(2, 4, 4), "b": torch.randn(4)}
    table = kappatune.scan(sd, cache=None, min_ndim=3, progress=False)
    assert table.names == ["w3"] and table.skipped == {"w2": "ndim<3", "b": "ndim<3"}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_models(dtype):
    model = make_tiny_llama(dtype=dtype)
    table = kappatune.scan(model, cache=None, progress=False)
    params = dict(model.named_parameters())
    assert len(table) == sum(1 for p in params.values() if p.ndim >= 2)
    for e in table:
        assert e.dtype == str(dtype).replace("torch.", "")
        assert e.kappa == pytest.approx(ref_kappa(params[e.name]), rel=1e-6)


def test_conv_model_uses_out_channel_flattening():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv1d(8, 4, 5), nn.Flatten(), nn.Linear(12, 5))
    table = kappatune.scan(model, cache=None, progress=False)
    assert table["0.weight"].layout == "flatten"
    assert table["2.weight"].layout == "flatten"          # 3-D conv1d kernel, not an expert stack
    assert table["4.weight"].layout == "matrix"
    for n, p in model.named_parameters():
        if p.ndim >= 2:
            assert table[n].kappa == pytest.approx(ref_kappa(p), rel=1e-6)


class FusedExperts(nn.Module):
    def __init__(self):
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.randn(4, 16, 24))
        self.down_proj = nn.Parameter(torch.randn(4, 24, 8))


def test_fused_expert_stack_keeps_per_matrix_and_aggregates():
    model = nn.ModuleDict({"experts": FusedExperts()})
    mean_t = kappatune.scan(model, cache=None, progress=False)
    max_t = kappatune.scan(model, cache=None, progress=False, aggregate="max")
    w = model["experts"].gate_up_proj
    per = [ref_kappa(w[i]) for i in range(4)]
    e = mean_t["experts.gate_up_proj"]
    assert e.layout == "stack" and len(e.per_matrix) == 4
    np.testing.assert_allclose(e.per_matrix, per, rtol=1e-6)
    assert e.kappa == pytest.approx(np.mean(per), rel=1e-6)
    assert max_t["experts.gate_up_proj"].kappa == pytest.approx(max(per), rel=1e-6)


def test_max_dim_applies_to_expert_matrices_not_expert_count():
    sd = {"experts.w": torch.randn(64, 8, 8)}
    assert kappatune.scan(sd, cache=None, max_dim=16, progress=False).names == ["experts.w"]


def test_aggregate_from_cache_matches_fresh(tmp_path):
    model = nn.ModuleDict({"experts": FusedExperts()})
    kappatune.scan(model, cache=tmp_path, progress=False)
    warm_max = kappatune.scan(model, cache=tmp_path, progress=False, aggregate="max")
    fresh_max = kappatune.scan(model, cache=None, progress=False, aggregate="max")
    assert warm_max.kappas == fresh_max.kappas


def test_nan_weight_names_the_parameter(tiny_llama):
    with torch.no_grad():
        tiny_llama.model.layers[1].self_attn.o_proj.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"model\.layers\.1\.self_attn\.o_proj\.weight"):
        kappatune.scan(tiny_llama, cache=None, progress=False)


def test_rank_deficient_tensor_is_inf_and_last():
    table = kappatune.scan({"low": torch.ones(4, 4), "ok": torch.eye(4)}, cache=None, progress=False)
    assert table.names == ["ok", "low"] and math.isinf(table["low"].kappa)


def test_log_summary_and_progress_switch(tiny_llama, caplog, capsys):
    with caplog.at_level(logging.INFO, logger="kappatune"):
        kappatune.scan(tiny_llama, cache=None, progress=False)
    assert "16 tensors analysed (0 from cache, 16 computed)" in caplog.text
    assert "5 skipped (ndim<2: 5)" in caplog.text
    assert "κ scan" not in capsys.readouterr().err
    kappatune.scan(tiny_llama, cache=None, progress=True)
    assert "κ scan" in capsys.readouterr().err


def test_scan_does_not_touch_weights_or_grads(tiny_llama):
    before = {n: p.detach().clone() for n, p in tiny_llama.named_parameters()}
    kappatune.scan(tiny_llama, cache=None, progress=False)
    for n, p in tiny_llama.named_parameters():
        assert torch.equal(p, before[n]) and p.grad is None and p.requires_grad


def test_meta_tensors_are_refused():
    with torch.device("meta"):
        model = nn.Linear(4, 4)
    with pytest.raises(ValueError, match="meta device"):
        kappatune.scan(model, cache=None, progress=False)


def test_table_serialisation_round_trip(tiny_llama):
    table = kappatune.scan(tiny_llama, cache=None, progress=False)
    again = KappaTable.from_dict(table.to_dict())
    assert again.to_dict() == table.to_dict() and again.skipped == table.skipped
    assert "KappaTable(16 tensors" in repr(table)
    text = table.format(top=3, selected=table.names[:1]).splitlines()
    assert len(text) == 4 and text[1].split()[1] == table.names[0] and text[1].endswith("*")
    assert not text[2].endswith("*")


def test_table_rejects_duplicate_names():
    e = KappaEntry("a", 1.0, (2, 2), 4, "float32")
    with pytest.raises(ValueError, match="duplicate"):
        KappaTable([e, e])
