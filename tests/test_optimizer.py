"""KappaTuneOptimizer: selection, freezing, exact delegation, checkpoints, the torch Optimizer protocol."""

import copy
import functools
import io
import math
import pickle
import sys
import warnings

import pytest
import torch
from torch import nn

import kappatune
from kappatune import KappaTuneOptimizer
from kappatune.compat import SelectiveFineTuningOptimizer
from kappatune.optimizer import STATE_KEY
from torch.optim.optimizer import register_optimizer_step_post_hook

from .conftest import make_tiny_llama

VOCAB = 128


def _batches(n, seed=0, batch=2, seq=16):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (batch, seq), generator=g) for _ in range(n)]


def _loss(model, x):
    return model(input_ids=x, labels=x).loss


def _snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _opt(model, **kw):
    kw.setdefault("cache", None)
    kw.setdefault("progress", False)
    return KappaTuneOptimizer(model, **kw)


def _bare(model, names, cls=torch.optim.AdamW, **kw):
    """The reference: freeze by hand and build the inner optimizer over the same tensors, same order."""
    kappatune.freeze_all_but(model, names)
    named = dict(model.named_parameters())
    return cls([named[n] for n in names], **kw)


def _train(model, opt, batches, sched=None):
    for x in batches:
        _loss(model, x).backward()
        opt.step()
        if sched is not None:
            sched.step()
        opt.zero_grad()


def _assert_same_params(a, b):
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(p, q), n


# -- construction and arguments ----------------------------------------------------------------
def test_requires_exactly_one_policy_or_names(tiny_llama):
    with pytest.raises(ValueError, match="num_tensors=, top_fraction=, param_budget=, max_kappa=.*names="):
        _opt(tiny_llama)
    with pytest.raises(ValueError, match="got num_tensors, top_fraction"):
        _opt(tiny_llama, num_tensors=2, top_fraction=0.1)
    with pytest.raises(ValueError, match="names= is an explicit selection"):
        _opt(tiny_llama, names=["lm_head.weight"], num_tensors=2)
    with pytest.raises(ValueError, match="top_fraction must be in"):
        _opt(tiny_llama, top_fraction=1.5)
    assert all(p.requires_grad for p in tiny_llama.parameters())  # nothing was frozen by a failed call


def test_is_an_optimizer_sharing_the_inner_objects(tiny_llama):
    opt = _opt(tiny_llama, top_fraction=0.25, lr=1e-3)
    assert isinstance(opt, torch.optim.Optimizer)
    assert opt.param_groups is opt.inner.param_groups
    assert opt.state is opt.inner.state
    assert opt.defaults is opt.inner.defaults
    _train(tiny_llama, opt, _batches(1))
    assert len(opt.state) == len(opt.selected)  # the inner's state, seen through the wrapper
    opt.param_groups[0]["lr"] = 0.5  # a write through the wrapper is the inner's
    assert opt.inner.param_groups[0]["lr"] == 0.5


def test_selection_is_lowest_kappa_first_and_only_it_trains(tiny_llama):
    table = kappatune.scan(tiny_llama, cache=False, progress=False)
    opt = _opt(tiny_llama, top_fraction=0.25, lr=1e-3)
    assert opt.selected == table.select(top_fraction=0.25)
    ks = [opt.table[n].kappa for n in opt.selected]
    assert ks == sorted(ks) and len(opt.table) == len(table)
    trainable = {n for n, p in tiny_llama.named_parameters() if p.requires_grad}
    assert trainable == set(opt.selected)
    s = opt.summary()
    trained = sum(p.numel() for n, p in tiny_llama.named_parameters() if n in trainable)
    total = sum(p.numel() for p in tiny_llama.parameters())
    assert "\n" not in s and f"{trained:,} of {total:,} parameters ({100 * trained / total:.2f}%)" in s
    r = repr(opt)
    assert r.startswith(f"KappaTuneOptimizer({len(opt.selected)}/") and "AdamW (" in r and "lr: 0.001" in r


