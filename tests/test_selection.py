import logging
import math

import pytest
from torch import nn

import kappatune
from kappatune.refs import layer_index, module_kind
from kappatune.table import KappaEntry, KappaTable


def entry(name, kappa, numel=100):
    return KappaEntry(name=name, kappa=kappa, shape=(numel // 10, 10), numel=numel, dtype="float32")


@pytest.fixture
def table():
    es = []
    for layer in range(4):
        es += [
            entry(f"model.layers.{layer}.self_attn.q_proj.weight", 100.0 + layer, 100),
            entry(f"model.layers.{layer}.self_attn.v_proj.weight", 10.0 + layer, 50),
            entry(f"model.layers.{layer}.mlp.up_proj.weight", 1.0 + layer, 400),
        ]
    return KappaTable(es)


def test_names_helpers():
    assert module_kind("model.layers.3.self_attn.q_proj.weight") == "q_proj"
    assert module_kind("model.layers.0.mlp.experts.gate_up_proj") == "gate_up_proj"
    assert module_kind("lm_head.weight") == "lm_head"
    assert layer_index("model.layers.12.mlp.up_proj.weight") == 12
    assert layer_index("lm_head.weight") is None


def test_num_tensors_top_fraction_max_kappa(table):
    assert table.select(num_tensors=2) == ["model.layers.0.mlp.up_proj.weight", "model.layers.1.mlp.up_proj.weight"]
    assert table.select(top_fraction=0.25) == table.names[:3]          # ceil(0.25 * 12)
    assert table.select(top_fraction=0.01) == table.names[:1]
    assert table.select(max_kappa=11.0) == table.names[:6]   # up_proj 1..4, v_proj 10, 11
    assert table.select(num_tensors=3, exclude="up_proj") == [
        "model.layers.0.self_attn.v_proj.weight", "model.layers.1.self_attn.v_proj.weight",
        "model.layers.2.self_attn.v_proj.weight"]
    assert table.select(num_tensors=1, include=["q_proj"]) == ["model.layers.0.self_attn.q_proj.weight"]


def test_param_budget_fraction_and_count(table):
    total = table.total_numel  # 4 * 550
    sel = table.select(param_budget=0.5)
    used = sum(table[n].numel for n in sel)
    assert used <= 0.5 * total
    # walks lowest κ first: 4 up_proj (1600) exceed 1100, so 2 up_proj + the v_projs that fit
    assert sel[:2] == ["model.layers.0.mlp.up_proj.weight", "model.layers.1.mlp.up_proj.weight"]
    assert table.select(param_budget=450) == ["model.layers.0.mlp.up_proj.weight", "model.layers.0.self_attn.v_proj.weight"]
    assert table.select(param_budget=50) == ["model.layers.0.self_attn.v_proj.weight"]


def test_group_by_kind_spreads_the_budget(table):
    sel = table.select(num_tensors=1, group_by="kind")
    assert sorted(sel) == sorted(["model.layers.0.self_attn.q_proj.weight",
                                  "model.layers.0.self_attn.v_proj.weight", "model.layers.0.mlp.up_proj.weight"])
    assert [table[n].kappa for n in sel] == sorted(table[n].kappa for n in sel)   # κ order overall
    sel = table.select(top_fraction=0.5, group_by="layer")
    assert len(sel) == 8 and all(sum(f"layers.{i}." in n for n in sel) == 2 for i in range(4))
    sel = table.select(param_budget=0.5, group_by="kind")
    for kind in ("q_proj", "v_proj", "up_proj"):
        assert sum(1 for n in sel if kind in n) == 2
    custom = table.select(num_tensors=1, group_by=lambda n: "attn" in n)
    assert len(custom) == 2


def test_oversized_budgets_select_everything_with_a_warning(table, caplog):
    with caplog.at_level(logging.WARNING, logger="kappatune"):
        assert table.select(num_tensors=100) == table.names
    assert "exceeds the 12 eligible" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="kappatune"):
        assert table.select(param_budget=10**9) == table.names
        assert table.select(param_budget=1.0) == table.names
    assert "covers all" in caplog.text


@pytest.mark.parametrize("kwargs, msg", [
    ({}, "exactly one selection policy.*got none"),
    ({"num_tensors": 2, "top_fraction": 0.1}, r"exactly one.*got num_tensors, top_fraction$"),
    ({"num_tensors": 0}, "num_tensors must be an int >= 1"),
    ({"num_tensors": 2.0}, "num_tensors must be an int"),
    ({"top_fraction": 1.5}, r"top_fraction must be in \(0, 1\]"),
    ({"top_fraction": 0}, r"top_fraction must be in \(0, 1\]"),
    ({"param_budget": -1}, "param_budget must be"),
    ({"param_budget": 2.5}, "must be whole"),
    ({"max_kappa": float("nan")}, "max_kappa must be a number > 0"),
    ({"num_tensors": 1, "group_by": "color"}, "group_by must be"),
    ({"num_tensors": 1, "exclude": "["}, "exclude: invalid regular expression"),
])
def test_invalid_policies(table, kwargs, msg):
    with pytest.raises(ValueError, match=msg):
        table.select(**kwargs)


def test_nothing_selectable_errors(table):
    with pytest.raises(ValueError, match=r"no tensor has κ <= 0.5.*lowest κ is 1"):
        table.select(max_kappa=0.5)
    with pytest.raises(ValueError, match="smaller than the smallest eligible tensor"):
        table.select(param_budget=10)
    # 27 of 550 parameters per layer hold no tensor: the budget is filled round-robin over the layers (issue 21)
    assert table.select(param_budget=0.05, group_by="layer") == ["model.layers.0.self_attn.v_proj.weight",
                                                                  "model.layers.1.self_attn.v_proj.weight"]
    with pytest.raises(ValueError, match="smaller than the smallest eligible tensor"):
        table.select(param_budget=10, group_by="layer")
    with pytest.raises(ValueError, match="none of the 12 tensors.*include"):
        table.select(num_tensors=1, include="does_not_exist")
    with pytest.raises(ValueError, match="analysed no tensor"):
        KappaTable([]).select(num_tensors=1)


def test_inf_kappa_is_selected_last():
    t = KappaTable([entry("a", math.inf), entry("b", 3.0), entry("c", 2.0)])
    assert t.names == ["c", "b", "a"]
    assert t.select(num_tensors=2) == ["c", "b"]


def test_freeze_all_but_and_restore():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    model[1].bias.requires_grad_(False)
    handle = kappatune.freeze_all_but(model, ["0.weight"])
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {"0.weight"}
    handle.restore()
    assert {n: p.requires_grad for n, p in model.named_parameters()} == {
        "0.weight": True, "0.bias": True, "1.weight": True, "1.bias": False}
    with kappatune.freeze_all_but(model, ["1.bias"]):
        assert [n for n, p in model.named_parameters() if p.requires_grad] == ["1.bias"]
    assert model[0].weight.requires_grad


def test_freeze_unknown_name_changes_nothing():
    model = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(ValueError, match=r"not parameters of Sequential.*did you mean '0.weight'"):
        kappatune.freeze_all_but(model, ["0.weigth"])
    assert all(p.requires_grad for p in model.parameters())


def test_freeze_accepts_tied_alias():
    emb = nn.Embedding(10, 4)
    head = nn.Linear(4, 10, bias=False)
    head.weight = emb.weight
    model = nn.ModuleDict({"emb": emb, "head": head})
    kappatune.freeze_all_but(model, ["head.weight"])
    assert emb.weight.requires_grad


# -- scores: an SNR table ranks highest first -------------------------------------------------------
def snr_entry(name, snr, numel=100):
    return KappaEntry(name=name, kappa=math.nan, shape=(numel // 10, 10), numel=numel, dtype="float32", snr=snr,
                      score="snr")


@pytest.fixture
def snr_table():
    es = []
    for layer in range(4):
        es += [snr_entry(f"model.layers.{layer}.self_attn.q_proj.weight", 1.0 + layer, 100),
               snr_entry(f"model.layers.{layer}.self_attn.v_proj.weight", 10.0 + layer, 50),
               snr_entry(f"model.layers.{layer}.mlp.up_proj.weight", 0.1 * (layer + 1), 400)]
    return KappaTable(es)


def test_an_snr_table_is_ordered_and_selected_highest_first(snr_table):
    t = snr_table
    assert t.score.name == "snr" and t.score.higher_first and kappatune.table.SCORES["kappa"].higher_first is False
    vals = [e.snr for e in t]
    assert vals == sorted(vals, reverse=True) and t.names[0] == "model.layers.3.self_attn.v_proj.weight"
    assert list(t.values.values()) == vals and all(math.isnan(k) for k in t.kappas.values())
    assert float(t[0]) == 13.0                                   # an entry's value is its score
    assert t.select(num_tensors=2) == ["model.layers.3.self_attn.v_proj.weight",
                                       "model.layers.2.self_attn.v_proj.weight"]
    # Spectrum's rule: the highest-SNR share of each kind, best first overall
    sel = t.select(top_fraction=0.25, group_by="kind")
    assert sel == ["model.layers.3.self_attn.v_proj.weight", "model.layers.3.self_attn.q_proj.weight",
                   "model.layers.3.mlp.up_proj.weight"]
    sel = t.select(top_fraction=0.5, group_by="kind")
    assert sorted(sel) == sorted(f"model.layers.{i}.{k}" for i in (2, 3) for k in
                                 ("self_attn.v_proj.weight", "self_attn.q_proj.weight", "mlp.up_proj.weight"))
    assert t.select(param_budget=200) == [f"model.layers.{i}.self_attn.v_proj.weight" for i in (3, 2, 1, 0)]
    with pytest.raises(ValueError, match=r"max_kappa= is a κ threshold, but this table holds SNR"):
        t.select(max_kappa=10.0)
    # a higher SNR of +inf ranks first, an unknown (NaN) last
    u = KappaTable([snr_entry("a", 2.0), snr_entry("b", math.inf), snr_entry("c", math.nan), snr_entry("d", 0.0)])
    assert u.names == ["b", "a", "d", "c"]
    assert "SNR" in repr(u) and "highest first" in repr(u) and "snr" in u.format().splitlines()[0]


def test_a_table_holds_one_score_and_keeps_it(snr_table):
    with pytest.raises(ValueError, match="a table holds one score"):
        KappaTable([entry("a", 2.0), snr_entry("b", 1.0)])
    with pytest.raises(ValueError, match="a table holds one score"):
        KappaTable([entry("a", 2.0)], score="snr")
    with pytest.raises(ValueError, match="score must be one of"):
        snr_entry("a", 1.0).__class__(name="a", kappa=1.0, shape=(2, 2), numel=4, dtype="f", score="rank")
    back = KappaTable.from_dict(snr_table.to_dict())
    assert back.score.name == "snr" and back.names == snr_table.names and back.to_dict() == snr_table.to_dict()
    assert snr_table.subset(snr_table.names[:2]).score.name == "snr"
    assert KappaTable([], score="snr").score.name == "snr" and KappaTable([]).score.name == "kappa"
    # a κ table and its entries serialise exactly as before the scores existed
    k = KappaTable([entry("a", 2.0)])
    assert set(k.to_dict()) == {"entries", "skipped"} and "score" not in k.to_dict()["entries"][0]
    assert "snr" not in k.to_dict()["entries"][0]


# -- a parameter budget over groups: shares, then the rest round-robin ------------------------------
def test_grouped_budget_below_one_tensor_per_share_is_filled_round_robin():
    es = []
    for kind, base in (("a_proj", 1.0), ("b_proj", 2.0), ("c_proj", 3.0)):
        es += [entry(f"model.layers.{i}.{kind}.weight", base + 10 * i, 100) for i in range(4)]
    t = KappaTable(es)        # 12 tensors of 100: each kind's share of 250 is 83, below one tensor
    # round 1: the kinds in the order of their best tensor (κ 1, 2, 3) each add it while it fits
    assert t.select(param_budget=250, group_by="kind") == ["model.layers.0.a_proj.weight",
                                                            "model.layers.0.b_proj.weight"]
    assert t.select(param_budget=300, group_by="kind") == ["model.layers.0.a_proj.weight",
                                                            "model.layers.0.b_proj.weight",
                                                            "model.layers.0.c_proj.weight"]
    # a fraction: 0.1 of 1200 = 120, one tensor (the best overall), not "nothing selectable"
    assert t.select(param_budget=0.1, group_by="kind") == ["model.layers.0.a_proj.weight"]
    # the same rule for an SNR table: each kind offers its highest-SNR tensor in turn
    s = KappaTable([snr_entry(e.name, e.kappa, e.numel) for e in es])   # best SNR: layer 3, c_proj first
    assert s.select(param_budget=250, group_by="kind") == ["model.layers.3.c_proj.weight",
                                                            "model.layers.3.b_proj.weight"]
    # a budget below every tensor still says why
    with pytest.raises(ValueError, match="smaller than the smallest eligible tensor"):
        t.select(param_budget=99, group_by="kind")


def test_grouped_budget_fills_what_the_shares_leave(table):
    # shares of 1300: q_proj 236 (2 × 100), v_proj 118 (2 × 50), up_proj 945 (2 × 400): 1100 used;
    # the 200 left go round-robin: up_proj's next (400) no longer fits, v_proj 2 and q_proj 2, then v_proj 3
    sel = table.select(param_budget=1300, group_by="kind")
    want = {f"model.layers.{i}.mlp.up_proj.weight" for i in (0, 1)} | \
        {f"model.layers.{i}.self_attn.v_proj.weight" for i in range(4)} | \
        {f"model.layers.{i}.self_attn.q_proj.weight" for i in (0, 1, 2)}
    assert set(sel) == want and len(sel) == len(want)
    assert sum(table[n].numel for n in sel) == 1300
    assert [table[n].kappa for n in sel] == sorted(table[n].kappa for n in sel)      # best first
    # never above the budget, and each kind's tensors are a best-first prefix of that kind
    for b in (60, 150, 333, 777, 1234, 2199):
        for gb in ("kind", "layer"):
            got = table.select(param_budget=b, group_by=gb)
            assert sum(table[n].numel for n in got) <= b
    for b in (150, 777, 1234):
        got = table.select(param_budget=b, group_by="kind")
        for kind in ("q_proj", "v_proj", "up_proj"):
            of_kind = [n for n in table.names if module_kind(n) == kind]
            took = [n for n in got if module_kind(n) == kind]
            assert took == of_kind[:len(took)]


def test_saved_entries_read_as_the_old_readers_did():
    """Saved scans store κ = ∞ as "inf"; other spellings float() reads are still read."""
    base = {"name": "w", "shape": [2, 2], "numel": 4, "dtype": "float32"}
    assert KappaEntry.from_dict({**base, "kappa": "inf"}).kappa == math.inf
    assert KappaEntry.from_dict({**base, "kappa": "Infinity"}).kappa == math.inf
    assert KappaEntry.from_dict({**base, "kappa": "1.5"}).kappa == 1.5
    assert math.isnan(KappaEntry.from_dict({**base, "kappa": "NaN"}).kappa)
    assert KappaEntry("w", math.inf, (2, 2), 4, "float32").to_dict()["kappa"] == "inf"   # strict JSON
    with pytest.raises(ValueError):
        KappaEntry.from_dict({**base, "kappa": True})


def test_the_table_does_not_load_the_selection_rules_until_asked():
    import subprocess
    import sys

    code = ("import sys, kappatune.pipeline, kappatune.table; "
            "assert 'kappatune.selection' not in sys.modules, 'the scan loaded the selection rules'")
    subprocess.run([sys.executable, "-c", code], check=True)
