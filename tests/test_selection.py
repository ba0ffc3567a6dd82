import logging
import math

import pytest
from torch import nn

import kappatune
from kappatune.selection import KappaEntry, KappaTable, layer_index, module_kind


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
    with pytest.raises(ValueError, match="within each group"):
        table.select(param_budget=0.05, group_by="layer")   # 27 of 550 per layer: no tensor fits
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