# -- bit-for-bit: frozen tensors untouched, same math as the bare inner optimizer ---------------
def test_adamw_weight_decay_frozen_bit_for_bit_selected_changed():
    model, ref = make_tiny_llama(seed=0), make_tiny_llama(seed=0)
    before = _snapshot(model)
    opt = _opt(model, param_budget=0.2, lr=1e-2, weight_decay=0.1)
    bare = _bare(ref, opt.selected, lr=1e-2, weight_decay=0.1)
    batches = _batches(4)
    _train(model, opt, batches)
    _train(ref, bare, batches)
    sel = set(opt.selected)
    for n, p in model.named_parameters():
        if n in sel:
            assert not torch.equal(p, before[n]), f"selected {n} did not change"
        else:
            assert torch.equal(p, before[n]), f"frozen {n} changed"
    _assert_same_params(model, ref)  # the wrapper adds nothing to the inner optimizer's math


@pytest.mark.parametrize("fused", [False, True])
def test_autocast_gradscaler_clipping_accumulation_bit_for_bit(fused):
    """bf16 autocast + GradScaler (unscale_ + clip + step) + 2-step accumulation, vs the bare inner.

    With ``fused=True`` AdamW unscales inside its kernel: GradScaler hands it ``grad_scale`` /
    ``found_inf`` through the wrapper (a lost or doubled unscale would change every value).
    """
    model, ref = make_tiny_llama(seed=1), make_tiny_llama(seed=1)
    before = _snapshot(model)
    opt = _opt(model, num_tensors=4, lr=1e-2, weight_decay=0.1, fused=fused)
    bare = _bare(ref, opt.selected, lr=1e-2, weight_decay=0.1, fused=fused)
    assert opt._step_supports_amp_scaling is fused
    batches = _batches(6, seed=3)
    for m, o in ((model, opt), (ref, bare)):
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
        for i, x in enumerate(batches):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = _loss(m, x) / 2
            scaler.scale(loss).backward()
            if i % 2 == 1:
                scaler.unscale_(o)
                torch.nn.utils.clip_grad_norm_(m.parameters(), 0.5)
                scaler.step(o)
                scaler.update()
                o.zero_grad()
        assert not hasattr(o, "grad_scale") and not hasattr(opt.inner, "grad_scale")
    assert opt.state[next(iter(opt.state))]["step"].item() == 3
    sel = set(opt.selected)
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]) != (n in sel), n
    _assert_same_params(model, ref)


@pytest.mark.parametrize("fused", [False, True])
def test_gradscaler_skips_the_step_on_inf(fused):
    model = make_tiny_llama(seed=2)
    opt = _opt(model, num_tensors=3, lr=1e-2, fused=fused)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
    x = _batches(1)[0]
    scaler.scale(_loss(model, x)).backward()
    scaler.step(opt)
    scaler.update()
    opt.zero_grad()
    after_one = _snapshot(model)
    steps = {id(p): s["step"].item() for p, s in opt.state.items()}
    scaler.scale(_loss(model, x)).backward()
    opt.param_groups[0]["params"][0].grad[0, 0] = float("inf")
    scaler.step(opt)
    scaler.update()
    assert scaler.get_scale() == 2.0 ** 7  # halved: the inf was seen
    for n, p in model.named_parameters():
        assert torch.equal(p, after_one[n]), f"{n} changed in a step that had to be skipped"
    assert {id(p): s["step"].item() for p, s in opt.state.items()} == steps


# -- checkpoints -------------------------------------------------------------------------------
def _roundtrip(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def test_resume_from_state_dict_is_bit_for_bit(tmp_path):
    batches = _batches(6, seed=5)
    cache = kappatune.KappaCache(tmp_path / "cache")

    def make(model, **kw):
        opt = KappaTuneOptimizer(model, torch.optim.AdamW, lr=1e-2, weight_decay=0.1, progress=False, **kw)
        return opt, torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=6)

    full = make_tiny_llama(seed=4)
    opt, sched = make(full, param_budget=0.2, cache=cache)
    _train(full, opt, batches, sched)

    part = make_tiny_llama(seed=4)
    opt_a, sched_a = make(part, param_budget=0.2, cache=cache)
    _train(part, opt_a, batches[:3], sched_a)
    ckpt = _roundtrip({"model": part.state_dict(), "opt": opt_a.state_dict(), "sched": sched_a.state_dict()})
    rec = ckpt["opt"][STATE_KEY]
    assert rec["groups"] == [opt_a.selected] and set(rec["kappas"]) == set(opt_a.selected)
    cache.path.unlink()  # the cache is gone

    # (1) rebuilt from the state dict alone: no scan, the saved tensors
    m1 = make_tiny_llama(seed=99)
    m1.load_state_dict(ckpt["model"])
    o1 = KappaTuneOptimizer.from_state_dict(m1, ckpt["opt"], torch.optim.AdamW, lr=1e-2, weight_decay=0.1)
    s1 = torch.optim.lr_scheduler.CosineAnnealingLR(o1, T_max=6)
    ckpt = _roundtrip(ckpt)  # o1 now owns (and will update in place) the state tensors of the first copy
    o1.load_state_dict(ckpt["opt"])  # the usual torch order: scheduler first, then the optimizer state
    s1.load_state_dict(ckpt["sched"])
    # (2) built with another selection, then load_state_dict: the saved selection wins
    m2 = make_tiny_llama(seed=99)
    m2.load_state_dict(ckpt["model"])
    others = [n for n, p in m2.named_parameters() if p.ndim == 2 and n not in opt_a.selected][:2]
    o2, s2 = make(m2, names=others, cache=None)
    o2.load_state_dict(_roundtrip(ckpt["opt"]))
    s2.load_state_dict(ckpt["sched"])
    assert {n for n, p in m2.named_parameters() if p.requires_grad} == set(opt_a.selected)
    for m, o, s in ((m1, o1, s1), (m2, o2, s2)):
        assert o.selected == opt_a.selected
        _train(m, o, batches[3:], s)
        _assert_same_params(m, full)


