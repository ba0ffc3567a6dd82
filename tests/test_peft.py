"""The PEFT bridge: same output as PEFT's own KappaTune selector, LoRA on the lowest-κ targets."""

import logging
import math

import pytest
import torch
from torch import nn

import kappatune
from kappatune.cache import KappaCache

from .conftest import make_tiny_llama

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
from peft.helpers import KappaTuneSelector  # noqa: E402
from peft.helpers import find_kappa_target_modules as peft_find  # noqa: E402

from kappatune.integrations.peft import (  # noqa: E402
    find_kappa_target_modules,
    get_kappa_lora_config,
    get_kappatune_lora_model,
    kappa_lora_targets,
)


def matrix_with_kappa(m, n, kappa, g):
    """A random m×n matrix whose singular values run geometrically from 1 down to 1/kappa."""
    k = min(m, n)
    u, _ = torch.linalg.qr(torch.randn(m, k, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64))
    s = torch.logspace(0, -math.log10(kappa), k, dtype=torch.float64)
    return (u * s) @ v.T


def separate_kappas(model, seed=0, lo=0.3, hi=3.5):
    """Give every LoRA candidate (Linear weight, 3-D expert stack) a known κ, spread over decades in a
    shuffled order, so float32 (PEFT) and exact κ rank them identically. Returns {target: κ}."""
    g = torch.Generator().manual_seed(seed)
    items = [(n, m.weight) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    items += [(n, p) for n, p in model.named_parameters() if p.dim() == 3]
    kappas = torch.logspace(lo, hi, len(items), dtype=torch.float64)[torch.randperm(len(items), generator=g)]
    want = {}
    with torch.no_grad():
        for (name, w), k in zip(items, kappas.tolist()):
            if w.dim() == 3:
                w.copy_(torch.stack([matrix_with_kappa(w.shape[1], w.shape[2], k, g) for _ in range(w.shape[0])]))
            else:
                w.copy_(matrix_with_kappa(w.shape[0], w.shape[1], k, g))
            want[name] = k
    return want


def make_tiny_qwen3_moe(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.Qwen3MoeConfig(
        hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_experts=4, num_experts_per_tok=2,
        vocab_size=64, max_position_embeddings=64, tie_word_embeddings=False,
    )
    return transformers.Qwen3MoeForCausalLM(cfg)


def lora_sites(peft_model):
    """(module path, parameter) of every LoRA adapter placed by PEFT (parameter None for a module)."""
    from peft.tuners.lora import LoraLayer, ParamWrapper

    prefix = "base_model.model."
    sites = set()
    for name, mod in peft_model.named_modules():
        if isinstance(mod, ParamWrapper):
            owner = name[len(prefix):]
            while owner.endswith(".base_layer"):
                owner = owner[: -len(".base_layer")]
            sites.add(f"{owner}.{mod.parameter_name}")
        elif isinstance(mod, LoraLayer):
            sites.add(name[len(prefix):])
    return sites


@pytest.fixture(scope="module")
def llama():
    model = make_tiny_llama(seed=1)
    return model, separate_kappas(model, seed=1)


@pytest.fixture(scope="module")
def moe():
    model = make_tiny_qwen3_moe(seed=2)
    return model, separate_kappas(model, seed=2)


# -- same output as PEFT ------------------------------------------------------------------
@pytest.mark.parametrize("top_p", [0.2, 0.5, 1.0])
def test_same_output_as_peft_llama(llama, top_p):
    model, _ = llama
    ours = find_kappa_target_modules(model, top_p, 16384, None, False)  # PEFT's positional order
    theirs = peft_find(model, top_p=top_p, show_progress=False)
    assert ours == theirs
    assert ours["target_parameters"] is None and len(ours["target_modules"]) == max(1, int(15 * top_p))


def test_same_policies_as_peft_selector(llama):
    model, want = llama
    sel = KappaTuneSelector(model, show_progress=False)
    ks = sorted(want.values())
    thr = math.sqrt(ks[4] * ks[5])
    for kw in (dict(num_modules=4), dict(num_modules=100), dict(threshold=thr)):
        ours = find_kappa_target_modules(model, show_progress=False, **kw)
        assert ours["target_modules"] == sel.get_best_targets(**kw), kw
    assert len(find_kappa_target_modules(model, show_progress=False, threshold=thr)["target_modules"]) == 5
    # max_dim_size_to_analyze=100 skips the MLPs (128-sided) and the 128×64 lm_head in both
    ours = find_kappa_target_modules(model, top_p=1.0, max_dim_size_to_analyze=100, show_progress=False)
    assert ours == peft_find(model, top_p=1.0, max_dim_size_to_analyze=100, show_progress=False)
    assert sorted(ours["target_modules"]) == sorted(n for n in want if ".self_attn." in n)


@pytest.mark.parametrize("top_p", [0.2, 0.5, 1.0])
def test_same_output_as_peft_qwen3_moe_and_peft_accepts_it(moe, top_p):
    model, want = moe
    ours = find_kappa_target_modules(model, top_p=top_p, show_progress=False)
    theirs = peft_find(model, top_p=top_p, show_progress=False)
    assert ours == theirs
    experts = [n for n in want if n.endswith(("gate_up_proj", "down_proj")) and ".experts." in n]
    assert len(experts) == 4 and set(ours["target_parameters"]) <= set(experts)
    assert ours["target_parameters"] == sorted(ours["target_parameters"], key=want.get)  # lowest κ first
    if top_p == 0.5:
        import copy

        config = peft.LoraConfig(r=2, **ours)
        pm = peft.get_peft_model(copy.deepcopy(model), config)
        assert lora_sites(pm) == set(ours["target_modules"]) | set(ours["target_parameters"])


# -- the original one-liners ------------------------------------------------------------------
def test_kappatune_lora_model_adapts_exactly_the_lowest_kappa_modules(llama):
    import copy

    model, want = llama
    targets = kappa_lora_targets(model, show_progress=False)
    assert [t.name for t in targets] == sorted(want, key=want.get)  # κ order
    weights = {n: m.weight for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    for t in targets:  # exact κ of the stored (float32) weight
        s = torch.linalg.svdvals(weights[t.name].detach().double())
        assert t.kappa == pytest.approx(float(s[0] / s[-1]), rel=1e-9)
        assert t.kappa == pytest.approx(want[t.name], rel=1e-4)

    k = 5
    pm = get_kappatune_lora_model(copy.deepcopy(model), num_modules_to_adapt=k, lora_rank=4, show_progress=False)
    lowest = set(sorted(want, key=want.get)[:k])
    assert lora_sites(pm) == lowest
    trainable = {n: p for n, p in pm.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n for n in trainable)
    mods = dict(model.named_modules())
    expected = sum(4 * (mods[m].in_features + mods[m].out_features) for m in lowest)
    assert sum(p.numel() for p in trainable.values()) == expected


def test_lora_config_budget_ranks_modules_and_experts_together(moe):
    model, want = moe
    config = get_kappa_lora_config(model, num_modules_to_adapt=7, lora_rank=8, lora_alpha=16, lora_dropout=0.0,
                                   show_progress=False, bias="none")
    lowest = sorted(want, key=want.get)[:7]
    mods = {n for n in lowest if ".experts." not in n}
    params = [n for n in lowest if ".experts." in n]
    assert params, "the seed should put an expert stack among the 7 lowest"
    assert set(config.target_modules) == mods
    assert config.target_parameters == params
    assert (config.r, config.lora_alpha, config.lora_dropout, config.bias) == (8, 16, 0.0, "none")
    assert str(config.task_type.value if hasattr(config.task_type, "value") else config.task_type) == "CAUSAL_LM"
    # an explicit target_modules bypasses the κ selection, as in the original
    manual = get_kappa_lora_config(model, target_modules=["q_proj"], show_progress=False)
    assert manual.target_modules == {"q_proj"}


class Inner(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(8, 8)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(8, 8)
        self.inner = Inner()

    def forward(self, x):
        return self.inner.proj(self.proj(x))


def test_exact_names_when_a_list_entry_would_also_match_another_module(caplog):
    import copy

    net = Net()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        net.proj.weight.copy_(matrix_with_kappa(8, 8, 2.0, g))
        net.inner.proj.weight.copy_(matrix_with_kappa(8, 8, 500.0, g))
    # PEFT's list matching would put LoRA on both "proj" and "inner.proj"
    plain = peft.get_peft_model(copy.deepcopy(net), peft.LoraConfig(r=2, target_modules=["proj"]))
    assert lora_sites(plain) == {"proj", "inner.proj"}
    with caplog.at_level(logging.WARNING, logger="kappatune.integrations.peft"):
        found = find_kappa_target_modules(net, num_modules=1, show_progress=False)
    assert found["target_modules"] == ["proj"] and "inner.proj" in caplog.text
    config = get_kappa_lora_config(net, num_modules_to_adapt=1, lora_rank=2, task_type=None, show_progress=False)
    assert isinstance(config.target_modules, str)
    assert lora_sites(peft.get_peft_model(copy.deepcopy(net), config)) == {"proj"}


# -- kappatune options ------------------------------------------------------------------------
def test_one_scan_serves_full_weight_and_adapter_selection(llama, tmp_path):
    model, _ = llama
    table = kappatune.scan(model, cache=tmp_path, progress=False)  # a full-weight experiment's scan
    cache = KappaCache(tmp_path)
    ours = find_kappa_target_modules(model, top_p=0.5, show_progress=False, cache=cache)
    assert cache.misses == 0 and cache.hits == 15  # every κ from the full-weight scan's cache
    assert find_kappa_target_modules(model, top_p=0.5, show_progress=False, table=table) == ours
    assert ours == peft_find(model, top_p=0.5, show_progress=False)
    with pytest.raises(ValueError, match="another model"):
        find_kappa_target_modules(Net(), table=table, show_progress=False)


def test_param_budget_and_filters(moe):
    model, want = moe
    targets = kappa_lora_targets(model, show_progress=False)
    total = sum(t.numel for t in targets)
    found = find_kappa_target_modules(model, param_budget=0.3, show_progress=False)
    chosen, used = [], 0
    for t in targets:  # walk from the lowest κ, keep what fits, modules and experts together
        if used + t.numel <= 0.3 * total:
            chosen.append(t.name)
            used += t.numel
    assert found["target_modules"] == [n for n in chosen if n in dict(model.named_modules())]
    assert (found["target_parameters"] or []) == [n for n in chosen if ".experts." in n]
    only_attn = find_kappa_target_modules(model, top_p=1.0, include=r"self_attn", show_progress=False)
    assert only_attn["target_parameters"] is None and len(only_attn["target_modules"]) == 8
    no_experts = find_kappa_target_modules(model, top_p=1.0, exclude=r"\.experts\.", show_progress=False)
    assert no_experts["target_parameters"] is None and len(no_experts["target_modules"]) == 9


def test_conv1d_layers_are_candidates():
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64, n_positions=32)
    model = transformers.GPT2LMHeadModel(cfg)
    names = [t.name for t in kappa_lora_targets(model, show_progress=False)]
    assert {"transformer.h.0.attn.c_attn", "transformer.h.0.mlp.c_fc"} <= set(names)
    pm = get_kappatune_lora_model(model, num_modules_to_adapt=2, lora_rank=2, show_progress=False)
    assert lora_sites(pm) == set(names[:2])


@pytest.mark.parametrize("kwargs, match", [
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(num_modules=0), "num_modules"),
    (dict(num_modules=3, threshold=10.0), "at most one"),
    (dict(top_p=2.0, num_modules=3), "top_p"),                 # checked even where another policy overrides it
    (dict(threshold=-1.0), "threshold"),
    (dict(param_budget=0.0), "param_budget"),
    (dict(max_dim_size_to_analyze=0), "max_dim_size_to_analyze"),
    (dict(moe_param_suffixes=("",)), "moe_param_suffixes"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        find_kappa_target_modules(Net(), show_progress=False, **kwargs)


def test_bad_one_liner_arguments():
    with pytest.raises(ValueError, match="num_modules_to_adapt"):
        get_kappa_lora_config(Net(), num_modules_to_adapt=0)
    with pytest.raises(ValueError, match="no LoRA target"):
        get_kappa_lora_config(Net(), exclude="proj", show_progress=False)


# -- QLoRA: a 4-bit base ------------------------------------------------------------------------
def test_qlora_4bit_base(tmp_path):
    pytest.importorskip("bitsandbytes")
    base = make_tiny_llama(seed=4)
    separate_kappas(base, seed=4, lo=0.2, hi=1.6)  # moderate κ: 4-bit rounding keeps them apart
    base.save_pretrained(tmp_path / "ckpt")
    q = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "ckpt", dtype=torch.float32,
        quantization_config=transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4"))
    ours = find_kappa_target_modules(q, top_p=0.4, show_progress=False)
    assert ours == peft_find(q, top_p=0.4, show_progress=False)  # PEFT dequantizes too
    targets = kappa_lora_targets(q, show_progress=False)
    pm = get_kappatune_lora_model(q, num_modules_to_adapt=4, lora_rank=2, show_progress=False)
    assert lora_sites(pm) == {t.name for t in targets[:4]}
    assert any(type(m).__name__ == "Linear4bit" for m in pm.modules())
    pm.train()
    x = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(0))
    lora_b = {n: p.detach().clone() for n, p in pm.named_parameters() if "lora_B" in n}
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-2)
    pm(input_ids=x, labels=x).loss.backward()
    opt.step()
    assert all(not torch.equal(p, lora_b[n]) for n, p in pm.named_parameters() if n in lora_b)
