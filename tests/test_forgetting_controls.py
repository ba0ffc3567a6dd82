"""The forgetting controls: decay toward the pretrained weights, the base model on demand, deltas
blended back (in memory and on disk), and the forgetting monitor (plain loops and the Trainer)."""

import copy
import io
import json

import pytest
import torch

import kappatune
import kappatune.cache
from kappatune import KappaTuneOptimizer
from kappatune.cli import main as cli_main
from kappatune.delta import DELTA_CONFIG_NAME, DELTA_WEIGHTS_NAME, DeltaError

from .conftest import make_tiny_llama

VOCAB, SEQ = 128, 16


def _task(n, seed=0, batch=4, stride=3):
    """Task text: a cyclic pattern with noise, so the model learns something it did not know."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        start = torch.randint(0, VOCAB, (batch, 1), generator=g)
        seq = (start + stride * torch.arange(SEQ)) % VOCAB
        noise = torch.rand(batch, SEQ, generator=g) < 0.1
        out.append(torch.where(noise, torch.randint(0, VOCAB, (batch, SEQ), generator=g), seq))
    return out


def _control(n, seed=100, batch=4):
    return _task(n, seed=seed, batch=batch, stride=5)


def _pretrained(seed):
    """A tiny model that knows the control pattern (full training on it), so fine-tuning can forget it."""
    m = make_tiny_llama(seed=seed)
    o = torch.optim.AdamW(m.parameters(), lr=1e-2)
    for x in _control(40, seed=200):
        m(input_ids=x, labels=x).loss.backward()
        o.step()
        o.zero_grad()
    return m


def _opt(model, **kw):
    kw.setdefault("cache", None)
    kw.setdefault("progress", False)
    kw.setdefault("num_tensors", 4)
    kw.setdefault("lr", 1e-2)
    return KappaTuneOptimizer(model, **kw)


def _train(model, opt, batches, sched=None):
    for x in batches:
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
        if sched is not None:
            sched.step()
        opt.zero_grad()


def _params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _logits(model, x):
    with torch.no_grad():
        return model(input_ids=x).logits


# -- decay_to_init ---------------------------------------------------------------------------------
def test_decay_to_init_zero_is_bit_identical_to_no_decay():
    a, b = make_tiny_llama(seed=1), make_tiny_llama(seed=1)
    oa = _opt(a, weight_decay=0.1)
    ob = _opt(b, weight_decay=0.1, decay_to_init=0.0)
    kappatune.freeze_all_but(a, oa.selected)
    named = dict(a.named_parameters())
    # the reference: the bare AdamW over the same tensors (a third model, same seed)
    c = make_tiny_llama(seed=1)
    kappatune.freeze_all_but(c, oa.selected)
    named_c = dict(c.named_parameters())
    bare = torch.optim.AdamW([named_c[n] for n in oa.selected], lr=1e-2, weight_decay=0.1)
    for m, o in ((a, oa), (b, ob), (c, bare)):
        _train(m, o, _task(5))
    for n, p in named.items():
        assert torch.equal(p, dict(b.named_parameters())[n]), n
        assert torch.equal(p, named_c[n]), n


def test_decay_to_init_is_the_decoupled_pull_with_the_scheduled_lr():
    """p ← p − lr_t·λ·(p − p₀) before each inner update, lr_t from the scheduler: bit for bit by hand."""
    lam, lr = 3.0, 0.05
    m, ref = make_tiny_llama(seed=2), make_tiny_llama(seed=2)
    opt = _opt(m, optimizer=torch.optim.SGD, lr=lr, decay_to_init=lam)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    assert opt.param_groups[0]["decay_to_init"] == lam
    kappatune.freeze_all_but(ref, opt.selected)
    named = dict(ref.named_parameters())
    params = [named[n] for n in opt.selected]
    p0 = [p.detach().clone() for p in params]
    bare = torch.optim.SGD(params, lr=lr)
    bsched = torch.optim.lr_scheduler.StepLR(bare, step_size=1, gamma=0.5)
    _train(m, opt, _task(4), sched)
    for x in _task(4):
        ref(input_ids=x, labels=x).loss.backward()
        with torch.no_grad():
            for p, b in zip(params, p0):
                p.lerp_(b, bare.param_groups[0]["lr"] * lam)
        bare.step()
        bsched.step()
        bare.zero_grad()
    for n in opt.selected:
        assert torch.equal(dict(m.named_parameters())[n], named[n]), n


def test_decay_to_init_keeps_weights_and_control_loss_closer_to_the_base():
    task, control = _task(25), _control(4)
    pre = _pretrained(3)
    runs = {}
    for lam in (0.0, 20.0):
        m = copy.deepcopy(pre)
        opt = _opt(m, lr=2e-2, weight_decay=0.0, decay_to_init=lam, num_tensors=6)
        p0 = {n: p.detach().clone() for n, p in m.named_parameters() if n in opt.selected}
        _train(m, opt, task)
        dist = sum(float((p.detach() - p0[n]).norm() ** 2) for n, p in m.named_parameters() if n in p0) ** 0.5
        runs[lam] = (dist, kappatune.measure_forgetting(m, opt, control=control, task=task[:4]))
    (d0, m0), (d1, m1) = runs[0.0], runs[20.0]
    assert d1 < 0.5 * d0
    assert 0 <= m1["control_loss_change"] < m0["control_loss_change"]  # forgetting, less of it with decay
    assert m1["task_kl"] < m0["task_kl"]
    assert m0["task_loss_change"] < 0  # the run without decay learned the task


def test_decay_to_init_per_group_and_bad_values():
    m = make_tiny_llama(seed=4)
    flags = [p.requires_grad for p in m.parameters()]
    for bad in (-1.0, float("nan"), float("inf"), "1", True):
        with pytest.raises(ValueError, match="decay_to_init"):
            _opt(m, decay_to_init=bad)
    with pytest.raises(ValueError, match="keep_base"):
        _opt(m, decay_to_init=0.5, keep_base=False)
    with pytest.raises(TypeError, match="keep_base"):
        _opt(m, keep_base="yes")
    assert [p.requires_grad for p in m.parameters()] == flags  # a refused construction freezes nothing
    # SGD with zero gradients: each step moves a tensor by the pull alone, p ← lerp(p, p₀, lr·λ)
    lr = 0.1
    opt = _opt(m, optimizer=torch.optim.SGD, lr=lr, decay_to_init=0.5)
    norm = m.model.norm.weight
    opt.add_param_group({"params": [norm], "decay_to_init": 0.0})
    assert [g["decay_to_init"] for g in opt.param_groups] == [0.5, 0.0]
    named = dict(m.named_parameters())
    with torch.no_grad():
        for p in opt.param_groups[0]["params"] + [norm]:
            p.add_(1.0)  # away from p₀
    before = {n: named[n].detach().clone() for n in opt.selected}
    p0 = {n: t.clone() for n, t in opt.state_dict()["kappatune"]["base"].items()}
    for n in opt.selected:
        named[n].grad = torch.zeros_like(named[n])
    skipped = opt.selected[1]
    named[skipped].grad = None  # no gradient this step: no pull either, as AdamW's weight decay
    opt.step()
    for n in opt.selected:
        if n == "model.norm.weight" or n == skipped:
            assert torch.equal(named[n], before[n]), n
        else:
            assert torch.equal(named[n], torch.lerp(before[n], p0[n], lr * 0.5)), n
    with pytest.raises(ValueError, match="decay_to_init"):
        opt.add_param_group({"params": [m.model.layers[0].input_layernorm.weight], "decay_to_init": -2.0})


def test_decay_to_init_with_a_closure_equals_closure_then_step():
    x = _task(1)[0]
    runs = []
    for use_closure in (False, True):
        m = make_tiny_llama(seed=15)
        opt = _opt(m, decay_to_init=3.0, lr=2e-2)
        for _ in range(3):
            def closure():
                opt.zero_grad()
                loss = m(input_ids=x, labels=x).loss
                loss.backward()
                return loss
            if use_closure:
                opt.step(closure)
            else:
                closure()
                opt.step()
        runs.append(_params(m))
    assert all(torch.equal(runs[0][n], runs[1][n]) for n in runs[0])


def test_decay_needs_an_explicit_learning_rate():
    transformers = pytest.importorskip("transformers")
    m = make_tiny_llama(seed=16)
    factory = lambda params: transformers.optimization.Adafactor(params, lr=None, relative_step=True)  # noqa: E731
    with pytest.raises(ValueError, match="relative_step=False"):
        KappaTuneOptimizer(m, factory, num_tensors=4, cache=None, progress=False, decay_to_init=1.0)
    assert all(p.requires_grad for p in m.parameters())


def test_a_model_converted_after_construction_keeps_exact_base_weights():
    m = make_tiny_llama(seed=17)
    opt = _opt(m, optimizer=torch.optim.SGD, decay_to_init=1.0)  # SGD: no state for the conversion to break
    _train(m, opt, _task(2))
    m.double()
    with torch.no_grad():
        for p in opt.param_groups[0]["params"]:
            p.add_(1e-12)  # below float32 resolution: lost if anything went through float32
    tuned = _params(m)
    with opt.base_weights():
        pass
    assert all(torch.equal(p, tuned[n]) for n, p in m.named_parameters())
    x = _task(1)[0]
    m(input_ids=x, labels=x).loss.backward()
    before = _params(m)
    opt.step()  # the pull, in float64
    assert all(p.dtype == torch.float64 for p in m.parameters())
    assert any(not torch.equal(p, before[n]) for n, p in m.named_parameters())


def test_keep_base_false_refuses_to_resume_a_decaying_state():
    m = make_tiny_llama(seed=18)
    sd = _opt(m, decay_to_init=2.0).state_dict()
    other = _opt(make_tiny_llama(seed=18), keep_base=False)
    with pytest.raises(ValueError, match="keep_base=True"):
        other.load_state_dict(sd)
    assert other.param_groups[0]["decay_to_init"] == 0.0


def test_summary_reports_the_memory_of_p0_exactly():
    m = make_tiny_llama(seed=5)
    opt = _opt(m)
    sel = dict(m.named_parameters())
    want = sum(sel[n].numel() * sel[n].element_size() for n in opt.selected)
    assert opt.base_nbytes == want
    assert "pretrained values kept" in opt.summary()
    off = _opt(make_tiny_llama(seed=5), keep_base=False)
    assert off.base_nbytes == 0 and "not kept" in off.summary()


def test_resume_with_decay_to_init_equals_an_uninterrupted_run_bit_for_bit():
    task = _task(6)
    kw = dict(decay_to_init=2.0, weight_decay=0.0, lr=2e-2)
    full = make_tiny_llama(seed=6)
    fo = _opt(full, **kw)
    _train(full, fo, task)

    half = make_tiny_llama(seed=6)
    ho = _opt(half, **kw)
    _train(half, ho, task[:3])
    buf = io.BytesIO()
    torch.save({"model": half.state_dict(), "opt": ho.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)  # p₀ travels as plain tensors
    resumed = make_tiny_llama(seed=99)
    resumed.load_state_dict(saved["model"])
    ro = KappaTuneOptimizer.from_state_dict(resumed, saved["opt"], torch.optim.AdamW, **kw)
    _train(resumed, ro, task[3:])
    for (n, p), (_, q) in zip(full.named_parameters(), resumed.named_parameters()):
        assert torch.equal(p, q), n
    # without the saved p₀ the resumed run would pull toward the step-3 weights instead: not equal
    stripped = dict(saved["opt"])
    stripped["kappatune"] = {k: v for k, v in saved["opt"]["kappatune"].items() if k != "base"}
    again = make_tiny_llama(seed=99)
    again.load_state_dict(saved["model"])
    ao = KappaTuneOptimizer.from_state_dict(again, stripped, torch.optim.AdamW, **kw)
    _train(again, ao, task[3:])
    assert any(not torch.equal(p, q) for p, q in zip(full.parameters(), again.parameters()))


def test_a_state_dict_with_a_wrong_p0_is_refused_and_nothing_changes():
    m = make_tiny_llama(seed=7)
    opt = _opt(m, decay_to_init=1.0)
    sd = opt.state_dict()
    name = opt.selected[0]
    sd["kappatune"]["base"] = {**sd["kappatune"]["base"], name: torch.zeros(3)}
    before = {n: t.clone() for n, t in opt._base.items()}
    with pytest.raises(ValueError, match="pretrained value of"):
        opt.load_state_dict(sd)
    assert all(torch.equal(before[n], opt._base[n]) for n in before)


def _scaler_step(m, opt, scaler, poison):
    x = _task(1)[0]
    scaler.scale(m(input_ids=x, labels=x).loss).backward()
    if poison:
        for p in opt.param_groups[0]["params"]:
            p.grad.fill_(float("inf"))
    scaler.step(opt)
    scaler.update()
    opt.zero_grad()


@pytest.mark.parametrize("fused", [False, True])
def test_gradscaler_skipped_step_does_not_decay(fused):
    m = make_tiny_llama(seed=8)
    opt = _opt(m, decay_to_init=5.0, fused=fused)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
    _scaler_step(m, opt, scaler, poison=False)  # a real step first, so that p ≠ p₀
    after_one = _params(m)
    assert any(not torch.equal(after_one[n], opt._base[n]) for n in opt.selected)
    _scaler_step(m, opt, scaler, poison=True)
    for n, p in m.named_parameters():
        assert torch.equal(p, after_one[n]), n


# -- base_weights() --------------------------------------------------------------------------------
def test_base_weights_is_the_base_model_bit_for_bit_and_restores_the_tuned_one():
    m = make_tiny_llama(seed=9)
    x = _control(1)[0]
    base_logits = _logits(m, x)
    opt = _opt(m)
    _train(m, opt, _task(3))
    tuned = _params(m)
    tuned_logits = _logits(m, x)
    assert not torch.equal(tuned_logits, base_logits)
    grads_none = [p.grad is None for p in m.parameters()]
    state = {k: {s: v.clone() for s, v in st.items()} for k, st in opt.state.items()}
    with opt.base_weights() as inside:
        assert inside is m
        assert torch.equal(_logits(m, x), base_logits)
        with pytest.raises(RuntimeError, match="inside opt.base_weights"):
            opt.step()
        with pytest.raises(RuntimeError, match="already|inside"):
            with opt.base_weights():
                pass
    assert torch.equal(_logits(m, x), tuned_logits)
    assert all(torch.equal(p, tuned[n]) for n, p in m.named_parameters())
    assert [p.grad is None for p in m.parameters()] == grads_none
    for k, st in opt.state.items():
        assert all(torch.equal(v, state[k][s]) for s, v in st.items())
    with pytest.raises(KeyError):
        with opt.base_weights():
            raise KeyError("boom")
    assert all(torch.equal(p, tuned[n]) for n, p in m.named_parameters())
    _train(m, opt, _task(1))  # stepping works again after the block


def test_nothing_that_would_record_the_swapped_values_runs_inside_base_weights():
    m = make_tiny_llama(seed=19)
    opt = _opt(m, decay_to_init=1.0)
    _train(m, opt, _task(1))
    with opt.base_weights():
        for call in (opt.state_dict, lambda: copy.deepcopy(opt), lambda: opt.load_state_dict({}),
                     lambda: opt.add_param_group({"params": [m.model.norm.weight]})):
            with pytest.raises(RuntimeError, match="inside opt.base_weights"):
                call()
    opt.state_dict()


def test_base_weights_needs_the_kept_values():
    opt = _opt(make_tiny_llama(seed=10), keep_base=False)
    with pytest.raises(RuntimeError, match="keep_base"):
        with opt.base_weights():
            pass
    with pytest.raises(RuntimeError, match="keep_base"):
        opt.save_delta("unused")


# -- deltas ----------------------------------------------------------------------------------------
@pytest.fixture
def trained(tmp_path):
    model = make_tiny_llama(seed=11)
    base = _params(model)
    opt = _opt(model, num_tensors=5)
    _train(model, opt, _task(3))
    path = opt.save_delta(tmp_path / "delta")
    return model, base, opt, path


def test_delta_folder_is_small_and_self_describing(trained):
    model, base, opt, path = trained
    cfg = json.loads((path / DELTA_CONFIG_NAME).read_text())
    assert cfg["format"] == "kappatune-delta" and list(cfg["tensors"]) == opt.selected
    assert cfg["num_changed"] == len(opt.selected)
    params = dict(model.named_parameters())
    for n, meta in cfg["tensors"].items():
        assert meta["base_digest"] == kappatune.cache.tensor_digest(base[n])
        assert meta["tuned_digest"] == kappatune.cache.tensor_digest(params[n])
        assert meta["shape"] == list(params[n].shape) and meta["dtype"] == "float32"
    assert [r["name"] for r in cfg["kappa_table"]] == opt.selected
    nbytes = sum(params[n].numel() * 4 for n in opt.selected)
    assert cfg["nbytes"] == nbytes
    assert nbytes <= (path / DELTA_WEIGHTS_NAME).stat().st_size < nbytes + 4096
    with pytest.raises(DeltaError, match="already holds a delta"):
        opt.save_delta(path)
    opt.save_delta(path, overwrite=True)


def test_apply_delta_alpha_0_and_1_are_exact_and_half_is_the_formula(trained):
    model, base, opt, path = trained
    fresh = make_tiny_llama(seed=11)
    applied = kappatune.apply_delta(fresh, path, alpha=1.0)
    assert applied.names == opt.selected
    for (n, p), (_, q) in zip(model.named_parameters(), fresh.named_parameters()):
        assert torch.equal(p, q), n
    applied.restore()
    assert all(torch.equal(p, base[n]) for n, p in fresh.named_parameters())
    kappatune.apply_delta(fresh, path, alpha=0.0).restore()
    assert all(torch.equal(p, base[n]) for n, p in fresh.named_parameters())
    kappatune.apply_delta(fresh, path, alpha=0.5)
    tuned = dict(model.named_parameters())
    for n, p in fresh.named_parameters():
        if n in opt.selected:
            w0, w1 = base[n].double(), tuned[n].detach().double()
            assert torch.equal(p, (w0 + 0.5 * (w1 - w0)).float()), n
            assert not torch.equal(p, base[n]) and not torch.equal(p, tuned[n])
        else:
            assert torch.equal(p, base[n]), n


def test_a_blend_inside_base_weights_needs_no_second_model_and_leaves_both_states_exact(trained):
    """The quickstart's pattern: inside ``opt.base_weights()`` the model is the delta's base, so the blend
    is applied in place; after ``restore()`` and the block, the tuned model and its kept p₀ are exact."""
    model, base, opt, path = trained
    tuned = _params(model)
    with opt.base_weights():
        applied = kappatune.apply_delta(model, path, alpha=0.5)
        for n, p in model.named_parameters():
            w0, w1 = base[n].double(), tuned[n].double()
            assert torch.equal(p, (w0 + 0.5 * (w1 - w0)).float()), n
        applied.restore()
    assert all(torch.equal(p, tuned[n]) for n, p in model.named_parameters())
    with opt.base_weights():                               # p₀ kept bit for bit: the base again
        assert all(torch.equal(p, base[n]) for n, p in model.named_parameters())
    with pytest.raises(DeltaError):                        # outside the block the model is not the base
        kappatune.apply_delta(model, path, alpha=0.5)
    assert all(torch.equal(p, tuned[n]) for n, p in model.named_parameters())


def test_apply_delta_refuses_another_base_and_changes_nothing(trained):
    _, _, opt, path = trained
    other = make_tiny_llama(seed=12)
    before = _params(other)
    with pytest.raises(DeltaError, match=rf"'{opt.selected[0]}' of LlamaForCausalLM is not the base"):
        kappatune.apply_delta(other, path)
    assert all(torch.equal(p, before[n]) for n, p in other.named_parameters())
    # a model with the delta already applied is not its base either
    fresh = make_tiny_llama(seed=11)
    kappatune.apply_delta(fresh, path)
    with pytest.raises(DeltaError, match="not the base"):
        kappatune.apply_delta(fresh, path)
    with pytest.raises(DeltaError, match="float32"):
        kappatune.apply_delta(make_tiny_llama(seed=11, dtype=torch.bfloat16), path)
    with pytest.raises(DeltaError, match="finite"):
        kappatune.apply_delta(make_tiny_llama(seed=11), path, alpha=float("nan"))
    with pytest.raises(DeltaError, match="not a delta folder|no such delta"):
        kappatune.apply_delta(make_tiny_llama(seed=11), path.parent / "nope")


def test_apply_delta_refuses_a_corrupt_delta(trained):
    _, _, opt, path = trained
    st = pytest.importorskip("safetensors.torch")
    tensors = st.load_file(str(path / DELTA_WEIGHTS_NAME))
    tensors[opt.selected[1]][0, 0] += 1.0
    st.save_file(tensors, str(path / DELTA_WEIGHTS_NAME))
    fresh = make_tiny_llama(seed=11)
    before = _params(fresh)
    with pytest.raises(DeltaError, match="corrupt"):
        kappatune.apply_delta(fresh, path)
    assert all(torch.equal(p, before[n]) for n, p in fresh.named_parameters())


def test_cli_apply_delta_writes_a_checkpoint_from_pretrained_loads(trained, tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    _, _, opt, path = trained
    base_dir = tmp_path / "base"
    make_tiny_llama(seed=11).save_pretrained(base_dir)
    (base_dir / "tokenizer_config.json").write_text("{}")
    out = tmp_path / "blended"
    assert cli_main(["apply-delta", str(base_dir), str(path), "-o", str(out), "--alpha", "0.5"]) == 0
    assert "5 tensor(s) blended" in capsys.readouterr().out
    assert (out / "config.json").exists() and (out / "tokenizer_config.json").exists()
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out)
    mem = make_tiny_llama(seed=11)
    kappatune.apply_delta(mem, path, alpha=0.5)
    for (n, p), (_, q) in zip(mem.named_parameters(), loaded.named_parameters()):
        assert torch.equal(p, q), n
    x = _control(1)[0]
    assert torch.equal(_logits(mem, x), _logits(loaded, x))
    # never overwrite; never write from another base
    before = sorted(p.name for p in out.iterdir())
    assert cli_main(["apply-delta", str(base_dir), str(path), "-o", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == before
    other = tmp_path / "other"
    make_tiny_llama(seed=12).save_pretrained(other)
    capsys.readouterr()
    assert cli_main(["apply-delta", str(other), str(path), "-o", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "not the base" in err and err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "x").exists() and not any(p.name.startswith(".x.tmp") for p in tmp_path.iterdir())


# -- the monitor -----------------------------------------------------------------------------------
def test_monitor_reads_zero_before_the_first_step_and_more_after_training():
    m = make_tiny_llama(seed=13)
    opt = _opt(m, lr=3e-2)
    task, control = _task(12), _control(2)
    m.train()
    first = kappatune.measure_forgetting(m, opt, control=control, task=task[:2])
    assert first["control_loss_change"] == 0.0 and first["task_kl"] == 0.0 and first["task_loss_change"] == 0.0
    assert m.training and all(mod.training for mod in m.modules())  # the mode is restored
    _train(m, opt, task)
    after = kappatune.measure_forgetting(m, opt, control=control, task=task[:2])
    assert after["task_kl"] > 0 and after["control_loss_change"] != 0.0
    assert after["control_loss_base"] == first["control_loss_base"]
    assert after["task_loss"] < after["task_loss_base"]
    only = kappatune.measure_forgetting(m, opt, control=control)
    assert set(only) == {"control_loss", "control_loss_base", "control_loss_change", "control_tokens"}
    with pytest.raises(ValueError, match="control= batches, task= batches"):
        kappatune.measure_forgetting(m, opt)
    masked = {"input_ids": control[0], "attention_mask": torch.zeros_like(control[0])}
    with pytest.raises(ValueError, match="no token"):
        kappatune.measure_forgetting(m, opt, control=[masked])


def test_trainer_callback_logs_forgetting_into_log_history(tmp_path):
    transformers = pytest.importorskip("transformers")
    datasets = pytest.importorskip("datasets")
    pytest.importorskip("accelerate")
    from accelerate.state import AcceleratorState, GradientState

    from kappatune.integrations.transformers import ForgettingCallback, optimizer_cls_and_kwargs

    model = make_tiny_llama(seed=14)
    ids = torch.cat(_task(4)).tolist()
    ds = datasets.Dataset.from_dict({"input_ids": ids, "labels": ids})
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=4, learning_rate=3e-2,
        save_strategy="no", logging_steps=100, report_to="none", use_cpu=True, seed=0, disable_tqdm=True)
    cls_kw = optimizer_cls_and_kwargs(model, torch.optim.AdamW, num_tensors=4, decay_to_init=0.5, cache=None,
                                      progress=False)
    assert cls_kw[1]["decay_to_init"] == 0.5
    trainer = transformers.Trainer(model=model, args=args, train_dataset=ds, optimizer_cls_and_kwargs=cls_kw)
    trainer.add_callback(ForgettingCallback(trainer, control=_control(1), task=_task(1, seed=5), every_n_steps=2))
    try:
        trainer.train()
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
    logged = [h for h in trainer.state.log_history if "forgetting/task_kl" in h]
    assert [h["step"] for h in logged] == [0, 2, 4]
    assert logged[0]["forgetting/task_kl"] == 0.0 and logged[0]["forgetting/control_loss_change"] == 0.0
    assert logged[-1]["forgetting/task_kl"] > 0
    assert trainer.optimizer.optimizer.param_groups[0]["decay_to_init"] == 0.5
    with pytest.raises(ValueError, match="every_n_steps"):
        ForgettingCallback(trainer, task=_task(1), every_n_steps=0)


def test_cli_apply_delta_on_a_sharded_bf16_checkpoint_with_other_weight_files(tmp_path, capsys):
    """Shards and their index, a bfloat16 base for a float32 delta, α = 0 byte for byte, and weight files in
    other formats left out (they would hold the base without the delta)."""
    transformers = pytest.importorskip("transformers")

    def bf16_base():  # a bfloat16 checkpoint's values, as from_pretrained(..., dtype=torch.float32) gives them
        return make_tiny_llama(seed=11).to(torch.bfloat16)

    model = bf16_base().float()
    opt = _opt(model, num_tensors=5)
    _train(model, opt, _task(3))
    path = opt.save_delta(tmp_path / "delta")
    base_dir = tmp_path / "base"
    bf16_base().save_pretrained(base_dir, max_shard_size="60KB")
    shards = sorted(p.name for p in base_dir.glob("*.safetensors"))
    assert len(shards) > 1 and (base_dir / "model.safetensors.index.json").exists()
    (base_dir / "pytorch_model.bin").write_bytes(b"stale weights")
    (base_dir / "optimizer.pt").write_bytes(b"trainer state")
    capsys.readouterr()
    zero = tmp_path / "alpha0"
    assert cli_main(["apply-delta", str(base_dir), str(path), "-o", str(zero), "--alpha", "0"]) == 0
    assert "pytorch_model.bin" in capsys.readouterr().err
    assert not (zero / "pytorch_model.bin").exists() and not (zero / "optimizer.pt").exists()
    for name in [*shards, "model.safetensors.index.json", "config.json"]:
        assert (zero / name).read_bytes() == (base_dir / name).read_bytes(), name
    half = tmp_path / "alpha05"
    assert cli_main(["apply-delta", str(base_dir), str(path), "-o", str(half), "--alpha", "0.5"]) == 0
    loaded = transformers.AutoModelForCausalLM.from_pretrained(half, dtype=torch.bfloat16)
    mem = bf16_base()
    kappatune.apply_delta(mem, path, alpha=0.5)  # the same rule in memory: compared in float32, rounded once
    for (n, p), (_, q) in zip(mem.named_parameters(), loaded.named_parameters()):
        assert torch.equal(p, q), n
    base = dict(bf16_base().named_parameters())
    changed = {n for n, p in loaded.named_parameters() if not torch.equal(p, base[n])}
    assert changed == set(opt.selected)


def test_cli_apply_delta_that_fails_while_writing_leaves_nothing(trained, tmp_path, capsys):
    st = pytest.importorskip("safetensors.torch")
    _, _, opt, path = trained
    base_dir = tmp_path / "base"
    make_tiny_llama(seed=11).save_pretrained(base_dir)
    tensors = st.load_file(str(path / DELTA_WEIGHTS_NAME))
    tensors[opt.selected[-1]][0, 0] += 1.0  # found only when that tensor is written
    st.save_file(tensors, str(path / DELTA_WEIGHTS_NAME))
    capsys.readouterr()
    assert cli_main(["apply-delta", str(base_dir), str(path), "-o", str(tmp_path / "out")]) == 2
    assert "corrupt" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base", "delta"]


def test_monitor_refuses_a_model_the_optimizer_does_not_train_and_one_shot_batches(tmp_path):
    transformers = pytest.importorskip("transformers")
    from kappatune.integrations.transformers import ForgettingCallback

    m = make_tiny_llama(seed=20)
    opt = _opt(m)
    with pytest.raises(ValueError, match="not the LlamaForCausalLM this optimizer trains"):
        kappatune.measure_forgetting(make_tiny_llama(seed=20), opt, task=_task(1))
    args = transformers.TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True)
    trainer = transformers.Trainer(model=m, args=args)
    with pytest.raises(TypeError, match="read only once"):
        ForgettingCallback(trainer, task=(x for x in _task(2)))