def test_load_refuses_a_selection_that_does_not_match_the_model():
    src = make_tiny_llama(seed=0, layers=3)
    opt = _opt(src, names=["model.layers.2.mlp.up_proj.weight", "model.layers.0.mlp.up_proj.weight"])
    sd = _roundtrip(opt.state_dict())
    dst = make_tiny_llama(seed=0, layers=2)
    target = _opt(dst, num_tensors=2)
    flags = {n: p.requires_grad for n, p in dst.named_parameters()}
    with pytest.raises(ValueError, match=r"does not match LlamaForCausalLM: 'model.layers.2.mlp.up_proj.weight' is "
                                         r"not a parameter of the model"):
        target.load_state_dict(sd)
    with pytest.raises(ValueError, match="is not a parameter of the model"):
        KappaTuneOptimizer.from_state_dict(dst, sd)
    wide = make_tiny_llama(seed=0, layers=3, hidden=32)
    with pytest.raises(ValueError, match=r"has shape \(128, 64\) in the state dict but \(64, 32\) in the model"):
        _opt(wide, num_tensors=2).load_state_dict(sd)
    assert {n: p.requires_grad for n, p in dst.named_parameters()} == flags  # refused before any change
    with pytest.raises(ValueError, match="no 'kappatune' selection record"):
        KappaTuneOptimizer.from_state_dict(dst, {"state": {}, "param_groups": []})


def test_add_param_group_trains_a_model_tensor_and_is_checkpointed(tiny_llama):
    opt = _opt(tiny_llama, num_tensors=2, lr=1e-3)
    norm = tiny_llama.model.norm.weight
    assert not norm.requires_grad
    opt.add_param_group({"params": [norm], "lr": 1e-2, "weight_decay": 0.0})
    assert norm.requires_grad and opt.selected[-1] == "model.norm.weight"
    before = norm.detach().clone()
    _train(tiny_llama, opt, _batches(1))
    assert not torch.equal(norm, before)
    with pytest.raises(ValueError, match="is not a parameter of LlamaForCausalLM"):
        opt.add_param_group({"params": [nn.Parameter(torch.zeros(3))]})
    sd = _roundtrip(opt.state_dict())
    assert sd[STATE_KEY]["groups"][1] == ["model.norm.weight"]
    again = KappaTuneOptimizer.from_state_dict(tiny_llama, sd)
    assert again.selected == opt.selected and again.param_groups[1]["lr"] == 1e-2


# -- the optimizer protocol ---------------------------------------------------------------------
def test_step_returns_the_closure_loss_and_zero_grad(tiny_llama):
    opt = _opt(tiny_llama, num_tensors=2, optimizer=torch.optim.SGD, lr=0.1)
    x = _batches(1)[0]

    def closure():
        opt.zero_grad()
        loss = _loss(tiny_llama, x)
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert isinstance(loss, torch.Tensor) and loss.ndim == 0
    ps = [p for g in opt.param_groups for p in g["params"]]
    assert all(p.grad is not None for p in ps)
    opt.zero_grad(set_to_none=False)
    assert all(p.grad is not None and not p.grad.any() for p in ps)
    opt.zero_grad()
    assert all(p.grad is None for p in ps)


