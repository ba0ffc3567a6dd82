import logging
import math

import numpy as np
import pytest
import torch
from torch import nn

import kappatune
from kappatune.table import KappaEntry, KappaTable

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


# -- Spectrum's SNR through the same pipeline and cache -------------------------------------------
def ref_snr(t):
    """Spectrum's SNR written out from its definition (arXiv 2406.06623; cognitivecomputations/spectrum)."""
    w = t.detach().double().reshape(t.shape[0], -1).numpy()
    s = np.linalg.svd(w, compute_uv=False)
    q75, q25 = np.percentile(s, 75), np.percentile(s, 25)
    m, n = w.shape
    tau = (q75 - q25) / 1.349 * (1 + math.sqrt(min(m, n) / max(m, n)))
    noise = s[s <= tau].sum() if (s <= tau).any() else 1.0
    return math.inf if noise == 0 else s[s > tau].sum() / noise / s[0]


def test_snr_scan_follows_spectrum_and_ranks_highest_first(tiny_llama):
    params = dict(tiny_llama.named_parameters())
    kappa = kappatune.scan(tiny_llama, cache=None, progress=False)
    snr = kappatune.scan(tiny_llama, cache=None, progress=False, score="snr")
    assert snr.score.name == "snr" and kappa.score.name == "kappa"
    assert set(snr.names) == set(kappa.names) and snr.skipped == kappa.skipped    # the same filters
    vals = [e.snr for e in snr]
    assert vals == sorted(vals, reverse=True) and snr.names != kappa.names
    for e in snr:
        assert e.score == "snr" and math.isnan(e.kappa) and e.sigma_max > 0
        assert e.snr == pytest.approx(ref_snr(params[e.name]), rel=1e-9)
    # known spectra: IQR 0 → every σ is signal and the noise sum is 1 (as Spectrum): (10 + 4) / 1 / 10;
    # σ = (5, 0, 0, 0) exactly: noise sum 0 → inf (first); all zero → 0 (last)
    g = torch.Generator().manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(20, 5, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(5, 5, generator=g, dtype=torch.float64))
    known = (u @ torch.diag(torch.tensor([10.0, 1, 1, 1, 1], dtype=torch.float64)) @ v.T).T.contiguous()
    single = torch.zeros(6, 4)
    single[2, 1] = 5.0
    t = kappatune.scan({"known.weight": known, "rank1.weight": single, "zero.weight": torch.zeros(3, 5)},
                       cache=None, progress=False, score="snr")
    assert t.names == ["rank1.weight", "known.weight", "zero.weight"]
    assert t["known.weight"].snr == pytest.approx(1.4, rel=1e-12) and t["rank1.weight"].snr == math.inf
    assert t["zero.weight"].snr == 0.0
    # scale: SNR(c·W) = SNR(W) / c, also for magnitudes whose squares would overflow
    w = torch.randn(24, 16, generator=g, dtype=torch.float64)
    s1 = kappatune.kappa.snr_of(w).snr
    assert kappatune.kappa.snr_of(3 * w).snr == pytest.approx(s1 / 3, rel=1e-12)
    assert kappatune.kappa.snr_of(w * 1e200).snr * 1e200 == pytest.approx(s1, rel=1e-12)
    with pytest.raises(ValueError, match="bad.weight: weight holds 1 NaN"):
        kappatune.scan({"bad.weight": torch.tensor([[1.0, float("nan")], [0.0, 1.0]])}, cache=None,
                       progress=False, score="snr")
    with pytest.raises(ValueError, match="score must be one of 'kappa', 'snr'"):
        kappatune.scan(tiny_llama, cache=None, progress=False, score="SNR")


def test_snr_of_a_stack_is_per_matrix():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(3, 12, 20, generator=g)
    t = kappatune.scan({"experts.w": w}, cache=None, progress=False, score="snr")
    e = t["experts.w"]
    per = [ref_snr(w[i]) for i in range(3)]
    assert e.layout == "stack" and e.per_matrix == pytest.approx(per, rel=1e-9)
    assert e.snr == pytest.approx(sum(per) / 3, rel=1e-9)
    mx = kappatune.scan({"experts.w": w}, cache=None, progress=False, score="snr", aggregate="max")
    assert mx["experts.w"].snr == pytest.approx(max(per), rel=1e-9)