def test_every_scheduler_reaches_the_inner_optimizer_without_false_warnings(tiny_llama):
    lr_sched = torch.optim.lr_scheduler
    makers = {
        "StepLR": lambda o: lr_sched.StepLR(o, step_size=1, gamma=0.5),
        "CosineAnnealingLR": lambda o: lr_sched.CosineAnnealingLR(o, T_max=4),
        "LambdaLR": lambda o: lr_sched.LambdaLR(o, lambda s: 1.0 / (s + 1)),
        "OneCycleLR": lambda o: lr_sched.OneCycleLR(o, max_lr=0.1, total_steps=4),
        "SequentialLR": lambda o: lr_sched.SequentialLR(
            o, [lr_sched.LinearLR(o, start_factor=0.5, total_iters=2), lr_sched.ExponentialLR(o, gamma=0.9)],
            milestones=[2]),
    }
    x = _batches(1)[0]
    for name, make in makers.items():
        opt = _opt(tiny_llama, num_tensors=2, optimizer=torch.optim.SGD, lr=0.1, momentum=0.9)
        sched = make(opt)
        p = opt.param_groups[0]["params"][0]
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # e.g. "lr_scheduler.step() before optimizer.step()"
            for _ in range(3):
                _loss(tiny_llama, x).backward()
                opt.step()
                sched.step()
                opt.zero_grad()
        lr = sched.get_last_lr()[0]
        assert opt.inner.param_groups[0]["lr"] == lr, name
        # the scheduled LR is the one the inner optimizer uses: p ← p − lr · buf (SGD with momentum)
        _loss(tiny_llama, x).backward()
        momentum = opt.inner.param_groups[0]["momentum"]  # OneCycleLR cycles it too
        buf = opt.inner.state[p]["momentum_buffer"].clone().mul_(momentum).add_(p.grad)
        expected = p.detach().clone().add_(buf, alpha=-lr)
        opt.step()
        assert torch.equal(p, expected), name
        opt.zero_grad()


def test_step_hooks_fire_once_with_the_right_optimizer(tiny_llama):
    opt = _opt(tiny_llama, num_tensors=2, lr=1e-3)
    calls = []
    opt.register_step_pre_hook(lambda o, a, k: calls.append(("pre", o)))
    opt.register_step_post_hook(lambda o, a, k: calls.append(("post", o)))
    opt.inner.register_step_post_hook(lambda o, a, k: calls.append(("inner", o)))
    handle = register_optimizer_step_post_hook(lambda o, a, k: calls.append(("global", o)))
    try:
        _train(tiny_llama, opt, _batches(2))
    finally:
        handle.remove()
    assert [c[0] for c in calls] == ["pre", "inner", "global", "post"] * 2
    assert all(o is opt for k, o in calls if k in ("pre", "post"))
    assert all(o is opt.inner for k, o in calls if k in ("inner", "global"))


def test_state_dict_hooks_of_the_wrapper_fire(tiny_llama):
    opt = _opt(tiny_llama, num_tensors=2)
    seen = []
    opt.register_state_dict_post_hook(lambda o, sd: seen.append(STATE_KEY in sd))
    opt.register_load_state_dict_post_hook(lambda o: seen.append("loaded"))
    opt.load_state_dict(opt.state_dict())
    assert seen == [True, "loaded"]


def test_any_optimizer_and_its_own_errors(tiny_llama):
    x = _batches(1)[0]
    sgd = _opt(tiny_llama, num_tensors=2, optimizer=functools.partial(torch.optim.SGD, momentum=0.9), lr=0.1)
    assert type(sgd.inner) is torch.optim.SGD and sgd.defaults["momentum"] == 0.9
    _train(tiny_llama, sgd, [x])
    flags = [p.requires_grad for p in tiny_llama.parameters()]
    with pytest.raises(ValueError, match="Invalid learning rate: -1"):
        _opt(tiny_llama, num_tensors=2, lr=-1)
    with pytest.raises(TypeError, match="unexpected keyword argument 'not_an_arg'"):
        _opt(tiny_llama, num_tensors=2, not_an_arg=1)
    with pytest.raises(TypeError, match="returned list, not a torch.optim.Optimizer"):
        _opt(tiny_llama, num_tensors=2, optimizer=lambda params: list(params))
    with pytest.raises(TypeError, match="got an instance of SGD"):
        _opt(tiny_llama, num_tensors=2, optimizer=sgd.inner)
    with pytest.raises(ValueError, match="does not hold exactly the 2 selected tensors"):
        _opt(tiny_llama, num_tensors=2, optimizer=lambda params: torch.optim.SGD(tiny_llama.parameters(), lr=0.1))
    assert [p.requires_grad for p in tiny_llama.parameters()] == flags  # failed constructions restore the flags


def test_third_party_optimizer_class(tiny_llama):
    bnb = pytest.importorskip("bitsandbytes")
    opt = _opt(tiny_llama, num_tensors=2, optimizer=bnb.optim.AdamW8bit, lr=1e-2, min_8bit_size=16)
    before = _snapshot(tiny_llama)
    _train(tiny_llama, opt, _batches(2))
    for n, p in tiny_llama.named_parameters():
        assert torch.equal(p, before[n]) != (n in opt.selected), n
    assert opt.state[opt.param_groups[0]["params"][0]]["state1"].dtype == torch.uint8  # its own 8-bit state
    again = KappaTuneOptimizer.from_state_dict(tiny_llama, opt.state_dict(), bnb.optim.AdamW8bit)
    assert again.selected == opt.selected and type(again.inner) is bnb.optim.AdamW8bit


def test_quantized_selection_is_refused_pointing_to_peft():
    bnb = pytest.importorskip("bitsandbytes")
    model = nn.Sequential(nn.Linear(64, 64), bnb.nn.Linear4bit(64, 64, compute_dtype=torch.float32)).to("cpu")
    assert kappatune.quant.is_quantized_param(model[1].weight)
    with pytest.raises(ValueError, match=r"'1.weight' is a bitsandbytes-quantized weight .*kappatune.integrations.peft"):
        _opt(model, names=["1.weight"])
    table = kappatune.KappaTable([kappatune.KappaEntry("1.weight", 1.0, (64, 64), 4096, "float32"),
                                  kappatune.KappaEntry("0.weight", 2.0, (64, 64), 4096, "float32")])
    with pytest.raises(ValueError, match="kappatune.integrations.peft"):
        _opt(model, table=table, num_tensors=1)
    assert _opt(model, table=table, num_tensors=1, exclude=r"^1\.").selected == ["0.weight"]


def test_names_need_no_scan_and_take_kappa_from_the_cache(tiny_llama, monkeypatch, tmp_path):
    table = kappatune.scan(tiny_llama, cache=tmp_path, progress=False)
    names = [table.names[3], table.names[0]]

    def no_scan(*a, **k):
        raise AssertionError("names= must not scan")

    monkeypatch.setattr(sys.modules["kappatune.pipeline"], "scan", no_scan)
    cached = _opt(tiny_llama, names=names, cache=tmp_path)
    assert cached.selected == [table.names[0], table.names[3]]  # lowest κ first
    assert [cached.table[n].kappa for n in cached.selected] == [table[n].kappa for n in cached.selected]
    bare = _opt(tiny_llama, names=names, cache=None)
    assert bare.selected == names and all(math.isnan(bare.table[n].kappa) for n in names)
    with pytest.raises(ValueError, match=r"not parameters of LlamaForCausalLM: \['model.layers.0.self_attn.q.weight'\] "
                                         r"\(did you mean 'model.layers.0.self_attn.q_proj.weight'\?\)"):
        _opt(tiny_llama, names=["model.layers.0.self_attn.q.weight"])
    pre = _opt(tiny_llama, table=table, num_tensors=3)  # a precomputed table: no scan either
    assert pre.selected == table.names[:3]
    with pytest.raises(ValueError, match="computed for another model"):
        _opt(make_tiny_llama(layers=1), table=table, num_tensors=3)


def test_wrapped_models_are_unwrapped_for_names(tiny_llama):
    dp = nn.DataParallel(tiny_llama)  # same naming as DistributedDataParallel: module.<name>
    opt = _opt(dp, names=["model.layers.0.mlp.up_proj.weight"])
    assert opt.model is dp and opt.selected == ["model.layers.0.mlp.up_proj.weight"]
    assert opt.state_dict()[STATE_KEY]["groups"] == [["model.layers.0.mlp.up_proj.weight"]]
    with pytest.raises(TypeError, match="optimizer_cls_and_kwargs"):
        KappaTuneOptimizer([{"params": list(tiny_llama.parameters())}], lr=1e-3)