def test_kappa_and_snr_share_the_cache_without_ever_mixing(tiny_llama, tmp_path):
    import json

    from kappatune.cache import InvalidEntry, KappaCache, validate_entry

    path = tmp_path / "c"
    c = KappaCache(path)
    kappa = kappatune.scan(tiny_llama, cache=c, progress=False)
    n = len(kappa)
    assert (c.hits, c.misses) == (0, n)
    c = KappaCache(path)
    snr = kappatune.scan(tiny_llama, cache=c, progress=False, score="snr")
    assert (c.hits, c.misses) == (0, n)                  # κ entries are never taken for SNR ones
    keys = set(KappaCache(path).keys())
    assert len(keys) == 2 * n and sum(k.endswith("|matrix|snr") for k in keys) == n
    c = KappaCache(path)
    again = kappatune.scan(tiny_llama, cache=c, progress=False, score="snr")
    assert (c.hits, c.misses) == (n, 0) and again.to_dict() == snr.to_dict()
    c = KappaCache(path)
    assert kappatune.scan(tiny_llama, cache=c, progress=False).to_dict() == kappa.to_dict() and c.hits == n
    # a κ entry under an SNR key (or the reverse) is refused, and so is an SNR that its parts contradict
    e = kappa[0]
    kkey = KappaCache.key(e.digest, "matrix")
    skey = KappaCache.key(e.digest, "matrix", "snr")
    assert skey == kkey + "|snr"
    store = KappaCache(path)
    k_entry, s_entry = store._raw_many([kkey])[kkey], store._raw_many([skey])[skey]
    assert "score" not in k_entry and s_entry["score"] == "snr"           # κ records are written as before
    validate_entry(k_entry, kkey) and validate_entry(s_entry, skey)
    with pytest.raises(InvalidEntry, match="a κ entry under an SNR key"):
        validate_entry(k_entry, skey)
    with pytest.raises(InvalidEntry, match="an SNR entry under a κ key"):
        validate_entry(s_entry, kkey)
    with pytest.raises(InvalidEntry, match="snr .* but signal/noise/sigma_max"):
        validate_entry({**s_entry, "snr": s_entry["snr"] * 2}, skey)
    # a tampered SNR row is recomputed, never used
    import sqlite3

    con = sqlite3.connect(path / "kappa_cache.sqlite")
    con.execute("UPDATE entries SET entry = ? WHERE key = ?",
                (json.dumps({**s_entry, "snr": s_entry["snr"] * 2}), skey))
    con.commit()
    con.close()
    c = KappaCache(path)
    fresh = kappatune.scan(tiny_llama, cache=c, progress=False, score="snr")
    assert (c.hits, c.misses) == (n - 1, 1) and fresh[e.name].snr == snr[e.name].snr


def test_a_cache_file_from_before_the_scores_is_read_as_it_is(tiny_llama, tmp_path):
    import json
    import sqlite3

    from kappatune.cache import CACHE_FORMAT, KappaCache, tensor_digest

    params = dict(tiny_llama.named_parameters())
    name = "model.layers.0.self_attn.q_proj.weight"
    w = params[name].detach()
    s = np.linalg.svd(w.double().numpy(), compute_uv=False)
    key = f"{tensor_digest(w)}|matrix"
    old = {"kappa": float(s[0] / s[-1]), "sigma_max": float(s[0]), "sigma_min": float(s[-1]),
           "shape": list(w.shape), "dtype": "float32", "layout": "matrix", "per_matrix": None, "name": name}
    path = tmp_path / "old.sqlite"  # a database as written before SNR entries existed: κ rows, no "score"
    con = sqlite3.connect(str(path))
    with con:
        con.execute("CREATE TABLE meta (k TEXT PRIMARY KEY, v TEXT NOT NULL)")
        con.execute("CREATE TABLE entries (key TEXT PRIMARY KEY, entry TEXT NOT NULL) WITHOUT ROWID")
        con.execute("INSERT INTO meta VALUES ('format', ?), ('schema_version', '1')", (CACHE_FORMAT,))
        con.execute("INSERT INTO entries VALUES (?, ?)", (key, json.dumps(old)))
    con.close()
    c = KappaCache(path)
    t = kappatune.scan(tiny_llama, cache=c, progress=False, include="q_proj")
    assert c.hits == 1 and t[name].kappa == float(s[0] / s[-1])
    c = KappaCache(path)
    kappatune.scan(tiny_llama, cache=c, progress=False, include="q_proj", score="snr")
    assert c.hits == 0                                  # a κ entry is not an SNR
    c.clear_memory()
    con = sqlite3.connect(str(path))
    rows = dict(con.execute("SELECT key, entry FROM entries"))
    con.close()
    assert json.loads(rows[key]) == old
    assert sum(k.endswith("|snr") for k in rows) == 2


def test_sharded_snr_step_and_broadcast_keep_the_score(tmp_path):
    import importlib

    import torch.distributed as dist

    from kappatune.kappa import SnrResult

    scan_mod = importlib.import_module("kappatune.pipeline")
    g = torch.Generator().manual_seed(2)
    sd = {"a.weight": torch.randn(12, 20, generator=g), "b.weight": torch.randn(9, 7, generator=g),
          "experts.w": torch.randn(2, 6, 5, generator=g)}
    refs = scan_mod.state_dict_refs(sd)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        got = scan_mod.compute_sharded(refs, {}, score="snr", num_workers=2)
        local = scan_mod.compute_local((scan_mod.Looked(r, None, None) for r in refs), score="snr", num_workers=2)
        assert {n: repr(v) for n, v in got.items()} == {n: repr(v) for n, v in local.items()}   # NaN-safe
        assert set(got) == set(sd) and all(isinstance(v, SnrResult) for v in got.values())
        table = kappatune.scan(sd, cache=None, progress=False, score="snr")
        back = scan_mod._broadcast_table(table)
        assert back.score.name == "snr" and back.to_dict() == table.to_dict()
    finally:
        dist.destroy_process_group()