def test_pickle_and_deepcopy(tiny_llama):
    opt = _opt(tiny_llama, num_tensors=2, lr=1e-3)
    torch.optim.lr_scheduler.StepLR(opt, 1)  # patches opt.step on the instance, as torch does
    opt.register_step_pre_hook(lambda *a: None)
    _train(tiny_llama, opt, _batches(1))
    for clone in (copy.deepcopy(opt), pickle.loads(pickle.dumps(opt))):
        assert clone.param_groups is clone.inner.param_groups and clone.selected == opt.selected
        assert clone.model is not tiny_llama
        p = clone.param_groups[0]["params"][0]
        assert p is dict(clone.model.named_parameters())[clone.selected[0]]
        assert torch.equal(clone.state[p]["exp_avg"], opt.state[opt.param_groups[0]["params"][0]]["exp_avg"])
        before = _snapshot(tiny_llama)
        _train(clone.model, clone, _batches(1))
        assert not torch.equal(p, before[clone.selected[0]])  # the copy trains its own model ...
        assert all(torch.equal(q, before[n]) for n, q in tiny_llama.named_parameters())  # ... not the original


# -- the reference-compatible class ---------------------------------------------------------------
def test_selective_finetuning_optimizer_compat(tiny_llama, tmp_path):
    cf = tmp_path / "condition_numbers.json"
    opt = SelectiveFineTuningOptimizer(tiny_llama, torch.optim.AdamW, {"lr": 1e-3, "weight_decay": 0.01},
                                       condition_file=str(cf), num_tensors_to_finetune=5,
                                       max_dim_size_to_analyze=100)
    assert isinstance(opt, torch.optim.Optimizer) and opt.optimizer is opt.inner
    assert len(opt.selected) == 5 and opt.trainable_param_names == set(opt.selected)
    assert "model.embed_tokens.weight" not in opt.condition_numbers  # 128 > max_dim_size_to_analyze
    assert opt.condition_numbers == {e.name: e.kappa for e in kappatune.scan(tiny_llama, cache=False, max_dim=100,
                                                                             progress=False)}
    db = tmp_path / "condition_numbers.sqlite"  # condition_file names the κ cache database
    assert not cf.exists() and db.exists() and kappatune.KappaCache(db).keys()
    assert opt.param_groups[0]["weight_decay"] == 0.01
    _train(tiny_llama, opt, _batches(1))
    ref_style = tmp_path / "ref.json"  # a file in the reference's own {name: κ} format
    ref_style.write_text('{"lm_head.weight": 1.0}')
    SelectiveFineTuningOptimizer(make_tiny_llama(), torch.optim.SGD, {"lr": 0.1}, condition_file=str(ref_style),
                                 num_tensors_to_finetune=2)
    assert ref_style.read_text() == '{"lm_head.weight": 1.0}'  # neither trusted nor overwritten


def test_selective_finetuning_optimizer_condition_file_paths(tmp_path):
    """A folder is the cache folder; ``x.json`` → ``x.sqlite`` beside it; any other path is the database."""
    folder = tmp_path / "kc"
    folder.mkdir()
    SelectiveFineTuningOptimizer(make_tiny_llama(), torch.optim.SGD, {"lr": 0.1}, condition_file=str(folder),
                                 num_tensors_to_finetune=2)
    assert (folder / "kappa_cache.sqlite").is_file() and not (tmp_path / "kc.sqlite").exists()
    db = tmp_path / "k.sqlite"
    SelectiveFineTuningOptimizer(make_tiny_llama(), torch.optim.SGD, {"lr": 0.1}, condition_file=str(db),
                                 num_tensors_to_finetune=2)
    assert db.is_file() and not (tmp_path / "k.sqlite.sqlite").exists()


def test_activation_checkpoint_wrapper_names_are_cleaned(tiny_llama):
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    tiny_llama.model.layers[0] = checkpoint_wrapper(tiny_llama.model.layers[0])
    raw = "model.layers.0._checkpoint_wrapped_module.mlp.up_proj.weight"
    assert raw in dict(tiny_llama.named_parameters())
    opt = _opt(tiny_llama, names=["model.layers.0.mlp.up_proj.weight"], lr=1e-2)
    assert [n for n, p in tiny_llama.named_parameters() if p.requires_grad] == [raw]
    before = _snapshot(tiny_llama)
    _train(tiny_llama, opt, _batches(1))
    assert not torch.equal(dict(tiny_llama.named_parameters())[raw], before[raw])
    assert opt.state_dict()[STATE_KEY]["groups"] == [["model.layers.0.mlp.up_proj.weight"]]
